"""Errors of the resource model.

ApiError
└── InvalidSpecError      a spec field that cannot be accepted
    └── InvalidNameError  a name unsafe as a path element or label
"""


class ApiError(Exception):
    """Base of errors raised by the pure resource model."""


class InvalidSpecError(ApiError, ValueError):
    """A spec that cannot be accepted; the message names the field and the reason.

    A ValueError so that pydantic validators report it as a field error.
    """


class InvalidNameError(InvalidSpecError):
    """A name that is not a safe path element."""
