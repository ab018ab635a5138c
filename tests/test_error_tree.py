"""Every error our code defines is in the one tree (api/errors.py): an exception class of any
package module derives from WarmstartError, so the interceptor maps it and the CLI names
it. (Pydantic validators' ValueErrors are the library's protocol, not classes of ours.)"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import activities
import api
import workers
import workflows
from api.errors import WarmstartError

PACKAGES = (api, activities, workflows, workers)


def exception_classes() -> list[type[BaseException]]:
    found = []
    for package in PACKAGES:
        prefix = f"{package.__name__}."
        for info in pkgutil.walk_packages(package.__path__, prefix):
            module = importlib.import_module(info.name)
            for _, value in inspect.getmembers(module, inspect.isclass):
                if value.__module__ == info.name and issubclass(value, BaseException):
                    found.append(value)
    return found


def test_the_walk_sees_the_errors_of_every_floor() -> None:
    names = {cls.__name__ for cls in exception_classes()}
    assert {"DumpFailedError", "CudaCheckpointError", "TransferStopped"} <= names


@pytest.mark.parametrize("cls", exception_classes(), ids=lambda cls: cls.__qualname__)
def test_every_error_of_ours_is_a_warmstart_error(cls: type[BaseException]) -> None:
    assert issubclass(cls, WarmstartError), f"{cls.__module__}.{cls.__qualname__}"
