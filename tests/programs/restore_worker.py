"""A node worker reduced to one container restore, run as a process of its own so that a
test can SIGKILL it mid-restore: `python -m tests.programs.restore_worker CRIU VERSION_DIR
STANDBY_PID WORK_DIR`."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from activities.criu.command import Criu
from activities.runtime.base import Located
from activities.runtime.restore import run_restore
from api.manifest import Manifest


async def main(criu: str, version_dir: str, standby_pid: str, work_dir: str) -> None:
    version = Path(version_dir)
    manifest = Manifest.model_validate_json((version / "manifest.json").read_bytes())
    print("restoring", flush=True)
    await run_restore(
        criu=Criu(criu),
        standby=Located(container_id="", pid=int(standby_pid)),
        images_dir=version / "criu",
        manifest=manifest,
        work_dir=Path(work_dir),
        where="a restore whose worker is killed",
    )
    print("restored", flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
