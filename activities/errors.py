"""The one place where warmstart errors become Temporal failures.

Activities raise `api.errors.WarmstartError`s (the tree is drawn in that module); the
`ErrorMapping` interceptor, installed on every worker, turns them into `ApplicationError`
with `type` = the reason, non-retryable unless the error class says retrying can help.
Anything else (OSError, a timeout) propagates unchanged and is retried by the step's policy.
"""

from __future__ import annotations

from typing import Any

from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from api.errors import WarmstartError


def application_error(err: WarmstartError) -> ApplicationError:
    """`err` as a Temporal failure the workflow (and the CLI) can branch on by `type`."""
    return ApplicationError(err.message, type=err.reason.value, non_retryable=not err.retryable)


class _MapErrors(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        try:
            return await super().execute_activity(input)
        except WarmstartError as err:
            raise application_error(err) from None  # the message says it all; lean histories


class ErrorMapping(Interceptor):
    """Worker interceptor: WarmstartError raised by an activity → ApplicationError."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _MapErrors(next)
