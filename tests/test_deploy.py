"""Static checks of what cannot run here (no container engine): compose file and Dockerfile."""

import json
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client import ApiClient

from workers.devserver import DYNAMIC_CONFIG
from workflows.visibility import ALL_KEYS

REPO = Path(__file__).resolve().parents[1]


def test_compose_registers_every_search_attribute_and_builds_our_image() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"temporal", "minio", "warmstart"} <= set(services)
    flags = " ".join(services["temporal"]["command"])
    for key in ALL_KEYS:
        assert f"--search-attribute={key.name}=Keyword" in flags
    for value in DYNAMIC_CONFIG:  # eager start and dispatch, as `warmstart dev` runs it
        assert f"--dynamic-config-value={value}" in flags
    for service in services.values():  # nothing unauthenticated on other interfaces
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port
    build = services["warmstart"]["build"]
    assert (REPO / build["dockerfile"]).is_file()
    assert services["warmstart"]["privileged"] is True


def test_compose_worker_publishes_to_the_bucket_minio_is_given() -> None:
    from workers.settings import Settings

    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    env = {k: str(v) for k, v in services["warmstart"]["environment"].items()}
    storage = Settings.from_env(env).storage
    assert storage.s3_endpoint == "http://minio:9000"
    assert f"local/{storage.s3_bucket}" in " ".join(services["minio-bucket"]["entrypoint"])
    assert env["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]


def test_dockerfile_copies_every_package() -> None:
    text = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    for package in ("api", "workflows", "activities", "workers"):
        assert f"COPY {package} {package}" in text
    assert "install-criu.sh" in text


def test_dockerfile_defaults_to_the_public_base() -> None:
    """`docker build -f deploy/docker/Dockerfile .` works unchanged for users: the base is a
    build argument whose default is the public Python image, and the one stage builds on
    it (scripts/build-image.sh passes a local Debian base instead)."""
    lines = [
        line.strip()
        for line in (REPO / "deploy" / "docker" / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0] == "ARG BASE=python:3.11-slim-bookworm"
    assert [line for line in lines if line.upper().startswith("FROM ")] == ["FROM ${BASE}"]


def test_every_file_the_image_copies_is_in_its_cache_key() -> None:
    """scripts/build-image.sh keys its cache on what the Dockerfile copies: a source it
    left out would let an edited tree reuse a stale image."""
    dockerfile = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    script = (REPO / "scripts" / "build-image.sh").read_text()
    hashed = script[script.index("inputs() {") : script.index("tree_key() {")].split()
    copied = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    sources = [source for sources in copied for source in sources]
    assert {"api", "uv.lock", "scripts/install-criu.sh"} <= set(sources)
    for source in sources:
        assert source in hashed, f"{source} is copied into the image but not hashed"
    for name in ("deploy/docker/Dockerfile", ".dockerignore", "scripts/build-image.sh"):
        assert name in hashed


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "tests", "**/__pycache__", ".mypy_cache", ".ruff_cache"} <= ignored
    dockerfile = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    for line in dockerfile.splitlines():  # nothing the image needs is left out
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert source not in ignored and source.split("/")[0] not in ignored, source


def _kubernetes_docs(name: str = "base/warmstart.yaml") -> list[dict[str, object]]:
    text = (REPO / "deploy" / "kubernetes" / name).read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc]


def test_kubernetes_manifests_are_valid_objects() -> None:
    """Each document deserialises into the client's model with nothing left over (a
    misspelt or misplaced field would be dropped and the round trip would differ)."""
    api = ApiClient()
    for doc in [*_kubernetes_docs(), *_kubernetes_docs("tenant.yaml")]:
        kind = f"V1{doc['kind']}"
        parsed = api._ApiClient__deserialize(doc, kind)  # type: ignore[attr-defined]
        assert api.sanitize_for_serialization(parsed) == doc, doc["kind"]


def test_every_container_is_bounded() -> None:
    """Requests and limits of CPU and memory on every container and init container, so no
    warmstart pod can starve a GPU node's workloads."""
    found = []
    for doc in _kubernetes_docs():
        if doc["kind"] not in ("Deployment", "DaemonSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            resources = container.get("resources", {})
            where = f"{doc['kind']} {doc['metadata']['name']}: {container['name']}"
            for bound in ("requests", "limits"):
                assert set(resources.get(bound, {})) == {"cpu", "memory"}, f"{where} {bound}"
            found.append(where)
    assert len(found) >= 4  # controller, webhook, the node's init container and worker


def test_no_pod_gets_service_links() -> None:
    """The kubelet writes `WARMSTART_WEBHOOK_PORT`... for the webhook's Service into every pod
    of the namespace unless its spec says otherwise, and `warmstart` refuses unknown
    `WARMSTART_` variables: every warmstart pod turns them off (a real kubelet found it)."""
    pods = [
        (doc["metadata"]["name"], doc["spec"]["template"]["spec"])
        for doc in _kubernetes_docs()
        if doc["kind"] in ("Deployment", "DaemonSet")
    ]
    assert len(pods) == 3
    for name, pod in pods:
        assert pod.get("enableServiceLinks") is False, name


def test_the_node_worker_and_the_seccomp_profile() -> None:
    docs = {doc["kind"]: doc for doc in _kubernetes_docs()}
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]  # type: ignore[index]
    assert pod["hostPID"] is True
    [node] = pod["containers"]
    assert node["securityContext"]["privileged"] is True
    env = {e["name"] for e in node["env"]}
    assert {
        "WARMSTART_NODE__NAME",
        "WARMSTART_NODE__CLUSTER",
        "WARMSTART_NODE__RUNTIME_ENDPOINT",
    } <= env
    # It watches its restore targets: pods, through its own service account.
    account = pod["serviceAccountName"]
    [binding] = [
        d
        for d in _kubernetes_docs()
        if d["kind"] == "ClusterRoleBinding" and d["subjects"][0]["name"] == account
    ]
    [role] = [
        d
        for d in _kubernetes_docs()
        if d["kind"] == "ClusterRole" and d["metadata"]["name"] == binding["roleRef"]["name"]
    ]
    assert {"list", "watch"} <= set(role["rules"][0]["verbs"])
    mounts = {m["mountPath"]: m.get("mountPropagation") for m in node["volumeMounts"]}
    assert mounts["/run/containerd"] == mounts["/var/lib/kubelet"] == "HostToContainer"
    shipped = json.loads((REPO / "deploy" / "seccomp" / "block-io-uring.json").read_text())
    configured = json.loads(docs["ConfigMap"]["data"]["block-io-uring.json"])  # type: ignore[index]
    assert configured == shipped


def test_the_webhook_is_served_and_registered_safely() -> None:
    """The webhook's own Deployment (its own service account: tests/test_rbac.py)."""
    by_kind: dict[Any, Any] = {doc["kind"]: doc for doc in _kubernetes_docs()}
    [deployment] = [
        d
        for d in _kubernetes_docs()
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "warmstart-webhook"
    ]
    pod: Any = deployment["spec"]["template"]
    [webhook] = pod["spec"]["containers"]
    assert webhook["args"] == ["webhook"]
    env = {e["name"]: e["value"] for e in webhook["env"]}
    [mount] = webhook["volumeMounts"]
    assert env["WARMSTART_WEBHOOK__CERT_FILE"] == f"{mount['mountPath']}/tls.crt"
    assert env["WARMSTART_WEBHOOK__KEY_FILE"] == f"{mount['mountPath']}/tls.key"
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    # Optional: the pod starts before the controller has made the Secret (decision 0032).
    assert volume["secret"] == {"secretName": "warmstart-webhook-tls", "optional": True}
    [port] = webhook["ports"]
    assert str(port["containerPort"]) == env["WARMSTART_WEBHOOK__PORT"]
    service = by_kind["Service"]
    assert service["spec"]["selector"] == pod["metadata"]["labels"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]

    [validating, evictions] = by_kind["ValidatingWebhookConfiguration"]["webhooks"]
    [mutating] = by_kind["MutatingWebhookConfiguration"]["webhooks"]
    for hook, path in ((validating, "/validate"), (mutating, "/mutate"), (evictions, "/evict")):
        assert hook["admissionReviewVersions"] == ["v1"] and hook["sideEffects"] == "None"
        assert hook["timeoutSeconds"] <= 5
        assert hook["clientConfig"]["service"] == {
            "namespace": service["metadata"]["namespace"],
            "name": service["metadata"]["name"],
            "path": path,
            "port": service["spec"]["ports"][0]["port"],
        }
    # A webhook outage never blocks pod creation, nor anything in kube-system.
    assert mutating["failurePolicy"] == "Ignore"
    assert mutating["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["CREATE"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    [excluded] = mutating["namespaceSelector"]["matchExpressions"]
    assert excluded["operator"] == "NotIn" and "kube-system" in excluded["values"]
    assert validating["rules"][0]["resources"] == ["checkpoints", "podsnapshots"]
    # Evictions held for capture before a drain (decision 0044): an outage never blocks a
    # drain, nor anything in kube-system.
    assert evictions["failurePolicy"] == "Ignore"
    assert evictions["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["CREATE"],
            "resources": ["pods/eviction"],
            "scope": "Namespaced",
        }
    ]
    assert evictions["namespaceSelector"] == mutating["namespaceSelector"]


def test_only_the_webhook_port_of_the_webhook_pods_is_open() -> None:
    """Ingress to the webhook's pods: the webhook's port, from anywhere (the API server
    cannot be named by labels), and nothing else of them."""
    docs = _kubernetes_docs()
    [policy] = [d for d in docs if d["kind"] == "NetworkPolicy"]
    [webhook] = [
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "warmstart-webhook"  # type: ignore[index]
    ]
    pod = webhook["spec"]["template"]  # type: ignore[index]
    spec = policy["spec"]  # type: ignore[index]
    assert policy["metadata"]["namespace"] == webhook["metadata"]["namespace"]  # type: ignore[index]
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "webhook"
    assert spec["podSelector"] == {"matchLabels": pod["metadata"]["labels"]}
    assert spec["policyTypes"] == ["Ingress"]
    [rule] = spec["ingress"]
    named = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert rule == {"ports": [{"port": "webhook", "protocol": "TCP"}]} and named == {"webhook"}


def test_the_node_may_read_the_checkpoint_a_pod_names() -> None:
    """In the namespaces that opt in (the ClusterRole tenant.yaml binds there)."""
    [role] = [
        d
        for d in _kubernetes_docs()
        if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "warmstart-node-tenant"  # type: ignore[index]
    ]
    rules = role["rules"]  # type: ignore[index]
    assert {"apiGroups": ["warmstart.dev"], "resources": ["checkpoints"], "verbs": ["get"]} in rules


def test_the_controller_and_node_workers_serve_metrics_where_prometheus_looks() -> None:
    """Metrics on (decision 0038), on the port their settings name, which the container
    names `metrics` and the scrape annotations point at."""
    from workers.settings import Settings

    served = {}
    for doc in _kubernetes_docs():
        if doc["kind"] not in ("Deployment", "DaemonSet"):
            continue
        template = doc["spec"]["template"]
        [container] = template["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        telemetry = Settings.from_env(env).telemetry
        if telemetry.metrics == "off":
            continue
        assert telemetry.metrics == "prometheus"
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert ports["metrics"] == telemetry.prometheus_port
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(telemetry.prometheus_port)
        assert annotations["prometheus.io/path"] == "/metrics"
        served[doc["metadata"]["name"]] = telemetry.prometheus_port
    assert set(served) == {"warmstart-controller", "warmstart-node"}
