"""Local control activities: ID claims survive crashes and races, status records name the run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from temporalio.testing import ActivityEnvironment

from activities.contracts import ClaimInput
from activities.local.state import LocalControlActivities
from api.errors import IdentityConflictError

CKPT = "96429b2725761a09"


def _claim(name: str) -> ClaimInput:
    return ClaimInput(checkpoint_id=CKPT, namespace="local", name=name)


async def test_the_owner_may_claim_again_another_may_not(tmp_path: Path) -> None:
    control = LocalControlActivities(state_dir=tmp_path)
    env = ActivityEnvironment()
    await env.run(control.claim_checkpoint_id, _claim("llama"))
    await env.run(control.claim_checkpoint_id, _claim("llama"))  # a retried claim
    with pytest.raises(IdentityConflictError, match="already owned by local/llama"):
        await env.run(control.claim_checkpoint_id, _claim("other"))
    assert [p.name for p in (tmp_path / "claims").iterdir()] == [CKPT]  # no temporaries left


async def test_claims_started_together_have_one_winner(tmp_path: Path) -> None:
    control = LocalControlActivities(state_dir=tmp_path)
    names = [f"w{i}" for i in range(8)]
    outcomes = await asyncio.gather(
        *(ActivityEnvironment().run(control.claim_checkpoint_id, _claim(n)) for n in names),
        return_exceptions=True,
    )
    assert sum(outcome is None for outcome in outcomes) == 1
    assert all(isinstance(o, IdentityConflictError) for o in outcomes if o is not None)
