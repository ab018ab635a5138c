"""The resource models: validation with specific messages, the generated CRDs (committed
copies equal, structural, CEL rules evaluated with a CEL library since kmock runs none)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from pydantic import ValidationError

from api.crds import all_crds, render
from api.resources import (
    ENV_ONE_SOURCE,
    ENV_VALUE_AND_SOURCE,
    IDENTITY_IMMUTABLE,
    LOADER_ON_CHECKPOINT,
    SAVER_WITHOUT_GMS,
    Checkpoint,
    PodSnapshot,
    ResourceIdentity,
    identity_unchanged,
)

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "deploy" / "crds"
TEMPLATE = {"spec": {"containers": [{"name": "main", "image": "vllm/vllm-openai:v0.8.0"}]}}


def checkpoint(spec: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    base = {
        "identity": {"model": "meta-llama/Llama-2-7b-hf", "backendFramework": "vllm"},
        "job": {"podTemplateSpec": TEMPLATE},
    }
    return {
        "apiVersion": "warmstart.dev/v1alpha1",
        "kind": "Checkpoint",
        "metadata": {"name": "llama", "namespace": "inference", **meta},
        "spec": {**base, **(spec or {})},
    }


def test_a_checkpoint_has_the_golden_id() -> None:
    resource = Checkpoint.model_validate(checkpoint())
    assert resource.checkpoint_id == "96429b2725761a09"
    assert resource.spec.job.target_container_name == "main"
    assert resource.spec.job.active_deadline_seconds == 3600


def test_a_pod_snapshot_without_identity_hashes_its_pod() -> None:
    snap = PodSnapshot.model_validate(
        {
            "metadata": {"name": "s", "namespace": "n"},
            "spec": {"source": {"podRef": {"name": "p", "uid": "u-1", "containers": ["main"]}}},
        }
    )
    other = snap.model_copy(update={"spec": snap.spec.model_copy(update={"identity": None})})
    assert snap.checkpoint_id == other.checkpoint_id and len(snap.checkpoint_id) == 16


GMS_ON = {"enabled": True, "checkpoint": {"saver": {"image": "gms:1"}}}
SECRET = {"secretKeyRef": {"name": "hf", "key": "token"}}
FIELD = {"fieldRef": {"fieldPath": "metadata.uid"}}


def saver_envs(*envs: dict[str, Any]) -> dict[str, Any]:
    return {"gpuMemoryService": {"enabled": True, "checkpoint": {"saver": {"envs": list(envs)}}}}


@pytest.mark.parametrize(
    ("spec", "meta", "message"),
    [
        ({"identity": {"backendFramework": "vllm"}}, {}, "identity.model\n  Field required"),
        ({"identity": {"model": "m"}}, {}, "identity.backendFramework\n  Field required"),
        ({"identity": {"model": "m", "backendFramework": "tgi"}}, {}, "'vllm', 'sglang'"),
        (
            {"identity": {"model": "m", "backendFramework": "vllm", "tensorParallelSize": 0}},
            {},
            "tensorParallelSize\n  Input should be greater than or equal to 1",
        ),
        (
            {"identity": {"model": "m", "backendFramework": "vllm", "pipelineParallelSize": -2}},
            {},
            "pipelineParallelSize\n  Input should be greater than or equal to 1",
        ),
        ({}, {"name": "../../etc"}, "metadata name or namespace '../../etc' must match"),
        ({}, {"namespace": ".."}, "metadata name or namespace '..' must match"),
        (
            {"gpuMemoryService": {"checkpoint": {"saver": {"image": "gms:1"}}}},
            {},
            SAVER_WITHOUT_GMS,
        ),
        (
            {"gpuMemoryService": {"enabled": True, "checkpoint": {"loader": {"image": "l:1"}}}},
            {},
            LOADER_ON_CHECKPOINT,
        ),
        (
            {"job": {"podTemplateSpec": TEMPLATE, "targetContainerName": "engine"}},
            {},
            "targetContainerName 'engine' is not a container of podTemplateSpec",
        ),
        (
            {"job": {"podTemplateSpec": TEMPLATE, "activeDeadlineSeconds": 10**9}},
            {},
            "activeDeadlineSeconds\n  Input should be less than or equal to 86400",
        ),
        ({"storage": {"type": "s3"}}, {}, "storage type 's3' needs storage.s3"),
        (
            {"storage": {"type": "s3", "s3": {"bucket": "../b"}}},
            {},
            "storage.s3.bucket\n  String should match pattern",
        ),
        (
            {
                "gpuMemoryService": {
                    "enabled": True,
                    "checkpoint": {
                        "saver": {
                            "envs": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]
                        }
                    },
                }
            },
            {},
            "env names must be unique",
        ),
        (
            saver_envs({"name": "A", "value": "1", "valueFrom": SECRET}),
            {},
            f"gpuMemoryService.checkpoint.saver.envs.0\n  Value error, {ENV_VALUE_AND_SOURCE}",
        ),
        (
            saver_envs({"name": "A", "valueFrom": {}}),
            {},
            f"saver.envs.0.valueFrom\n  Value error, {ENV_ONE_SOURCE}",
        ),
        (saver_envs({"name": "A", "valueFrom": {**SECRET, **FIELD}}), {}, ENV_ONE_SOURCE),
        (
            saver_envs({"name": "A", "valueFrom": {"secretKeyRef": {"name": "hf"}}}),
            {},
            "valueFrom.secretKeyRef.key\n  Field required",
        ),
        (
            saver_envs({"name": "A", "valueFrom": {"resourceFieldRef": {"divisor": "1Mi"}}}),
            {},
            "valueFrom.resourceFieldRef.resource\n  Field required",
        ),
        (
            saver_envs(
                {"name": "A", "valueFrom": {"resourceFieldRef": {"resource": "x", "divisor": "MB"}}}
            ),
            {},
            "resourceFieldRef.divisor\n  String should match pattern",
        ),
        (
            # An empty label map selects every node: a prefetch to the whole cluster.
            {"prefetch": {"nodeSelectors": [{"zone": "a"}, {}]}},
            {},
            "prefetch.nodeSelectors.1\n  Dictionary should have at least 1 item",
        ),
    ],
)
def test_bad_checkpoints_are_refused_by_field(
    spec: dict[str, Any], meta: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as err:
        Checkpoint.model_validate(checkpoint(spec, **meta))
    assert message in str(err.value)


def test_gms_forms_that_are_accepted() -> None:
    for gms in ({"checkpoint": {}}, {}, GMS_ON, {"enabled": True, "mode": "interPod"}):
        Checkpoint.model_validate(checkpoint({"gpuMemoryService": gms}))


@pytest.mark.parametrize(
    "env",
    [
        {"name": "A"},
        {"name": "A", "value": ""},
        {"name": "A", "valueFrom": SECRET},
        {"name": "A", "value": "", "valueFrom": FIELD},  # Kubernetes allows an empty value
        {
            "name": "A",
            "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k", "optional": True}},
        },
        {
            "name": "A",
            "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName", "apiVersion": "v1"}},
        },
        {
            "name": "A",
            "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}},
        },
    ],
)
def test_override_envs_take_kubernetes_env_vars(env: dict[str, Any]) -> None:
    resource = Checkpoint.model_validate(checkpoint(saver_envs(env)))
    gms = resource.spec.gpu_memory_service.checkpoint
    assert gms is not None and gms.saver is not None
    [parsed] = gms.saver.envs
    assert parsed.model_dump(by_alias=True, exclude_none=True) == env
    assert cel_errors(_checkpoint_schema(), checkpoint(saver_envs(env))) == []


def test_a_pod_snapshot_names_exactly_one_container() -> None:
    ref = {"name": "p", "uid": "u", "containers": ["a", "b"]}
    with pytest.raises(ValidationError, match=r"podRef.containers\n  List should have at most 1"):
        PodSnapshot.model_validate({"metadata": {"name": "s"}, "spec": {"source": {"podRef": ref}}})


def test_identity_cannot_change() -> None:
    old = ResourceIdentity(model="a", backendFramework="vllm")
    identity_unchanged(old, old.model_copy())
    with pytest.raises(ValueError, match=r"spec\.identity is immutable"):
        identity_unchanged(old, old.model_copy(update={"model": "b"}))


# --- the generated CRDs ---------------------------------------------------------------


def test_committed_crds_are_the_generated_ones() -> None:
    generated = all_crds()
    committed = [p.name for p in CRDS.glob("*.yaml") if p.name != "kustomization.yaml"]
    assert sorted(committed) == sorted(generated)
    for name, definition in generated.items():
        assert (CRDS / name).read_text() == render(definition), (
            f"deploy/crds/{name} is stale: run `warmstart crds --write deploy/crds`"
        )


def test_warmstart_crds_prints_them_for_kubectl() -> None:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "warmstart"), "crds"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    docs = list(yaml.safe_load_all(out))
    assert [d["spec"]["names"]["shortNames"] for d in docs] == [["ckpt"], ["podsnap"]]
    assert docs == list(all_crds().values())


def _walk(node: dict[str, Any], path: str) -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        found += _walk(sub, f"{path}.{name}")
    if "items" in node:
        found += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _walk(node["additionalProperties"], f"{path}{{}}")
    return found


@pytest.mark.parametrize("name", sorted(all_crds()))
def test_schemas_are_structural(name: str) -> None:
    version = all_crds()[name]["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == [
        "Model",
        "Backend",
        "Phase",
        "CheckpointID",
        "Node",
        "Age",
        "Version",
        "Schedule",
    ]
    for path, node in _walk(version["schema"]["openAPIV3Schema"], ""):
        assert not {"$ref", "anyOf", "allOf", "oneOf", "title", "$defs"} & set(node), path
        assert "type" in node, f"{path}: no type"
        assert not ("properties" in node and "additionalProperties" in node), path


def test_lists_keyed_like_kubernetes() -> None:
    schema = all_crds()["checkpoints.warmstart.dev.yaml"]["spec"]["versions"][0]["schema"]
    nodes = dict(_walk(schema["openAPIV3Schema"], ""))
    saver = ".spec.gpuMemoryService.checkpoint.saver"
    assert nodes[f"{saver}.envs"]["x-kubernetes-list-map-keys"] == ["name"]
    assert nodes[f"{saver}.volumeMounts"]["x-kubernetes-list-map-keys"] == ["mountPath"]
    assert nodes[".status.conditions"]["x-kubernetes-list-type"] == "map"
    assert nodes[".spec.job.podTemplateSpec"]["x-kubernetes-preserve-unknown-fields"] is True
    assert nodes[".spec.identity.model"]["description"]  # for kubectl explain


# --- CEL rules, evaluated as the API server would --------------------------------------

_CEL = celpy.Environment()


def cel_errors(
    node: dict[str, Any], new: Any, old: Any = None, *, has_old: bool = False
) -> list[str]:
    """Messages of the rules that fail for `new` (and `old`, for transition rules)."""
    errors = []
    for rule in node.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"] and not has_old:
            continue  # transition rules run on updates where the field existed
        activation = {"self": celpy.json_to_cel(new)}
        if has_old:
            activation["oldSelf"] = celpy.json_to_cel(old)
        program = _CEL.program(_CEL.compile(rule["rule"]))
        if not bool(program.evaluate(activation)):
            errors.append(rule["message"])
    for name, sub in node.get("properties", {}).items():
        if isinstance(new, dict) and name in new:
            in_old = isinstance(old, dict) and name in old
            errors += cel_errors(sub, new[name], old.get(name) if in_old else None, has_old=in_old)
    if "items" in node and isinstance(new, list):
        for item in new:  # (no transition rules on list items: items have no old self here)
            errors += cel_errors(node["items"], item)
    return errors


def _checkpoint_schema() -> dict[str, Any]:
    crd = all_crds()["checkpoints.warmstart.dev.yaml"]
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize(
    ("gms", "errors"),
    [
        ({"checkpoint": {}}, []),
        ({}, []),
        (GMS_ON, []),
        ({"checkpoint": {"saver": {"image": "gms:1"}}}, [SAVER_WITHOUT_GMS]),
        ({"enabled": False, "checkpoint": {"saver": {}}}, [SAVER_WITHOUT_GMS]),
        ({"enabled": True, "checkpoint": {"loader": {"image": "l:1"}}}, [LOADER_ON_CHECKPOINT]),
    ],
)
def test_cel_gms_rules(gms: dict[str, Any], errors: list[str]) -> None:
    resource = checkpoint({"gpuMemoryService": gms})
    assert cel_errors(_checkpoint_schema(), resource) == errors


@pytest.mark.parametrize(
    ("envs", "errors"),
    [
        ([{"name": "A", "value": "1"}, {"name": "B", "valueFrom": SECRET}], []),
        ([{"name": "A", "value": "", "valueFrom": FIELD}], []),
        ([{"name": "A", "value": "1", "valueFrom": SECRET}], [ENV_VALUE_AND_SOURCE]),
        (
            [{"name": "A", "value": "1"}, {"name": "B", "value": "2", "valueFrom": FIELD}],
            [ENV_VALUE_AND_SOURCE],
        ),
    ],
)
def test_cel_env_value_or_value_from(envs: list[dict[str, Any]], errors: list[str]) -> None:
    assert cel_errors(_checkpoint_schema(), checkpoint(saver_envs(*envs))) == errors
    # The rule is the model's, with the same message.
    if errors:
        with pytest.raises(ValidationError, match=re.escape(errors[0])):
            Checkpoint.model_validate(checkpoint(saver_envs(*envs)))


def test_value_from_names_exactly_one_source_in_the_schema() -> None:
    schema = all_crds()["checkpoints.warmstart.dev.yaml"]["spec"]["versions"][0]["schema"]
    nodes = dict(_walk(schema["openAPIV3Schema"], ""))
    source = nodes[".spec.gpuMemoryService.checkpoint.saver.envs[].valueFrom"]
    assert (source["minProperties"], source["maxProperties"]) == (1, 1)
    assert sorted(source["properties"]) == [
        "configMapKeyRef",
        "fieldRef",
        "resourceFieldRef",
        "secretKeyRef",
    ]


def test_cel_identity_is_immutable_on_update() -> None:
    old = checkpoint()
    same = checkpoint()
    changed = checkpoint({"identity": {"model": "other", "backendFramework": "vllm"}})
    schema = _checkpoint_schema()
    assert cel_errors(schema, same, old, has_old=True) == []
    assert cel_errors(schema, changed, old, has_old=True) == [IDENTITY_IMMUTABLE]
    assert cel_errors(schema, changed) == []  # a create has no old object


def test_verify_is_accepted_on_the_cluster_path_with_its_timeout() -> None:
    """`spec.verify` is built on the cluster path (decision 0045): accepted by the model and
    the CRD, with the verification pod's readiness budget beside it."""
    verified = Checkpoint.model_validate(checkpoint({"verify": True}))
    assert verified.spec.verify is True and verified.spec.verify_timeout_seconds == 120
    timed = checkpoint({"verify": True, "verifyTimeoutSeconds": 5})
    assert Checkpoint.model_validate(timed).spec.verify_timeout_seconds == 5
    with pytest.raises(ValidationError, match="verifyTimeoutSeconds"):
        Checkpoint.model_validate(checkpoint({"verify": True, "verifyTimeoutSeconds": 0}))
    schema = _checkpoint_schema()
    properties = schema["properties"]["spec"]["properties"]
    assert properties["verify"]["type"] == "boolean"
    assert "x-kubernetes-validations" not in properties["verify"]
    timeout = properties["verifyTimeoutSeconds"]
    assert (timeout["minimum"], timeout["maximum"], timeout["default"]) == (1, 3600, 120)
    assert cel_errors(schema, checkpoint({"verify": True})) == []
    verifying = schema["properties"]["status"]["properties"]["verifying"]["properties"]
    assert set(verifying) == {"version", "manifestSHA256", "podName", "podUID"}
