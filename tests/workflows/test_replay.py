"""Workflow code still replays the histories recorded from real runs (tests/histories/)."""

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from workflows.capture import CaptureWorkflow
from workflows.restore import RestoreWorkflow

HISTORIES = sorted((Path(__file__).parents[1] / "histories").glob("*.json"))


def test_histories_are_committed() -> None:
    names = {p.name for p in HISTORIES}
    recorded = {"capture-local", "capture-local-failed", "capture-local-cancelled"}
    recorded |= {"restore-local", "restore-local-attrs-upserted"}
    recorded |= {"capture-local-verified", "capture-local-verify-failed"}
    assert {f"{name}.json" for name in recorded} <= names


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_replays_without_nondeterminism(path: Path) -> None:
    replayer = Replayer(
        workflows=[CaptureWorkflow, RestoreWorkflow], data_converter=pydantic_data_converter
    )
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    result = await replayer.replay_workflow(history, raise_on_replay_failure=True)
    assert result.replay_failure is None
