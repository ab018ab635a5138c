"""What a restore-target pod restores, and how a node checks what the pod says about it:
pure functions over the pod and its Checkpoint (plain dicts, as the API server gives them).

A pod asks to be restored with `warmstart.dev/restore-from: <Checkpoint>`, a Checkpoint of its
own namespace. The webhook (`api.restore_pods`) writes on the pod the ID label and the
version annotation of that Checkpoint's claims (`restore_claims`): a node never trusts them.
It reads the Checkpoint of that name from the pod's own namespace and restores what that
says, once `check_claims` finds the pod's labels and annotations in agreement; a pod that
names no Checkpoint, or says anything else (a label forged or copied from another
namespace's pod, a storage annotation pointing elsewhere, a Checkpoint since replaced), is
refused.

A verified capture's verification pod (decision 0045) is the one exception to "Ready only":
the Checkpoint's `status.verifying` names that pod by UID and the version it restores, held
back on the capturing node (`verification_claims`). Only the pod with that UID restores that
version; any other pod naming the Checkpoint is checked as above, and one labelled
`warmstart.dev/verification` (which the webhook does not shape) is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from api.errors import CheckpointNotFoundError, ForbiddenError, InvalidSpecError
from api.reasons import Phase
from api.resources import CHECKPOINT_ID_LABEL, GROUP, VERIFICATION_LABEL, Checkpoint
from api.storage import RemoteStorage, resource_storage, stored_at

RESTORE_FROM_ANNOTATION = f"{GROUP}/restore-from"
CHECKPOINT_VERSION_ANNOTATION = f"{GROUP}/checkpoint-version"
# Where the node fetches the version, as older webhooks wrote it on the pod
# (api.storage.RemoteStorage as JSON). No longer written: the node derives the location from
# the Checkpoint, and refuses a pod whose annotation names another.
STORAGE_ANNOTATION = f"{GROUP}/storage"

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")  # a DNS subdomain, as object names


def restore_source(pod: Mapping[str, Any]) -> str | None:
    """The name of the Checkpoint `pod` asks to restore from (same namespace), None when it
    does not ask; InvalidSpecError for a name that is not one (another namespace's)."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    name = annotations.get(RESTORE_FROM_ANNOTATION)
    if name is None:
        return None
    where = f"metadata.annotations[{RESTORE_FROM_ANNOTATION}]"
    if "/" in name:
        raise InvalidSpecError(
            f"{where}: {name!r} names a Checkpoint in another namespace; a pod restores "
            "only from a Checkpoint of its own namespace (give the name alone)"
        )
    if not _NAME.match(name) or len(name) > 253:
        raise InvalidSpecError(f"{where}: {name!r} is not a Checkpoint name")
    return str(name)


@dataclass(frozen=True)
class RestoreClaims:
    """What a restore target restores, as its Checkpoint says: the ID and version, and where
    the version is stored when the node does not hold it (None: the node's checkpoint
    root). Credentials, if any, are a Secret of the Checkpoint's own namespace."""

    checkpoint_id: str
    version: str
    storage: RemoteStorage | None
    # The SHA-256 of the version's manifest its capture recorded ("": captured before it was).
    manifest_sha256: str = ""
    # A verification pod's: the version is held back on the capturing node, not yet offered.
    unverified: bool = False


def ready_checkpoint(checkpoint: Mapping[str, Any] | None, *, name: str) -> Checkpoint | str:
    """The Checkpoint `name` (as read; None: not found) when a pod can be restored from it:
    Ready, valid, with an ID and a version. Otherwise why not, in words for the pod's
    status."""
    if checkpoint is None:
        return f"checkpoint {name} not found"
    phase = (checkpoint.get("status") or {}).get("phase") or Phase.PENDING.value
    if phase != Phase.READY.value:
        return f"checkpoint {name} is not Ready (phase {phase})"
    try:
        resource = Checkpoint.model_validate(checkpoint)
    except ValidationError as err:
        return f"checkpoint {name} is not valid: {validation_message(err)}"
    status = resource.status
    if status is None or not status.checkpoint_id or not status.version:
        return f"checkpoint {name} is Ready but has no checkpointID or version"
    return resource


def restore_claims(resource: Checkpoint) -> RestoreClaims:
    """What a pod restoring from the Ready Checkpoint `resource` restores (see
    `ready_checkpoint`): its version and that version's location, derived from the
    resource alone (its `storageURI`, with the endpoint and Secret its `spec.storage` names;
    a Secret only ever of its own namespace)."""
    status = resource.status
    assert status is not None  # ready_checkpoint made sure
    stored = stored_at(
        status.storage_uri,
        checkpoint_id=status.checkpoint_id,
        version=status.version,
        spec=resource_storage(
            resource.spec.storage, namespace=resource.metadata.namespace, default=None
        ),
    )
    return RestoreClaims(
        checkpoint_id=status.checkpoint_id,
        version=status.version,
        storage=stored,
        manifest_sha256=status.manifest_sha256,
    )


def verification_claims(
    checkpoint: Mapping[str, Any] | None, *, pod_uid: str
) -> RestoreClaims | None:
    """What the verification pod with UID `pod_uid` restores: the version the Checkpoint's
    `status.verifying` names for that very pod (held back, on the node's own store), or None
    when the Checkpoint verifies nothing or verifies it in another pod."""
    if checkpoint is None or not pod_uid:
        return None
    verifying = ((checkpoint.get("status") or {}).get("verifying")) or {}
    if not isinstance(verifying, Mapping) or verifying.get("podUID") != pod_uid:
        return None
    try:
        resource = Checkpoint.model_validate(checkpoint)
    except ValidationError:
        return None
    status = resource.status
    if status is None or status.verifying is None or not status.verifying.version:
        return None
    return RestoreClaims(
        checkpoint_id=status.checkpoint_id or resource.checkpoint_id,
        version=status.verifying.version,
        storage=None,  # not uploaded before it is verified: the capturing node holds it
        manifest_sha256=status.verifying.manifest_sha256,
        unverified=True,
    )


def check_claims(pod: Mapping[str, Any], checkpoint: Mapping[str, Any] | None) -> RestoreClaims:
    """What a node restores into restore-target `pod`: the claims of `checkpoint`, the
    Checkpoint its `restore-from` annotation names as the node read it from the pod's own
    namespace (None: not there). Nothing of the pod is trusted: a pod that names no
    Checkpoint, or whose ID label, version annotation or storage annotation differ from
    what that Checkpoint says (forged, copied from another namespace's pod, or left from a
    Checkpoint since replaced), is refused with ForbiddenError; a Checkpoint that is gone or
    not Ready is CheckpointNotFoundError, unless the pod is the one its `status.verifying`
    names by UID (`verification_claims`). The messages name only the pod's own namespace's
    objects and what the pod itself says."""
    meta = pod.get("metadata") or {}
    labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
    namespace = meta.get("namespace", "")
    try:
        name = restore_source(pod)
    except InvalidSpecError as err:
        raise ForbiddenError(f"not a restore target of this namespace: {err}") from None
    if name is None:
        raise ForbiddenError(
            f"the pod names no Checkpoint ({RESTORE_FROM_ANNOTATION}): only pods shaped from a "
            "Checkpoint of their own namespace are restored"
        )
    if checkpoint is not None and (checkpoint.get("metadata") or {}).get("namespace") != namespace:
        raise ForbiddenError(f"checkpoint {name} was not read from the pod's namespace")
    claims = verification_claims(checkpoint, pod_uid=str(meta.get("uid") or ""))
    if claims is None and labels.get(VERIFICATION_LABEL) == "true":
        # The webhook leaves such a pod as it is: only the pod its Checkpoint names is one.
        raise ForbiddenError(
            f"the pod is labelled {VERIFICATION_LABEL}, and checkpoint {name} verifies no "
            "pod of its UID"
        )
    if claims is None:
        resource = ready_checkpoint(checkpoint, name=name)
        if isinstance(resource, str):
            raise CheckpointNotFoundError(resource)
        claims = restore_claims(resource)
    said = labels.get(CHECKPOINT_ID_LABEL, "")
    if said != claims.checkpoint_id:
        raise ForbiddenError(
            f"label {CHECKPOINT_ID_LABEL} {said!r} is not the ID of checkpoint {name} "
            f"({claims.checkpoint_id})"
        )
    said = notes.get(CHECKPOINT_VERSION_ANNOTATION, "")
    if said != claims.version:
        raise ForbiddenError(
            f"annotation {CHECKPOINT_VERSION_ANNOTATION} {said!r} is not the version of "
            f"checkpoint {name} ({claims.version})"
        )
    if STORAGE_ANNOTATION in notes and not _same_location(notes[STORAGE_ANNOTATION], claims):
        raise ForbiddenError(
            f"annotation {STORAGE_ANNOTATION} does not name where checkpoint {name} is stored"
        )
    return claims


def _same_location(raw: str, claims: RestoreClaims) -> bool:
    try:
        said = RemoteStorage.model_validate_json(raw)
    except ValidationError:
        return False
    return said == claims.storage


def validation_message(err: ValidationError) -> str:
    """A pydantic error as one line: each problem with its field, the rules' own messages
    (which name their field) as written."""
    parts = []
    for problem in err.errors():
        text = str(problem["ctx"]["error"]) if problem["type"] == "value_error" else problem["msg"]
        where = ".".join(str(p) for p in problem["loc"])
        parts.append(
            text if text.startswith(("spec.", "metadata.")) or not where else f"{where}: {text}"
        )
    return "; ".join(parts)
