"""Search attributes and progress bookkeeping shared by the workflows."""

from __future__ import annotations

from datetime import datetime

from temporalio import workflow
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

from api.errors import PipelineFailedError
from api.reasons import Phase
from workflows.contracts import Progress

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
            _set_phase(phase)

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
            _set_phase(phase)


def _set_phase(phase: Phase) -> None:
    """Upsert the phase unless the run already carries it (set by the starter)."""
    if workflow.info().typed_search_attributes.get(PHASE) != phase.value:
        workflow.upsert_search_attributes([PHASE.value_set(phase.value)])


def start_attributes(
    *, namespace: str, checkpoint_id: str, node: str, phase: Phase
) -> TypedSearchAttributes:
    """Search attributes a starter sets, so the first workflow task need not upsert them
    (a refused restore has no checkpoint ID)."""
    pairs = [
        SearchAttributePair(NAMESPACE, namespace),
        SearchAttributePair(CHECKPOINT_ID, checkpoint_id),
        SearchAttributePair(NODE, node),
        SearchAttributePair(PHASE, phase.value),
    ]
    return TypedSearchAttributes([pair for pair in pairs if pair.value])


def index(*, namespace: str, checkpoint_id: str, node: str) -> None:
    """Make the run findable by namespace, checkpoint ID and node in the Web UI and CLI
    (an upsert only where the starter did not set them already; an unknown node, empty,
    is indexed once the pod is scheduled)."""
    current = workflow.info().typed_search_attributes
    wanted = ((NAMESPACE, namespace), (CHECKPOINT_ID, checkpoint_id), (NODE, node))
    missing = [key.value_set(value) for key, value in wanted if value and current.get(key) != value]
    if missing:
        workflow.upsert_search_attributes(missing)


class PipelineState:
    """What a workflow's `progress` query shows: its step clock, identifiers and error."""

    def __init__(self) -> None:
        self.clock = StepClock()
        self.checkpoint_id = ""
        self.node = ""
        self.version = ""
        self.error = ""

    def failed(self, failure: PipelineFailedError, phase: Phase, step: str) -> None:
        self.error = f"{failure.reason}: {failure.message}"
        self.clock.settle(phase, step)

    def progress(self) -> Progress:
        return Progress(
            step=self.clock.step,
            phase=self.clock.phase,
            checkpoint_id=self.checkpoint_id,
            version=self.version,
            node=self.node,
            step_seconds=dict(self.clock.seconds),
            error=self.error,
        )
