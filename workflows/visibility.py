"""Search attributes and progress bookkeeping shared by the workflows."""

from __future__ import annotations

from datetime import datetime

from temporalio import workflow
from temporalio.common import SearchAttributeKey

from api.reasons import Phase

PHASE = SearchAttributeKey.for_keyword("WarmstartPhase")
NODE = SearchAttributeKey.for_keyword("WarmstartNode")
CHECKPOINT_ID = SearchAttributeKey.for_keyword("WarmstartCheckpointID")
NAMESPACE = SearchAttributeKey.for_keyword("WarmstartNamespace")
ALL_KEYS = (PHASE, NODE, CHECKPOINT_ID, NAMESPACE)


class StepClock:
    """Times workflow steps with `workflow.now()` (replay-safe) and tracks the current one."""

    def __init__(self) -> None:
        self.step = "pending"
        self.phase = Phase.PENDING
        self.seconds: dict[str, float] = {}
        self._started: datetime | None = None

    def begin(self, step: str, phase: Phase | None = None) -> None:
        self.end()
        self.step, self._started = step, workflow.now()
        if phase is not None and phase != self.phase:
            self.phase = phase
            workflow.upsert_search_attributes([PHASE.value_set(phase.value)])

    def end(self) -> None:
        if self._started is not None:
            elapsed = (workflow.now() - self._started).total_seconds()
            self.seconds[self.step] = round(elapsed, 3)
            self._started = None

    def settle(self, phase: Phase, step: str) -> None:
        self.end()
        self.step = step
        if phase != self.phase:
            self.phase = phase
            workflow.upsert_search_attributes([PHASE.value_set(phase.value)])
