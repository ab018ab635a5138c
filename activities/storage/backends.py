"""Kinds of remote storage: the `kind` a `RemoteStorage` names → the class that opens
backends (`objectstore.Backend`) of that kind for a worker.

Everything above this seam (upload, prefetch and restore through `remote.RemoteStores`,
the catalog, retention) knows backends by the protocol only. Adding a kind is one module
with a `BackendKind` class (and its backend), its settings (`workers/settings.py`:
`StorageSettings`) and one line in `BUILT_IN` here. Built-in kinds are imported on first
use, so a command that opens none pays for no client library; tests register others.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from api.errors import InvalidSpecError

if TYPE_CHECKING:
    from activities.storage.objectstore import Backend
    from activities.storage.objectstore.transfer import TransferSettings
    from api.storage import RemoteStorage

# (namespace, name) -> the Secret's data, decoded.
SecretReader = Callable[[str, str], Mapping[str, str]]

# kind -> "module:class" of its BackendKind.
BUILT_IN: dict[str, str] = {
    "s3": "activities.storage.objectstore.s3:S3Kind",
}


@dataclass(frozen=True)
class KindContext:
    """What a worker gives every kind: its transfer settings, and how it reads a Secret
    a location names (None: it cannot, such as a worker off the cluster)."""

    transfer: TransferSettings
    read_secret: SecretReader | None = None


class BackendKind(Protocol):
    """Opens backends of one kind for one worker, keeping what they can share (clients)."""

    def open(self, storage: RemoteStorage) -> Backend:
        """A backend for `storage`; InvalidSpecError for a location this kind cannot serve."""
        ...


KindFactory = Callable[[KindContext], BackendKind]

_registered: dict[str, KindFactory] = {}
_lock = threading.Lock()


def register(kind: str, factory: KindFactory) -> None:
    """Serve `kind` with `factory` (a test's, or a plugin's) in this process."""
    with _lock:
        _registered[kind] = factory


def unregister(kind: str) -> None:
    with _lock:
        _registered.pop(kind, None)


def kind_factory(kind: str) -> KindFactory:
    """The factory of `kind`: a registered one, else a built-in one (imported now)."""
    with _lock:
        found = _registered.get(kind)
    if found is not None:
        return found
    target = BUILT_IN.get(kind)
    if target is None:
        known = ", ".join(sorted({*BUILT_IN, *_registered}))
        raise InvalidSpecError(f"storage kind {kind!r} is not known (known: {known})")
    module, _, name = target.partition(":")
    return cast(KindFactory, getattr(importlib.import_module(module), name))
