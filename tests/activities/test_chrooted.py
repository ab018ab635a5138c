"""The rootfs diff's extraction where Python has no tarfile filters (before 3.11.4, as
Debian 12's 3.11.2 in the image): the same rules by hand."""

from __future__ import annotations

import io
import stat
import tarfile
from pathlib import Path

from activities.runtime.chrooted import extract_checked


def _archive() -> io.BytesIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        data = b"payload"
        setuid = tarfile.TarInfo("/usr/bin/tool")  # absolute: lands under the destination
        setuid.size, setuid.mode = len(data), 0o4777
        tar.addfile(setuid, io.BytesIO(data))
        device = tarfile.TarInfo("dev/evil")
        device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
        tar.addfile(device)
        fifo = tarfile.TarInfo("run/pipe")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
        link = tarfile.TarInfo("usr/bin/alias")
        link.type, link.linkname, link.mode = tarfile.LNKTYPE, "/usr/bin/tool", 0o2775
        tar.addfile(link)
    out.seek(0)
    return out


def test_set_id_and_shared_write_bits_cleared_devices_and_fifos_left_out(tmp_path: Path) -> None:
    with tarfile.open(fileobj=_archive(), mode="r:") as tar:
        extract_checked(tar, str(tmp_path))
    tool = tmp_path / "usr" / "bin" / "tool"
    assert tool.read_bytes() == b"payload"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o755
    assert (tmp_path / "usr" / "bin" / "alias").read_bytes() == b"payload"
    assert not (tmp_path / "dev" / "evil").exists()
    assert not (tmp_path / "run" / "pipe").exists()
