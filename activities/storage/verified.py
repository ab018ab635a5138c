"""A node-local record of artifact files already hashed here, so restores skip re-hashing them.

A file is trusted without hashing only while its size, inode, mtime and ctime are exactly
what they were when its digest last matched; any write, truncation or replacement changes
ctime, so the file is hashed again (and refused if it no longer matches).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from activities.host.files import write_atomically


def _stamp(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


class VerifiedFiles:
    def __init__(self, cache_dir: Path) -> None:
        self._dir = cache_dir

    def _record(self, checkpoint_id: str, version: str) -> Path:
        return self._dir / f"{checkpoint_id}-{version}.json"

    def load(self, checkpoint_id: str, version: str) -> dict[str, tuple[list[int], str]]:
        """`relative path -> (stat stamp, sha256)` of files that matched their digest here."""
        try:
            raw = json.loads(self._record(checkpoint_id, version).read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {k: (v[0], v[1]) for k, v in raw.items()}

    def is_unchanged(
        self, known: dict[str, tuple[list[int], str]], root: Path, rel: str, sha256: str
    ) -> bool:
        entry = known.get(rel)
        return entry is not None and entry[1] == sha256 and entry[0] == _stamp(root / rel)

    def remember(
        self, checkpoint_id: str, version: str, root: Path, digests: dict[str, str]
    ) -> None:
        record = {rel: [_stamp(root / rel), sha] for rel, sha in digests.items()}
        write_atomically(self._record(checkpoint_id, version), json.dumps(record).encode())
