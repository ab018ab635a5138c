"""Least privilege, both ways: the manifests grant each service account exactly the
allowlist of `api/access.py`, and each process's real code paths make exactly the calls of
its allowlist, no more and no fewer.

The calls are recorded, not declared: each process runs against kmock with a bearer token
of its own, as its service account would, and every request kmock received with that token
is mapped to the RBAC attributes an API server authorises it by (verb, API group, resource
with subresource, namespace). Discovery (`/api`, `/apis/...` without a resource) is left
out: every authenticated user may read it (`system:discovery`).

The same code paths run against a real kube-apiserver that authorises by RBAC, with the
manifests' roles and bindings applied (tenant.yaml in one namespace only) and each process
under its service account's token: none is refused there, and what lies outside the
opted-in namespaces is."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from kubernetes import client as kubernetes
from kubernetes.client.exceptions import ApiException
from temporalio import workflow
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from activities.contracts import (
    ClaimInput,
    ContainerTarget,
    JobInput,
    JobRef,
    NodeSelectorInput,
    PodQuery,
    ResourceRef,
    StatusInput,
    VerificationPodInput,
    VerificationQuery,
)
from activities.kube.client import api_client, configuration
from activities.kube.control import KubeControlActivities, ready_references
from api.access import ACCOUNTS, CONTROLLER, NAMESPACE, NODE, WEBHOOK, Access, Scope, allowlist
from api.drain import CAPTURE_ON_DRAIN_ANNOTATION, snapshot_name
from api.errors import ForbiddenError, StorageError
from api.naming import CAPTURE_WORKFLOW
from api.reasons import Phase, Reason
from api.restore_claims import RESTORE_FROM_ANNOTATION
from api.restore_pods import RESTORE_TARGET_LABEL
from tests.apiserver import APISERVER_SKIP, ApiServer, installed, running_apiserver
from tests.kube import Cluster, checkpoint_body, start_cluster
from tests.kustomize import OVERLAYS, RENDER_SKIP, install_docs, render, webhook_configurations
from workers.checkpoints import checkpoint_reader
from workers.compose import secret_reader
from workers.leader import LeaseElector
from workers.ports import free_port
from workers.restore_targets import RestoreTargetWatch
from workers.settings import (
    CertificateSettings,
    KubeSettings,
    NodeSettings,
    Settings,
    WebhookSettings,
)
from workers.watcher import KopfThread, WatcherSettings, build_registry
from workers.webhook import run_webhook
from workers.webhook_certificate import WebhookCertificate

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]
TENANT = "inference"  # a namespace that opted in (tenant.yaml bound there)
ELSEWHERE = "elsewhere"  # one that did not
TEMPLATE = {"spec": {"containers": [{"name": "main", "image": "vllm/vllm-openai:v0.8.0"}]}}
CKPT, VERSION = "96429b2725761a09", "20261127T120000Z-abcdef"

# --- what the manifests grant --------------------------------------------------------


def _docs(name: str) -> list[dict[str, Any]]:
    text = (REPO / "deploy" / "kubernetes" / name).read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc]


def granted(main: list[dict[str, Any]] | None = None) -> dict[str, set[Access]]:
    """What the manifests grant each of our service accounts: ClusterRoleBindings in every
    namespace, RoleBindings of the install (`main`: `kubectl apply -k deploy/kubernetes`)
    in the install namespace, RoleBindings of tenant.yaml in each namespace that opts in.
    Any other subject fails."""
    main, tenant = main if main is not None else install_docs(), _docs("tenant.yaml")
    roles: dict[tuple[str, str, str], dict[str, Any]] = {}
    for doc in main:
        if doc["kind"] in ("ClusterRole", "Role"):
            key = (doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace", ""))
            roles[key] = doc
    bindings = [(doc, Scope.CLUSTER) for doc in main if doc["kind"] == "ClusterRoleBinding"]
    bindings += [(doc, Scope.OWN) for doc in main if doc["kind"] == "RoleBinding"]
    bindings += [(doc, Scope.TENANT) for doc in tenant]
    assert {doc["kind"] for doc in tenant} == {"RoleBinding"}
    used: set[tuple[str, str, str]] = set()
    grants: dict[str, set[Access]] = {account: set() for account in ACCOUNTS}
    for binding, scope in bindings:
        namespace = binding["metadata"].get("namespace", "")
        assert namespace == (NAMESPACE if scope is Scope.OWN else ""), binding["metadata"]
        ref = binding["roleRef"]
        key = (ref["kind"], ref["name"], namespace if ref["kind"] == "Role" else "")
        assert key in roles, f"{binding['metadata']['name']} binds {key}, which is not there"
        used.add(key)
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount", subject  # no users, no groups
            assert subject["namespace"] == NAMESPACE and subject["name"] in ACCOUNTS, subject
            for rule in roles[key]["rules"] or []:
                assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, rule
                if "resourceNames" in rule:  # a create or list cannot be narrowed by name
                    assert rule["resourceNames"] and {"create", "list", "watch"}.isdisjoint(
                        rule["verbs"]
                    ), rule
                grants[subject["name"]] |= {
                    Access(subject["name"], scope, group, resource, verb, name)
                    for group in rule["apiGroups"]
                    for resource in rule["resources"]
                    for verb in rule["verbs"]
                    for name in rule.get("resourceNames") or [""]
                }
    assert used == set(roles), f"roles no binding uses: {set(roles) - used}"
    return grants


@pytest.mark.parametrize("account", ACCOUNTS)
def test_the_manifests_grant_exactly_the_allowlist(account: str) -> None:
    grants = granted()[account]
    assert grants - allowlist(account) == set(), "granted beyond the allowlist"
    assert allowlist(account) - grants == set(), "in the allowlist, not granted"


@pytest.mark.skipif(RENDER_SKIP is not None, reason=str(RENDER_SKIP))
@pytest.mark.parametrize("account", ACCOUNTS)
def test_with_cert_manager_the_controller_is_granted_nothing_for_certificates(
    account: str,
) -> None:
    """The overlay cert-manager: the same grants, less the certificate step's."""
    grants = granted(render(OVERLAYS / "cert-manager"))[account]
    assert grants == allowlist(account, certificate=False)
    if account == CONTROLLER:
        assert allowlist(account) - grants, "the certificate step's grants are gone"


def test_each_process_runs_under_its_own_service_account() -> None:
    workloads = {
        doc["metadata"]["name"]: doc["spec"]["template"]["spec"]
        for doc in install_docs()
        if doc["kind"] in ("Deployment", "DaemonSet")
    }
    commands = {
        name: (pod["serviceAccountName"], [c["args"][0] for c in pod["containers"]])
        for name, pod in workloads.items()
    }
    assert commands == {
        "warmstart-controller": (CONTROLLER, ["controller"]),
        "warmstart-webhook": (WEBHOOK, ["webhook"]),
        "warmstart-node": (NODE, ["worker"]),
    }


# --- what the code asks for ----------------------------------------------------------


def access_of(method: str, path: str, params: Mapping[str, str]) -> tuple[str, ...] | None:
    """(group, resource, verb, namespace, name) as an API server's RequestInfo reads a
    request (name "" for a collection); None for discovery (no resource)."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) > 2:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) > 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 2:
        namespace, rest = rest[1], rest[2:]
    resource = "/".join(rest[0:3:2])  # resource, or resource/subresource
    named = len(rest) > 1
    verb = {
        "GET": "get" if named else ("watch" if params.get("watch") in ("true", "1") else "list"),
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if named else "deletecollection",
    }[method]
    return group, resource, verb, namespace, rest[1] if named else ""


def recorded(cluster: Cluster, account: str) -> set[tuple[str, ...]]:
    """Every resource request kmock received with `account`'s token."""
    assert cluster.emulator is not None
    found = set()
    for request in cluster.emulator:
        if request.headers.get("Authorization") != f"Bearer {token(account)}":
            continue
        method = str(getattr(request.method, "value", request.method)).upper()
        access = access_of(method, request.url.path, request.params)
        if access is not None:
            found.add(access)
    return found


def admits(scope: Scope, namespace: str) -> bool:
    """Whether a grant of `scope` covers a request in `namespace` ("": cluster-wide)."""
    if scope is Scope.CLUSTER:
        return True
    return namespace == (NAMESPACE if scope is Scope.OWN else TENANT)


def covers(access: Access, call: tuple[str, ...]) -> bool:
    """Whether `access` grants `call` (group, resource, verb, namespace, name)."""
    group, resource, verb, namespace, name = call
    return (
        (access.group, access.resource, access.verb) == (group, resource, verb)
        and admits(access.scope, namespace)
        and access.name in ("", name)
    )


def assert_calls_equal_the_allowlist(cluster: Cluster, account: str) -> None:
    calls = recorded(cluster, account)
    allowed = allowlist(account)
    beyond = {call for call in calls if not any(covers(a, call) for a in allowed)}
    assert beyond == set(), f"{account} makes calls its allowlist does not grant"
    unused = {a for a in allowed if not any(covers(a, c) for c in calls)}
    assert unused == set(), f"{account} is granted what its code never asks for"


def token(account: str) -> str:
    return f"token-{account}"


def login(cluster: Cluster, account: str, tmp_path: Path) -> KubeSettings:
    """The account's login: its own bearer token (on the real API server, the token of its
    service account)."""
    path = tmp_path / f"{account}.token"
    path.write_text(token(account))
    real = cluster.emulator is None
    return KubeSettings(server=cluster.url, token_file=str(path), insecure_skip_tls_verify=real)


@pytest.fixture(scope="module")
def rbac_apiserver() -> Iterator[ApiServer]:
    if APISERVER_SKIP is not None:
        pytest.skip(APISERVER_SKIP)
    yield from running_apiserver({token(a): f"{NAMESPACE}:{a}" for a in ACCOUNTS})


@pytest_asyncio.fixture(scope="module")
async def authorizing(rbac_apiserver: ApiServer) -> AsyncIterator[Cluster]:
    """The real API server with the manifests' RBAC applied; tenant.yaml in TENANT only."""
    kube = await installed(rbac_apiserver, (NAMESPACE, TENANT, ELSEWHERE))
    rbac = kubernetes.RbacAuthorizationV1Api(kube.api)
    create = {
        "ClusterRole": rbac.create_cluster_role,
        "ClusterRoleBinding": rbac.create_cluster_role_binding,
        "Role": lambda body: rbac.create_namespaced_role(body["metadata"]["namespace"], body),
        "RoleBinding": lambda body: rbac.create_namespaced_role_binding(
            body["metadata"].get("namespace") or TENANT, body
        ),
    }
    for doc in [*install_docs(), *_docs("tenant.yaml")]:
        if doc["kind"] in create:
            await kube.run(create[doc["kind"]], doc)
    yield kube
    kube.close()


@pytest_asyncio.fixture
async def kmock_cluster() -> AsyncIterator[Cluster]:
    async for running in start_cluster():
        yield running


@pytest.fixture(params=["kmock", "kube-apiserver"])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    """kmock, which records; a real API server, which authorises."""
    name = "kmock_cluster" if request.param == "kmock" else "authorizing"
    found: Cluster = request.getfixturevalue(name)
    return found


def check(cluster: Cluster, account: str) -> None:
    """On kmock, the calls recorded equal the allowlist; on the real API server, the
    scenario ran without a refusal (a ForbiddenError would have ended it)."""
    if cluster.emulator is not None:
        assert_calls_equal_the_allowlist(cluster, account)


async def until(probe: Any, what: str, timeout: float = 30) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (found := await probe()):
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return found


@workflow.defn(name=CAPTURE_WORKFLOW, sandboxed=False)
class WaitingCapture:
    """Runs until cancelled (the watcher's deletion handler cancels it)."""

    @workflow.run
    async def run(self, request: Any) -> None:
        await workflow.wait_condition(lambda: False)


def snapshot_body(name: str, pod_uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "warmstart.dev/v1alpha1",
        "kind": "PodSnapshot",
        "metadata": {"name": name, "namespace": TENANT},
        "spec": {"source": {"podRef": {"name": "llama-0", "uid": pod_uid, "containers": ["main"]}}},
    }


def pod_body(name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": TENANT, "labels": labels},
        "spec": {"containers": [{"name": "main", "image": "i"}]},
    }


async def cordoned_pod(cluster: Cluster, node: str, name: str) -> Any:
    """A pod that opted in to capture before a drain, Running and Ready on the cordoned
    node `node` (the tests play the kubelet)."""
    await cluster.run(
        cluster.core.create_node, {"metadata": {"name": node}, "spec": {"unschedulable": True}}
    )
    body = pod_body(name)
    body["metadata"]["annotations"] = {CAPTURE_ON_DRAIN_ANNOTATION: "true"}
    body["spec"]["nodeName"] = node
    pod = await cluster.run(cluster.core.create_namespaced_pod, TENANT, body)
    main = {"name": "main", "ready": True, "image": "i", "imageID": "", "restartCount": 0}
    status = {"phase": "Running", "containerStatuses": [main]}
    await cluster.run(cluster.core.patch_namespaced_pod_status, name, TENANT, {"status": status})
    return pod


async def test_the_controller_calls_exactly_its_allowlist(
    client: Client, cluster: Cluster, tmp_path: Path
) -> None:
    """The watcher (kopf), the Lease elector, every control activity and retention's read,
    as `warmstart controller` composes them."""
    kube = login(cluster, CONTROLLER, tmp_path)
    api = api_client(kube)
    queue = f"control-{uuid.uuid4().hex[:8]}"
    target = client.service_client.config.target_host

    async def connect() -> Client:
        return await Client.connect(target, data_converter=pydantic_data_converter)

    def finalized(plural: str, name: str) -> Any:
        async def probe() -> bool:
            obj = await cluster.get(plural, TENANT, name)
            return "warmstart.dev/cleanup" in (obj["metadata"].get("finalizers") or [])

        return probe

    try:
        # The Lease: created, renewed, released.
        elector = LeaseElector(api, namespace=NAMESPACE, identity="a", duration_seconds=3)
        assert await elector.try_acquire()
        assert await elector.renew()
        await elector.release()

        # The watcher: a Checkpoint and a PodSnapshot taken on, a spec refused, a deletion.
        pod = await cluster.run(cluster.core.create_namespaced_pod, TENANT, pod_body("llama-0"))
        async with Worker(client, task_queue=queue, workflows=[WaitingCapture]):
            operator = KopfThread(build_registry(WatcherSettings(queue, kube=kube), connect))
            await asyncio.to_thread(operator.start)
            try:
                await cluster.create("checkpoints", checkpoint_body("llama", TEMPLATE))
                await cluster.create("podsnapshots", snapshot_body("snap", pod.metadata.uid))
                bad = (
                    checkpoint_body(  # the schema passes it (no CEL in 1.20), the models refuse it
                        "bad", TEMPLATE, gpuMemoryService={"checkpoint": {"saver": {"image": "g"}}}
                    )
                )
                await cluster.create("checkpoints", bad)
                await until(finalized("checkpoints", "llama"), "the Checkpoint's finalizer")
                await until(finalized("podsnapshots", "snap"), "the PodSnapshot's finalizer")

                async def refused() -> bool:
                    obj = await cluster.get("checkpoints", TENANT, "bad")
                    return (obj.get("status") or {}).get("phase") == "Failed"

                await until(refused, "the refused spec's status")
                await cluster.run(
                    cluster.custom.delete_namespaced_custom_object,
                    "warmstart.dev",
                    "v1alpha1",
                    TENANT,
                    "podsnapshots",
                    "snap",
                )

                async def released() -> bool:
                    listed = await cluster.run(
                        cluster.custom.list_namespaced_custom_object,
                        "warmstart.dev",
                        "v1alpha1",
                        TENANT,
                        "podsnapshots",
                    )
                    return not listed["items"]

                await until(released, "the PodSnapshot's finalizer released")

                # Capture before a drain: the cordoned node's opted-in pod gets its PodSnapshot.
                drained = await cordoned_pod(cluster, "drain-controller", "llama-1")

                async def made() -> bool:
                    name = snapshot_name("llama-1", drained.metadata.uid)
                    try:
                        await cluster.get("podsnapshots", TENANT, name)
                    except ApiException:
                        return False
                    return True

                await until(made, "the drain PodSnapshot")
            finally:
                await asyncio.to_thread(operator.stop)

        # Every control activity, each path that calls the API server.
        control = KubeControlActivities(api, claims_namespace=NAMESPACE)
        env = ActivityEnvironment()
        obj = await cluster.get("checkpoints", TENANT, "llama")
        ref = ResourceRef(
            kind="Checkpoint", namespace=TENANT, name="llama", uid=obj["metadata"]["uid"]
        )
        orphan = await cluster.create("checkpoints", checkpoint_body("orphan", TEMPLATE))
        gone = ref.model_copy(update={"name": "orphan", "uid": orphan["metadata"]["uid"]})
        await env.run(control.claim_checkpoint_id, claim(gone))  # created
        await cluster.run(
            cluster.custom.delete_namespaced_custom_object,
            "warmstart.dev",
            "v1alpha1",
            TENANT,
            "checkpoints",
            "orphan",
        )
        await env.run(control.claim_checkpoint_id, claim(ref))  # taken over from the gone
        await env.run(control.publish_status, status(ref))
        await cluster.create("podsnapshots", snapshot_body("snap2", pod.metadata.uid))
        snap = await cluster.get("podsnapshots", TENANT, "snap2")
        snap_ref = ResourceRef(
            kind="PodSnapshot", namespace=TENANT, name="snap2", uid=snap["metadata"]["uid"]
        )
        await env.run(control.publish_status, status(snap_ref))
        restored = ContainerTarget(
            namespace=TENANT, pod_name="llama-0", pod_uid=pod.metadata.uid, container="main"
        )
        restore = StatusInput(
            kind="restore",
            namespace=TENANT,
            name="llama-0",
            phase=Phase.RESTORED,
            reason=Reason.RESTORED,
            pod=restored,
        )
        await env.run(control.publish_status, restore)
        job = await env.run(control.create_capture_job, JobInput(resource=ref, version=VERSION))
        await env.run(control.create_capture_job, JobInput(resource=ref, version=VERSION))
        await env.run(
            control.read_capture_pod, PodQuery(namespace=TENANT, container="main", job_name=job)
        )
        await env.run(
            control.read_capture_pod,
            PodQuery(
                namespace=TENANT, container="main", pod_name="llama-0", pod_uid=pod.metadata.uid
            ),
        )
        await env.run(control.delete_capture_job, JobRef(namespace=TENANT, name=job))
        # A verified capture's verification pod: created (then adopted), read, deleted.
        command = {"name": "main", "image": "vllm", "command": ["python3", "-m", "serve"]}
        served = {"spec": {"containers": [command]}}
        verified = await cluster.create(
            "checkpoints", checkpoint_body("verified", served, verify=True)
        )
        verified_ref = ResourceRef(
            kind="Checkpoint", namespace=TENANT, name="verified", uid=verified["metadata"]["uid"]
        )
        made = VerificationPodInput(
            resource=verified_ref, checkpoint_id=CKPT, version=VERSION, node="gpu-1"
        )
        pod_made = await env.run(control.create_verification_pod, made)
        assert await env.run(control.create_verification_pod, made) == pod_made
        seen = VerificationQuery(
            namespace=TENANT, name=pod_made.name, uid=pod_made.uid, container="main"
        )
        await env.run(control.read_verification_pod, seen)
        await env.run(control.delete_verification_pod, seen)
        await env.run(control.nodes_matching, NodeSelectorInput(selectors=[{"gpu": "h100"}]))
        await ready_references(api)()

        # The webhook's certificate: the Secret made, the caBundles written; a year on,
        # renewed and written again (decision 0032).
        async with webhook_configurations_registered(cluster):
            settings = CertificateSettings()
            await WebhookCertificate(api, namespace=NAMESPACE, settings=settings).reconcile()
            later = WebhookCertificate(
                api,
                namespace=NAMESPACE,
                settings=settings,
                clock=lambda: datetime.now(UTC) + timedelta(days=400),
            )
            await later.reconcile()
    finally:
        api.close()  # type: ignore[no-untyped-call]
    check(cluster, CONTROLLER)


@asynccontextmanager
async def webhook_configurations_registered(cluster: Cluster) -> AsyncIterator[None]:
    """The install's webhook configurations, made by an administrator, removed after (on
    the real API server they would send every Checkpoint to a webhook that is not there)."""
    admission = kubernetes.AdmissionregistrationV1Api(cluster.api)
    kinds = {
        "ValidatingWebhookConfiguration": (
            admission.create_validating_webhook_configuration,
            admission.delete_validating_webhook_configuration,
        ),
        "MutatingWebhookConfiguration": (
            admission.create_mutating_webhook_configuration,
            admission.delete_mutating_webhook_configuration,
        ),
    }
    made = []
    try:
        for doc in webhook_configurations():
            create, delete = kinds[doc["kind"]]
            await cluster.run(create, doc)
            made.append((delete, doc["metadata"]["name"]))
        yield
    finally:
        for delete, name in made:
            await cluster.run(delete, name)


def claim(ref: ResourceRef) -> ClaimInput:
    return ClaimInput(checkpoint_id=CKPT, namespace=ref.namespace, name=ref.name, resource=ref)


def status(ref: ResourceRef) -> StatusInput:
    return StatusInput(
        kind="capture",
        namespace=ref.namespace,
        name=ref.name,
        phase=Phase.CREATING,
        reason=Reason.IN_PROGRESS,
        checkpoint_id=CKPT,
        resource=ref,
    )


async def test_the_webhook_calls_exactly_its_allowlist(cluster: Cluster, tmp_path: Path) -> None:
    """`warmstart webhook` as it runs, reviewing a restore-target pod."""
    await cluster.create("checkpoints", checkpoint_body("hook", TEMPLATE))
    port = free_port()
    settings = Settings(
        kube=login(cluster, WEBHOOK, tmp_path),
        webhook=WebhookSettings(host="127.0.0.1", port=port),
    )
    stop = asyncio.Event()
    serving = asyncio.ensure_future(run_webhook(settings, stop))
    pod = pod_body("hook-0")
    pod["metadata"]["annotations"] = {RESTORE_FROM_ANNOTATION: "hook"}
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": TENANT,
            "object": pod,
        },
    }
    try:
        async with aiohttp.ClientSession() as session:

            async def answered() -> Any:
                try:
                    async with session.post(
                        f"https://127.0.0.1:{port}/mutate", json=review, ssl=False
                    ) as reply:
                        return await reply.json()
                except aiohttp.ClientConnectionError:
                    assert not serving.done(), serving.exception()
                    return None

            answer = await until(answered, "the webhook's answer")
        assert answer["response"]["allowed"]
        patch = base64.b64decode(answer["response"]["patch"]).decode()
        assert "cold: checkpoint hook is not Ready" in patch  # read, not refused

        # An eviction of a pod that opted in to capture before a drain: held (pod, its
        # PodSnapshot and its node read).
        await cordoned_pod(cluster, "drain-webhook", "hook-1")
        eviction = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": str(uuid.uuid4()),
                "kind": {"group": "policy", "version": "v1beta1", "kind": "Eviction"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "subResource": "eviction",
                "operation": "CREATE",
                "namespace": TENANT,
                "name": "hook-1",
                "object": {"metadata": {"name": "hook-1", "namespace": TENANT}},
            },
        }
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"https://127.0.0.1:{port}/evict", json=eviction, ssl=False) as reply,
        ):
            held = (await reply.json())["response"]
        assert (
            held["status"]["code"] == 429 and "waiting for its capture" in held["status"]["message"]
        )
    finally:
        stop.set()
        await serving
    check(cluster, WEBHOOK)


async def test_the_node_worker_calls_exactly_its_allowlist(
    client: Client, cluster: Cluster, tmp_path: Path
) -> None:
    """A cluster node's restore-target watch and its read of a credentials Secret, as
    `warmstart worker --role node` composes them."""
    settings = Settings(
        home=tmp_path / "home",
        kube=login(cluster, NODE, tmp_path),
        node=NodeSettings(name="gpu-1", cluster=True),
    )
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3", "namespace": TENANT},
        "data": {"AWS_ACCESS_KEY_ID": base64.b64encode(b"AKIA").decode()},
    }
    await cluster.run(cluster.core.create_namespaced_secret, TENANT, secret)
    assert await asyncio.to_thread(secret_reader(settings), TENANT, "s3")

    # The watch `watching_restore_targets` runs, built as it builds it.
    api = api_client(settings.kube)
    targets = RestoreTargetWatch(
        configuration=configuration(settings.kube),
        client=client,
        node="gpu-1",
        control_task_queue="control",
        deadline_seconds=60,
        read_checkpoint=checkpoint_reader(kubernetes.CustomObjectsApi(api), timeout_seconds=5),
    )
    stop = asyncio.Event()
    running = asyncio.ensure_future(targets.run(stop))
    try:
        await until(lambda: _listed(targets), "the node's list of its restore targets")
        # Past the list, a pod reaches the node only through the watch; scheduled here, the
        # Checkpoint it names is read from its own namespace.
        target = pod_body("target-0", **{RESTORE_TARGET_LABEL: "true"})
        target["metadata"]["annotations"] = {RESTORE_FROM_ANNOTATION: "llama"}
        target["spec"]["nodeName"] = "gpu-1"
        await cluster.run(cluster.core.create_namespaced_pod, TENANT, target)
        await until(lambda: _considered(targets), "the watch to hand the pod over")
        await targets.checkpoints.get(TENANT, "llama")  # the read ahead, once it lands
        assert targets.health.relists == 0
    finally:
        stop.set()
        await running
        targets.checkpoints.close()
        api.close()  # type: ignore[no-untyped-call]
    check(cluster, NODE)


async def _listed(targets: RestoreTargetWatch) -> bool:
    return bool(targets.health.resource_version)


async def _considered(targets: RestoreTargetWatch) -> bool:
    return targets.considered > 0


async def test_outside_the_namespaces_that_opted_in_writes_and_secrets_are_refused(
    authorizing: Cluster, tmp_path: Path
) -> None:
    """On the real API server: a Checkpoint in a namespace that did not opt in has its status
    written (our own resource), but its capture Job is refused, naming it; no node reads a
    Secret there; the webhook reads no Secret anywhere."""
    cluster = authorizing
    body = checkpoint_body("there", TEMPLATE)
    body["metadata"]["namespace"] = ELSEWHERE
    obj = await cluster.create("checkpoints", body)
    ref = ResourceRef(
        kind="Checkpoint", namespace=ELSEWHERE, name="there", uid=obj["metadata"]["uid"]
    )
    api = api_client(login(cluster, CONTROLLER, tmp_path))
    try:
        control = KubeControlActivities(api, claims_namespace=NAMESPACE)
        env = ActivityEnvironment()
        await env.run(control.publish_status, status(ref))
        assert (await cluster.get("checkpoints", ELSEWHERE, "there"))["status"]["phase"] == (
            Phase.CREATING.value
        )
        with pytest.raises(ForbiddenError, match=f"may not create Job {ELSEWHERE}/"):
            await env.run(control.create_capture_job, JobInput(resource=ref, version=VERSION))
    finally:
        api.close()  # type: ignore[no-untyped-call]

    secret = {"metadata": {"name": "s3", "namespace": ELSEWHERE}, "data": {}}
    await cluster.run(cluster.core.create_namespaced_secret, ELSEWHERE, secret)
    node = Settings(kube=login(cluster, NODE, tmp_path))
    with pytest.raises(StorageError, match=f"may not read Secret {ELSEWHERE}/s3"):
        await asyncio.to_thread(secret_reader(node), ELSEWHERE, "s3")

    webhook = Settings(kube=login(cluster, WEBHOOK, tmp_path))
    with pytest.raises(StorageError, match=f"may not read Secret {ELSEWHERE}/s3"):
        await asyncio.to_thread(secret_reader(webhook), ELSEWHERE, "s3")
