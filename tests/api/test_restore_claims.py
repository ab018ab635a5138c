"""What a node restores into a restore-target pod: the Checkpoint of the pod's own namespace,
never what the pod's labels and annotations say; a pod that says anything else is refused,
in words that name only its own namespace's objects."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from api.errors import CheckpointNotFoundError, ForbiddenError
from api.restore_claims import RestoreClaims, check_claims
from api.storage import RemoteStorage

CKPT, VERSION = "96429b2725761a09", "20261127T120000Z-abcdef"
OTHER_CKPT = "0123456789abcdef"  # another namespace's checkpoint, say
TEMPLATE = {"spec": {"containers": [{"name": "main", "image": "vllm"}]}}


def checkpoint(namespace: str = "team-b", **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "warmstart.dev/v1alpha1",
        "kind": "Checkpoint",
        "metadata": {"name": "llama", "namespace": namespace},
        "spec": {
            "identity": {"model": "meta-llama/Llama-2-7b-hf", "backendFramework": "vllm"},
            "job": {"podTemplateSpec": TEMPLATE},
            "storage": {
                "type": "s3",
                "s3": {"bucket": "team-b", "endpoint": "http://s3.b", "credentialsSecret": "keys"},
            },
        },
        "status": {
            "phase": "Ready",
            "checkpointID": CKPT,
            "version": VERSION,
            "storageURI": f"s3://team-b/fleet/{CKPT}/versions/{VERSION}/",
            **status,
        },
    }


def pod(*, labels: dict[str, str] | None = None, notes: dict[str, str] | None = None) -> Any:
    return {
        "metadata": {
            "name": "llama-0",
            "namespace": "team-b",
            "uid": "uid-1",
            "labels": {
                "warmstart.dev/restore-target": "true",
                "warmstart.dev/checkpoint-id": CKPT,
                **(labels or {}),
            },
            "annotations": {
                "warmstart.dev/restore-from": "llama",
                "warmstart.dev/checkpoint-version": VERSION,
                **(notes or {}),
            },
        }
    }


WHERE = RemoteStorage(
    bucket="team-b",
    prefix="fleet",
    endpoint="http://s3.b",
    credentials_secret="keys",
    secret_namespace="team-b",
)


def test_what_is_restored_comes_from_the_checkpoint() -> None:
    assert check_claims(pod(), checkpoint()) == RestoreClaims(CKPT, VERSION, WHERE)


def test_a_storage_annotation_an_older_webhook_wrote_is_accepted_when_it_agrees() -> None:
    notes = {"warmstart.dev/storage": WHERE.model_dump_json(exclude_defaults=True)}
    assert check_claims(pod(notes=notes), checkpoint()).storage == WHERE


@pytest.mark.parametrize(
    ("labels", "notes", "says"),
    [
        (
            {"warmstart.dev/checkpoint-id": OTHER_CKPT},
            {},
            f"label warmstart.dev/checkpoint-id '{OTHER_CKPT}' is not the ID of checkpoint llama",
        ),
        (
            {},
            {"warmstart.dev/checkpoint-version": "20261127T000000Z-000000"},
            "annotation warmstart.dev/checkpoint-version '20261127T000000Z-000000' is not the "
            "version of checkpoint llama",
        ),
        (
            {},
            {
                "warmstart.dev/storage": json.dumps(
                    {
                        "bucket": "team-b",
                        "prefix": "fleet",
                        "endpoint": "http://attacker:9000",
                        "credentials_secret": "s3-keys",
                        "secret_namespace": "team-a",
                    }
                )
            },
            "annotation warmstart.dev/storage does not name where checkpoint llama is stored",
        ),
        (
            {},
            {"warmstart.dev/storage": "{not json"},
            "annotation warmstart.dev/storage does not name where checkpoint llama is stored",
        ),
        (
            {},
            {"warmstart.dev/restore-from": "team-a/llama"},
            "not a restore target of this namespace: metadata.annotations"
            "[warmstart.dev/restore-from]: 'team-a/llama' names a Checkpoint in another "
            "namespace",
        ),
    ],
    ids=["forged-id", "forged-version", "forged-storage", "unreadable-storage", "other-namespace"],
)
def test_a_pod_that_says_anything_else_is_refused(
    labels: dict[str, str], notes: dict[str, str], says: str
) -> None:
    with pytest.raises(ForbiddenError) as refused:
        check_claims(pod(labels=labels, notes=notes), checkpoint())
    assert str(refused.value).startswith(says)
    assert "team-a" not in str(refused.value).replace("'team-a/llama'", "")


def test_a_pod_that_names_no_checkpoint_is_refused() -> None:
    body = pod()
    del body["metadata"]["annotations"]["warmstart.dev/restore-from"]
    with pytest.raises(ForbiddenError, match=r"the pod names no Checkpoint"):
        check_claims(body, None)


def test_a_checkpoint_read_from_another_namespace_is_refused() -> None:
    """However it came to be asked: only the pod's own namespace's Checkpoint counts."""
    with pytest.raises(ForbiddenError, match="checkpoint llama was not read from the pod's"):
        check_claims(pod(), checkpoint("team-a"))


def test_a_checkpoint_that_is_gone_or_not_ready_restores_nothing() -> None:
    with pytest.raises(CheckpointNotFoundError, match=r"^checkpoint llama not found$"):
        check_claims(pod(), None)
    capturing = checkpoint()
    capturing["status"] = {"phase": "Capturing"}
    with pytest.raises(CheckpointNotFoundError, match=r"is not Ready \(phase Capturing\)"):
        check_claims(pod(), capturing)


def test_the_pod_is_not_changed() -> None:
    body = pod()
    before = copy.deepcopy(body)
    check_claims(body, checkpoint())
    assert body == before
