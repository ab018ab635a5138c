"""The install as users run it: `kubectl apply -k deploy/kubernetes` (CRDs included) or an
overlay. Every kustomization keeps to what kubectl 1.20's built-in kustomize (v2.0.3) reads,
lists files that exist inside its own directory, and builds on directories it may build on;
overlays patch objects their base has. Where a kustomize is installed, each is rendered
for real and the result checked (tests/test_rbac.py checks the rendered RBAC)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient
from kubernetes.utils import FailToCreateError, create_from_dict

from api.access import MUTATING_WEBHOOK, VALIDATING_WEBHOOK, WEBHOOK_SERVICE, WEBHOOK_TLS_SECRET
from api.crds import all_crds
from tests.apiserver import APISERVER_SKIP, ApiServer, running_apiserver
from tests.kube import Cluster
from tests.kustomize import (
    DEPLOY,
    INSTALL,
    OVERLAYS,
    RENDER_SKIP,
    V2_FIELDS,
    WEBHOOK_KINDS,
    key,
    kustomization,
    kustomizations,
    listed,
    render,
)
from workers.settings import Settings

needs_kustomize = pytest.mark.skipif(RENDER_SKIP is not None, reason=str(RENDER_SKIP))
NAMESPACE = "warmstart-system"


def _name(path: Path) -> str:
    return str(path.relative_to(DEPLOY))


def test_the_kustomizations_are_the_install_and_its_overlays() -> None:
    assert [_name(p) for p in kustomizations()] == [
        "crds",
        "kubernetes",
        "kubernetes/base",
        "kubernetes/overlays/cert-manager",
        "kubernetes/overlays/gpu",
        "kubernetes/overlays/s3",
    ]
    # The CRDs' kustomization lists exactly what `warmstart crds --write` writes.
    assert sorted(kustomization(DEPLOY / "crds")["resources"]) == sorted(all_crds())
    # tenant.yaml is applied apart, per namespace: no kustomization lists it.
    for directory in kustomizations():
        assert "tenant.yaml" not in kustomization(directory).get("resources", [])


@pytest.mark.parametrize("directory", kustomizations(), ids=_name)
def test_every_kustomization_keeps_to_kustomize_2_0_3(directory: Path) -> None:
    """Fields v2.0.3 knows; files listed exist in the kustomization's own directory; each
    base is a directory with a kustomization, not one above (kustomize refuses a cycle)."""
    spec = kustomization(directory)
    assert set(spec) <= V2_FIELDS, f"{_name(directory)}: {set(spec) - V2_FIELDS}"
    files = [
        *spec.get("resources", []),
        *spec.get("patchesStrategicMerge", []),
        *(patch["path"] for patch in spec.get("patchesJson6902", [])),
    ]
    for name in files:
        path = (directory / name).resolve()
        assert path.is_file(), f"{_name(directory)}: {name} is not a file"
        assert path.parent == directory, f"{_name(directory)}: {name} lies outside"
    for base in spec.get("bases", []):
        path = (directory / base).resolve()
        assert (path / "kustomization.yaml").is_file(), f"{_name(directory)}: base {base}"
        assert not directory.is_relative_to(path), f"{_name(directory)}: base {base} is above"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS.iterdir()), ids=_name)
def test_every_patch_of_an_overlay_targets_an_object_of_its_base(overlay: Path) -> None:
    spec = kustomization(overlay)
    base = {key(doc) for name in spec["bases"] for doc in listed((overlay / name).resolve())}
    for name in spec.get("patchesStrategicMerge", []):
        for doc in yaml.safe_load_all((overlay / name).read_text()):
            assert key(doc) in base, f"{_name(overlay)}/{name}: {key(doc)} is not in its base"
    for patch in spec.get("patchesJson6902", []):
        target = patch["target"]
        found = (target["kind"], target["name"], target.get("namespace", ""))
        assert found in base, f"{_name(overlay)}: {found} is not in its base"


def _workload(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in docs if key(d) == (kind, name, NAMESPACE)]
    pod: dict[str, Any] = found["spec"]["template"]["spec"]
    return pod


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def check_install(docs: list[dict[str, Any]]) -> None:
    """What every install holds: CRDs, the webhook configurations without a caBundle (the
    controller or cert-manager writes it), and restore targets required onto the nodes that
    run a node worker."""
    kinds = [doc["kind"] for doc in docs]
    assert kinds.count("CustomResourceDefinition") == len(all_crds())
    assert kinds.index("Namespace") < kinds.index("Deployment")
    for doc in docs:
        if doc["kind"] in WEBHOOK_KINDS:
            assert doc["metadata"]["name"] in (VALIDATING_WEBHOOK, MUTATING_WEBHOOK)
            for hook in doc["webhooks"]:
                assert "caBundle" not in hook["clientConfig"]
                assert hook["clientConfig"]["service"]["name"] == WEBHOOK_SERVICE
    node = _workload(docs, "DaemonSet", "warmstart-node")
    [webhook] = _workload(docs, "Deployment", "warmstart-webhook")["containers"]
    labels = Settings.from_env(
        {"WARMSTART_WEBHOOK__NODE_LABELS": _env(webhook)["WARMSTART_WEBHOOK__NODE_LABELS"]}
    ).webhook.node_label_pairs()
    assert dict(labels) == node["nodeSelector"]
    [volume] = _workload(docs, "Deployment", "warmstart-webhook")["volumes"]
    assert volume["secret"] == {"secretName": WEBHOOK_TLS_SECRET, "optional": True}


def test_the_install_without_kustomize_holds_the_same() -> None:
    check_install(listed(INSTALL))


@needs_kustomize
@pytest.mark.parametrize("directory", kustomizations(), ids=_name)
def test_every_kustomization_renders(directory: Path) -> None:
    docs = render(directory)
    assert docs
    if directory == DEPLOY / "crds":
        assert [doc["kind"] for doc in docs] == ["CustomResourceDefinition"] * len(all_crds())
    else:
        check_install(docs)


@needs_kustomize
@pytest.mark.parametrize("directory", kustomizations(), ids=_name)
def test_every_rendered_object_is_a_valid_object(directory: Path) -> None:
    """Each object of a Kubernetes kind deserialises into the client's model with nothing
    left over: a misspelt or misplaced field of a patch would be dropped and the round trip
    would differ. CRDs are checked against the models (tests/api/test_resources.py)."""
    api = ApiClient()
    for doc in render(directory):
        group = doc["apiVersion"].partition("/")[0]
        if group.endswith("cert-manager.io") or doc["kind"] == "CustomResourceDefinition":
            continue
        parsed = api._ApiClient__deserialize(doc, f"V1{doc['kind']}")  # type: ignore[attr-defined]
        assert api.sanitize_for_serialization(parsed) == doc, key(doc)


@needs_kustomize
def test_the_default_install_is_the_base_as_written() -> None:
    assert render(INSTALL) == render(INSTALL / "base")
    assert sorted(map(key, render(INSTALL))) == sorted(map(key, listed(INSTALL)))


@needs_kustomize
def test_the_gpu_overlay_puts_the_node_worker_on_gpu_nodes_only() -> None:
    docs = render(OVERLAYS / "gpu")
    node = _workload(docs, "DaemonSet", "warmstart-node")
    assert node["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in node[
        "tolerations"
    ]
    assert node["runtimeClassName"] == "nvidia"
    [worker] = node["containers"]
    env = _env(worker)
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert set(env["NVIDIA_DRIVER_CAPABILITIES"].split(",")) == {"compute", "utility"}
    # It takes no GPU from the scheduler: nothing of the device plugin's is requested.
    for bound in worker["resources"].values():
        assert not any(name.startswith("nvidia.com/") for name in bound)


@needs_kustomize
def test_the_s3_overlay_names_the_bucket_and_its_credentials() -> None:
    docs = render(OVERLAYS / "s3")
    [storage] = [d for d in docs if key(d) == ("ConfigMap", "warmstart-storage", NAMESPACE)]
    assert storage["data"]["bucket"]
    for kind, name in (("Deployment", "warmstart-controller"), ("DaemonSet", "warmstart-node")):
        [container] = _workload(docs, kind, name)["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "warmstart-s3-credentials"}}]
        refs = {
            variable: value["configMapKeyRef"]["key"]
            for variable, value in _env(container).items()
            if isinstance(value, dict) and "configMapKeyRef" in value
        }
        assert refs["WARMSTART_STORAGE__S3_BUCKET"] == "bucket"
        assert set(refs.values()) <= set(storage["data"]) | {"cacheMaxBytes"}
        settings = Settings.from_env(
            {variable: storage["data"][k] for variable, k in refs.items() if k in storage["data"]}
        )
        assert settings.storage.s3_bucket == storage["data"]["bucket"]


@needs_kustomize
def test_the_cert_manager_overlay_hands_the_certificate_to_cert_manager() -> None:
    docs = render(OVERLAYS / "cert-manager")
    [controller] = _workload(docs, "Deployment", "warmstart-controller")["containers"]
    assert (
        Settings.from_env(
            {"WARMSTART_CERTIFICATE__MANAGE": _env(controller)["WARMSTART_CERTIFICATE__MANAGE"]}
        ).certificate.manage
        is False
    )
    [certificate] = [d for d in docs if d["kind"] == "Certificate"]
    assert certificate["metadata"]["namespace"] == NAMESPACE
    assert certificate["spec"]["secretName"] == WEBHOOK_TLS_SECRET
    assert f"{WEBHOOK_SERVICE}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    issuer = certificate["spec"]["issuerRef"]
    assert (issuer["kind"], issuer["name"], NAMESPACE) in {key(d) for d in docs}
    injected = f"{NAMESPACE}/{certificate['metadata']['name']}"
    for doc in docs:
        if doc["kind"] in WEBHOOK_KINDS:
            annotations = doc["metadata"]["annotations"]
            assert annotations["cert-manager.io/inject-ca-from"] == injected


# --- accepted by a real API server ------------------------------------------------------


@pytest.fixture(scope="module")
def apiserver() -> Iterator[ApiServer]:
    if APISERVER_SKIP is not None:
        pytest.skip(APISERVER_SKIP)
    # As clusters that run privileged pods are set up (kubeadm's default, too).
    yield from running_apiserver(extra_args=("--allow-privileged=true",))


@needs_kustomize
@pytest.mark.timeout(120)
@pytest.mark.parametrize("directory", [INSTALL, *sorted(OVERLAYS.iterdir())], ids=_name)
async def test_every_install_is_accepted_by_the_api_server(
    apiserver: ApiServer, directory: Path
) -> None:
    """What `kubectl apply -k` sends, each object validated by a real kube-apiserver 1.20
    (the Namespace and CRDs made, everything else as a dry run): no value the server
    refuses (1.20 drops unknown fields silently: the round trip below finds those).
    cert-manager's own kinds need cert-manager."""
    cluster = Cluster(None, apiserver.url, apiserver.token)
    try:
        for doc in render(directory):
            if doc["apiVersion"].startswith("cert-manager.io/"):
                assert directory.name == "cert-manager", key(doc)
                continue
            made = doc["kind"] in ("Namespace", "CustomResourceDefinition")
            try:
                await cluster.run(
                    create_from_dict, cluster.api, doc, **({} if made else {"dry_run": "All"})
                )
            except FailToCreateError as err:
                [refused] = err.api_exceptions
                assert made and refused.status == 409, f"{key(doc)}: {refused.body}"
    finally:
        cluster.close()
