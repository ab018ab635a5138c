"""CatalogWorkflow: the CLI's question about the checkpoint store, answered on the control
queue, whose worker mounts the store (the checkpoints PVC on a cluster, the state
directory locally) and reaches the remote store: `warmstart list`, `describe` and
`quarantine` work from any machine that reaches Temporal, never from the node's disk.

One activity; its failure (a name not found, say) fails the run with the same reason, for
the CLI to report as the activity's.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.contracts import CatalogAnswer, CatalogQuery
    from activities.steps import CatalogSteps
    from api.naming import CATALOG_WORKFLOW
    from workflows import policies


@workflow.defn(name=CATALOG_WORKFLOW, failure_exception_types=policies.FAILING_EXCEPTIONS)
class CatalogWorkflow:
    @workflow.run
    async def run(self, request: CatalogQuery) -> CatalogAnswer:
        try:
            return await workflow.execute_activity_method(
                CatalogSteps.answer_catalog,
                request,
                start_to_close_timeout=policies.CONTROL.start_to_close,
                retry_policy=policies.CONTROL.retry,
                summary=f"{request.action} {request.ref}".strip(),
            )
        except ActivityError as err:
            failure = policies.step_failure(err, node="control")
            raise ApplicationError(
                failure.message, type=failure.reason.value, non_retryable=True
            ) from None
