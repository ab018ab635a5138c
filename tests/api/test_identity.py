"""The checkpoint ID matches Dynamo's hash, including Go's JSON escaping."""

import hashlib

import pytest
from pydantic import ValidationError

from api.identity import CheckpointIdentity, checkpoint_id, go_json, pod_checkpoint_id


def test_golden_id() -> None:
    identity = CheckpointIdentity(model="meta-llama/Llama-2-7b-hf", backendFramework="vllm")
    assert checkpoint_id(identity) == "96429b2725761a09"


def test_zero_parallelism_counts_as_one() -> None:
    a = CheckpointIdentity(model="m", backendFramework="sglang", tensorParallelSize=0)
    b = CheckpointIdentity(model="m", backendFramework="sglang", tensorParallelSize=1)
    assert checkpoint_id(a) == checkpoint_id(b)


def test_optional_fields_and_sorted_extra_parameters() -> None:
    identity = CheckpointIdentity(
        model="m",
        backendFramework="trtllm",
        frameworkVersion="0.4.1",
        dtype="bf16",
        maxModelLen=4096,
        extraParameters={"b": "2", "a": "1"},
    )
    expected = (
        '{"model":"m","backendFramework":"trtllm","frameworkVersion":"0.4.1",'
        '"tensorParallelSize":1,"pipelineParallelSize":1,"dtype":"bf16","maxModelLen":4096,'
        '"extraParameters":{"a":"1","b":"2"}}'
    )
    assert checkpoint_id(identity) == hashlib.sha256(expected.encode()).hexdigest()[:16]


def test_go_escapes() -> None:
    assert go_json({"m": "a<b>&c\u2028é"}) == '{"m":"a\\u003cb\\u003e\\u0026c\\u2028é"}'


def test_pod_id_hashes_uid_and_container() -> None:
    payload = '{"podUID":"u-1","container":"main"}'
    assert (
        pod_checkpoint_id(pod_uid="u-1", container="main")
        == (hashlib.sha256(payload.encode()).hexdigest()[:16])
    )


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValidationError, match="backendFramework"):
        CheckpointIdentity.model_validate({"model": "m", "backendFramework": "tgi"})
