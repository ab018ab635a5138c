"""The container runtimes a node worker can use, by the name its settings give
(`WARMSTART_NODE__RUNTIME`). Adding one: a module with a `ContainerRuntime` subclass, and
its line here."""

from __future__ import annotations

from collections.abc import Callable

from activities.runtime.base import ContainerRuntime
from activities.runtime.containerd import Containerd
from api.errors import InvalidSpecError

# name → factory(endpoint, state directory)
RUNTIMES: dict[str, Callable[[str, str], ContainerRuntime]] = {
    "containerd": lambda endpoint, state: Containerd(address=endpoint, state=state),
}


def runtime_for(name: str, *, endpoint: str, state: str) -> ContainerRuntime:
    """The runtime called `name`, talking to `endpoint` with state under `state`."""
    try:
        make = RUNTIMES[name]
    except KeyError:
        known = ", ".join(sorted(RUNTIMES))
        raise InvalidSpecError(
            f"WARMSTART_NODE__RUNTIME={name!r}: not a known container runtime ({known})"
        ) from None
    return make(endpoint, state)
