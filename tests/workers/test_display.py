"""What the CLI's progress line says about a running step."""

from __future__ import annotations

from activities.contracts import Heartbeat
from api.reasons import Phase
from workers.display import describe_progress
from workers.operations import LiveProgress
from workflows.contracts import Progress


def test_a_transfer_shows_bytes_of_total_and_rate() -> None:
    beat = Heartbeat(stage="upload", bytes=3 << 30, bytes_total=4 << 30, rate=310 * (1 << 20))
    live = LiveProgress(Progress(step="upload", phase=Phase.UPLOADING), "upload_version", beat)
    assert describe_progress(live) == (
        "upload (Uploading) · 3.0 GiB of 4.0 GiB at 310.0 MiB/s · upload"
    )


def test_a_dump_shows_bytes_written_only() -> None:
    beat = Heartbeat(stage="dumping", bytes=1536)
    live = LiveProgress(Progress(step="dump", phase=Phase.CAPTURING), "dump_checkpoint", beat)
    assert describe_progress(live) == "dump (Capturing) · 1.5 KiB · dumping"
