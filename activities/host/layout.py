"""Where a node keeps local state under its state directory, derived from names and IDs.

Node activities derive these paths themselves, so they never travel through workflow
histories; only the manifest records the paths CRIU needs again at restore.

    <home>/checkpoints/                              the checkpoint store (activities.storage.store)
    <home>/workloads/<name>/<checkpointID>/control/  the workload's SNAPSHOT_CONTROL_DIR
    <home>/workloads/<name>/<checkpointID>/output.log   its stdout and stderr
    <home>/workloads/<name>/<checkpointID>/exit-status  written when it ends
    <home>/workloads/<name>/<checkpointID>/launch.json  what was launched (LaunchRecord)
    <home>/restores/<name>/<uuid>/                   CRIU work directory of one restore
    <home>/cache/verified/                           digests already checked here
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from api.contract import Contract
from api.naming import require_path_element
from api.workload import LocalWorkload


class LaunchRecord(Contract):
    """The node's own record of a launched workload, read back when the dump is committed."""

    workload: LocalWorkload
    pid: int
    start_ticks: int
    # The workflow run that launched it: a retried launch of the same run adopts the
    # process; one left by another run is stopped (see LocalProcessActivities).
    workflow_id: str = ""
    run_id: str = ""


@dataclass(frozen=True)
class WorkloadPaths:
    root: Path

    @property
    def control_dir(self) -> Path:
        return self.root / "control"

    @property
    def output_log(self) -> Path:
        return self.root / "output.log"

    @property
    def exit_status(self) -> Path:
        return self.root / "exit-status"

    @property
    def launch_record(self) -> Path:
        return self.root / "launch.json"

    @property
    def restored_record(self) -> Path:
        """The live restored instance (a LaunchRecord-like pid and start time)."""
        return self.root / "restored.json"

    @property
    def restore_lock(self) -> Path:
        return self.root / ".restore.lock"


@dataclass(frozen=True)
class NodeLayout:
    home: Path

    @property
    def checkpoints(self) -> Path:
        return self.home / "checkpoints"

    @property
    def workloads(self) -> Path:
        return self.home / "workloads"

    @property
    def secrets(self) -> Path:
        """Files that `SecretRef(file=...)` names, put there by the node's operator."""
        return self.home / "secrets"

    @property
    def verified_cache(self) -> Path:
        return self.home / "cache" / "verified"

    @property
    def checkpoint_cache(self) -> Path:
        """Versions fetched from remote storage (`storage.objectstore.cache.NodeCache`)."""
        return self.home / "cache" / "checkpoints"

    def workload(self, name: str, checkpoint_id: str) -> WorkloadPaths:
        return WorkloadPaths(
            self.workloads
            / require_path_element(name, what="workload name")
            / require_path_element(checkpoint_id, what="checkpoint ID")
        )

    def restore_work_dir(self, name: str) -> Path:
        """A fresh CRIU work directory for one restore of `name`."""
        return self.home / "restores" / require_path_element(name, what="name") / uuid.uuid4().hex

    def read_launch(self, name: str, checkpoint_id: str) -> LaunchRecord:
        path = self.workload(name, checkpoint_id).launch_record
        return LaunchRecord.model_validate_json(path.read_bytes())

    def launch_records(self) -> list[LaunchRecord]:
        """Every readable launch record on this node (one per workload name and ID)."""
        records = []
        for path in sorted(self.workloads.glob("*/*/launch.json")):
            try:
                records.append(LaunchRecord.model_validate_json(path.read_bytes()))
            except (OSError, ValueError):
                continue  # unreadable or from an older layout: nothing to act on
        return records
