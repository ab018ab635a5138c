"""Captures with little frozen time (decision 0037): `criu pre-dump` rounds copy a running
tree's memory, then the final dump writes only the pages dirtied since the last round
(`--track-mem --prev-images-dir`, soft-dirty tracking).

`PreDumps` is a node's side of it: how many rounds its dumps run and whether this kernel
tracks dirty pages (`criu check --feature mem_dirty_track`, asked once). The rounds run in
`<staging>/criu-pre/<n>`; once the final dump succeeded, CRIU's `parent` symlinks are
replaced by the directories they name (`criu/parent/parent/...`), so a version holds every
image its restore reads, as plain files its digests cover. A pre-dump that cannot run or
fails leaves a plain dump, and says why (a warning, `pre_dump_fallback` in the manifest).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from temporalio import activity

from activities.criu.command import IMAGES_DIR, Criu, Probe, feature_probe, run_dump
from activities.criu.stats import frozen_ms
from api.errors import DumpFailedError
from api.manifest import CriuInfo

PRE_DUMP_FEATURE = "mem_dirty_track"
PRE_DUMPS_DIR = "criu-pre"
# In a version's root: the pre-dump rounds its images build on, or why it has none.
CAPTURE_FILE = "capture.json"
PARENT = "parent"
_REASON_CHARS = 600


@dataclass(frozen=True)
class PreDumpOutcome:
    rounds: int = 0  # pre-dump rounds the version's images build on
    fallback: str = ""  # why it has none, where some were asked for ("" otherwise)


def dirty_track_probe(criu: Criu) -> Probe:
    """Ask `criu check --feature mem_dirty_track` once, on first use."""
    return feature_probe(criu, PRE_DUMP_FEATURE)


def pre_dump_command(final: list[str], *, images: Path, parent: str | None) -> list[str]:
    """The pre-dump of what `final` (a `criu dump` command) dumps, into `images`, on the
    round in `parent` (relative to `images`) if any: the same tree, root, externals and
    freezer; it always leaves the tree running and runs no action script."""
    verb = final.index("dump")
    args: list[str] = []
    rest = iter(final[verb + 1 :])
    for arg in rest:
        if arg == "--leave-running":
            continue
        if arg in ("--action-script", "--images-dir"):
            next(rest)
            continue
        args.append(arg)
    chain = ["--prev-images-dir", parent] if parent else []
    return [*final[:verb], "pre-dump", *args, "--images-dir", str(images), "--track-mem", *chain]


def on_parent(final: list[str], parent: str) -> list[str]:
    """`final` writing only the pages dirtied since the round in `parent`."""
    return [*final, "--track-mem", "--prev-images-dir", parent]


class PreDumps:
    """How many pre-dump rounds this node's dumps run, and whether they can run here."""

    def __init__(self, *, criu: Criu, rounds: int, probe: Probe | None = None) -> None:
        self.rounds = rounds
        self._probe = probe or dirty_track_probe(criu)

    def unavailable(self) -> str:
        return self._probe() if self.rounds else ""

    async def dump(
        self,
        command: list[str],
        images: Path,
        *,
        what: str,
        env: dict[str, str] | None = None,
    ) -> PreDumpOutcome:
        """Run the dump `command` into `images` (`<staging>/criu`) after the pre-dump
        rounds; any failure of theirs leaves a plain dump. Only the final dump's failure
        fails (DumpFailed, as `run_dump`)."""
        if not self.rounds:
            await run_dump(command, images, what=what, env=env)
            return PreDumpOutcome()
        staging = images.parent
        rounds = staging / PRE_DUMPS_DIR
        why = self.unavailable() or await self._pre_dump(command, rounds, what=what)
        if not why:
            try:
                await run_dump(
                    on_parent(command, f"../{PRE_DUMPS_DIR}/{self.rounds}"),
                    images,
                    what=what,
                    env=env,
                )
                await asyncio.to_thread(fold_parents, images, rounds)
                return self._record(staging, PreDumpOutcome(rounds=self.rounds))
            except DumpFailedError as err:
                why = f"the dump on {self.rounds} pre-dump round(s) failed: {err}"
                await asyncio.to_thread(_empty, images)
        await asyncio.to_thread(shutil.rmtree, rounds, True)
        why = why[:_REASON_CHARS]
        activity.logger.warning("%s: a plain dump, without pre-dumps: %s", what, why)
        await run_dump(command, images, what=what, env=env)
        return self._record(staging, PreDumpOutcome(fallback=why))

    async def _pre_dump(self, command: list[str], rounds: Path, *, what: str) -> str:
        """Run the rounds; "" once all succeeded, else why not."""
        for n in range(1, self.rounds + 1):
            images = rounds / str(n)
            images.mkdir(parents=True)
            parent = f"../{n - 1}" if n > 1 else None
            try:
                await run_dump(
                    pre_dump_command(command, images=images, parent=parent),
                    images,
                    what=f"{what}: pre-dump {n} of {self.rounds}",
                )
            except DumpFailedError as err:
                return str(err)
            activity.logger.info("%s: pre-dump %d of %d done", what, n, self.rounds)
        return ""

    @staticmethod
    def _record(staging: Path, outcome: PreDumpOutcome) -> PreDumpOutcome:
        record = {"pre_dumps": outcome.rounds, "pre_dump_fallback": outcome.fallback}
        (staging / CAPTURE_FILE).write_text(json.dumps(record) + "\n")
        return outcome


def fold_parents(images: Path, rounds: Path) -> None:
    """Replace each `parent` symlink of the chain from `images` by the round directory it
    names (which must be one in `rounds`), then remove `rounds`: no link is left, every
    image lies under `images`."""
    chain = [images]
    while (link := chain[-1] / PARENT).is_symlink():
        target = (chain[-1] / os.readlink(link)).resolve()
        if target.parent != rounds.resolve() or not target.is_dir() or target in chain:
            raise DumpFailedError(f"{link}: names {target}, not a pre-dump round of {rounds}")
        chain.append(target)
    # From the oldest round up, so that each relative link is read where CRIU wrote it.
    for child, parent in reversed(list(itertools.pairwise(chain))):
        (child / PARENT).unlink()
        parent.rename(child / PARENT)
    shutil.rmtree(rounds, ignore_errors=True)


def _empty(images: Path) -> None:
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir()


def capture_record(staging: Path) -> dict[str, object]:
    """What a capture recorded about itself (`CAPTURE_FILE`, absent without pre-dumps)."""
    try:
        record = json.loads((staging / CAPTURE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def captured_criu_info(node: CriuInfo, staging: Path) -> CriuInfo:
    """`node`'s CRIU facts with what this capture recorded: its frozen time, pre-dumps."""
    record = capture_record(staging)
    try:
        frozen: float | None = frozen_ms(staging / IMAGES_DIR)
    except (OSError, ValueError, IndexError):
        frozen = None
    rounds = record.get("pre_dumps", 0)
    fallback = record.get("pre_dump_fallback", "")
    return node.model_copy(
        update={
            "frozen_ms": frozen,
            "pre_dumps": rounds if isinstance(rounds, int) else 0,
            "pre_dump_fallback": fallback if isinstance(fallback, str) else "",
        }
    )
