"""Quarantine entries: which checkpoint failed to restore on which node class (GPU model,
GPU driver, CRIU version). The store keeps them (`activities.storage.quarantine`); the CLI
reads and clears them through the control side, which mounts that store."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

from api.contract import Contract
from api.manifest import HostInfo


class NodeClass(Contract):
    gpu_model: str
    gpu_driver: str
    criu: str

    @property
    def key(self) -> str:
        text = json.dumps(self.model_dump(), sort_keys=True).encode()
        return hashlib.sha256(text).hexdigest()[:16]

    def describe(self) -> str:
        gpus = f"{self.gpu_model}, driver {self.gpu_driver}" if self.gpu_model else "no GPU"
        return f"{gpus}, CRIU {self.criu}"


def node_class(host: HostInfo, *, criu: str) -> NodeClass:
    return NodeClass(gpu_model=host.gpu_model, gpu_driver=host.gpu_driver, criu=criu)


class QuarantineEntry(Contract):
    checkpoint_id: str
    node_class: NodeClass
    reason: str
    message: str
    node: str
    since: datetime
    # The namespace whose restore failed: one checkpoint ID may be captured in several
    # namespaces (each owns its own versions), and one's failures never quarantine another's.
    # Empty: recorded before entries had a namespace (listed and cleared, not enforced).
    namespace: str = ""

    def describe(self) -> str:
        return (
            f"checkpoint {self.checkpoint_id} is quarantined on node class "
            f"[{self.node_class.describe()}] since {self.since:%Y-%m-%d %H:%M:%S}Z after "
            f"{self.reason} on node {self.node}; clear it with "
            f"`warmstart quarantine clear {self.checkpoint_id}`"
        )
