"""What the CLI makes of its arguments and errors, shared with the node worker that runs a
restore on the CLI's behalf (`workers.local_restore`): the same checks in the same order,
the same request, the same exit codes and messages on either path.

Only the standard library at the top: the CLI imports this module (decision 0007).
"""

from __future__ import annotations

import traceback
from typing import TYPE_CHECKING

from api.errors import WarmstartError  # the settings import it anyway

if TYPE_CHECKING:
    from workers.settings import Settings
    from workflows.contracts import RestoreRequest


class Answered(WarmstartError):
    """A command that ended elsewhere (the node worker ran it): the exit code and message
    it ended with there, printed as they are."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def pairs(flag: str, items: list[str]) -> dict[str, str]:
    from api.errors import InvalidSpecError

    found = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidSpecError(f"{flag} {item!r}: expected KEY=VALUE")
        found[key] = value
    return found


def check_seconds(flag: str, value: float) -> None:
    """A duration flag within the bounds its request field has (api.limits.ShortSeconds)."""
    from pydantic import TypeAdapter, ValidationError

    from api.errors import InvalidSpecError
    from api.limits import ShortSeconds

    try:
        TypeAdapter(ShortSeconds).validate_python(value)
    except ValidationError as err:
        raise InvalidSpecError(f"{flag} {value:g}: {err.errors()[0]['msg']}") from None


def restore_env(items: list[str]) -> dict[str, str]:
    """`--env` of a restore: only names a restored process re-reads (Dynamo's restore
    context); any other would be silently lost, so it is refused naming the known ones."""
    from api.dynamo import RESTORE_CONTEXT_ENV_NAMES
    from api.errors import InvalidSpecError

    env = pairs("--env", items)
    unknown = sorted(set(env) - RESTORE_CONTEXT_ENV_NAMES)
    if unknown:
        raise InvalidSpecError(
            f"--env {', '.join(unknown)}: a restored process keeps the environment it was "
            "captured with; it re-reads only these names (Dynamo's restore context): "
            + ", ".join(sorted(RESTORE_CONTEXT_ENV_NAMES))
        )
    return env


def restore_request(
    settings: Settings, ref: str, *, version: str, timeout: float, env: list[str]
) -> RestoreRequest:
    """The restore of REF on this node. REF is looked up in this node's store first (what
    it restores is here or comes into its cache; no round trip on the restore path), else
    (with remote storage) in what the remote store holds; the newest version unless one is
    given. Bad input is refused before the lookup."""
    from workers.remote import store_catalog
    from workflows.contracts import RestoreRequest

    check_seconds("--timeout", timeout)
    new_env = restore_env(env)
    entry = store_catalog(settings).find(ref)
    return RestoreRequest(
        env=new_env,
        name=entry.name,
        checkpoint_id=entry.checkpoint_id,
        version=version or entry.version,
        node=settings.node.name,
        answer_timeout_seconds=timeout,
        control_task_queue=settings.node.control_task_queue,
        storage=settings.storage.location(),
    )


def exit_status(err: BaseException) -> tuple[int, str]:
    """The one mapping of errors to exit codes and messages."""
    if isinstance(err, Answered):  # first: it is a WarmstartError printed as it came
        return err.code, err.message
    from pydantic import ValidationError

    from api.errors import InvalidSpecError, WarmstartError

    if isinstance(err, InvalidSpecError):
        return 2, str(err)
    if isinstance(err, ValidationError):
        return 2, "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in err.errors()
        )
    if isinstance(err, WarmstartError):
        return 1, f"[{err.reason}] {err.message}"
    if isinstance(err, KeyboardInterrupt):
        return 130, "interrupted"
    return 1, "".join(traceback.format_exception(err))
