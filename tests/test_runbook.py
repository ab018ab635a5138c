"""docs/runbook.md keeps in step with the reasons: one entry per `Reason`, no entry for a
reason that no longer exists, and each entry says what to do."""

from __future__ import annotations

import re
from pathlib import Path

from api.reasons import Reason

RUNBOOK = Path(__file__).resolve().parents[1] / "docs" / "runbook.md"
NOT_FAILURES = {Reason.CAPTURED, Reason.IN_PROGRESS, Reason.RESTORED}


def entries() -> dict[str, str]:
    """`### `Reason`` heading -> the text under it."""
    text = RUNBOOK.read_text()
    parts = re.split(r"^### `([A-Za-z]+)`\n", text, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_every_reason_has_one_entry_and_no_entry_is_stale() -> None:
    found = entries()
    assert sorted(found) == sorted(reason.value for reason in Reason)
    headings = re.findall(r"^### `([A-Za-z]+)`$", RUNBOOK.read_text(), flags=re.MULTILINE)
    assert len(headings) == len(set(headings)), "a reason has two entries"


def test_each_failure_says_what_to_do() -> None:
    for reason, text in entries().items():
        if Reason(reason) in NOT_FAILURES:
            continue
        assert "**Do**:" in text, f"{reason}: no **Do**: line"
