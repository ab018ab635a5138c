"""A Checkpoint stored in S3 on a cluster, end to end: captured from a real containerd
container and uploaded to a real S3-protocol server with the keys of a Secret the node
reads through the API server, then restored into a new pod's standby container by a node
that never had the version, which fetches it into its cache. Against kmock and a real
kube-apiserver."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client

from activities.host.layout import NodeLayout
from tests.checkpoint_trees import fetched
from tests.cluster_stack import Target, answer_in, captured, running_stack
from tests.containers import Kubelet, needs_containerd
from tests.kube import Cluster
from tests.s3server import ACCESS_KEY, REGION, SECRET_KEY, new_bucket, s3_client
from workflows.contracts import RestoreResult

pytestmark = [needs_containerd, pytest.mark.timeout(120)]
PREFIX, SECRET = "fleet/a", "s3-keys"


@pytest.fixture
def only_the_secrets_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing in boto3's standard chain: the node can reach the bucket only with the keys
    of the Secret the Checkpoint names."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


async def s3_keys_secret(cluster: Cluster) -> None:
    keys = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET, "namespace": "inference"},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()},
    }
    await cluster.run(cluster.core.create_namespaced_secret, "inference", body)


@pytest.mark.usefixtures("only_the_secrets_keys")
async def test_a_checkpoint_in_s3_is_restored_by_a_node_that_never_had_it(
    client: Client, cluster: Cluster, kubelet: Kubelet, tmp_path: Path, s3_endpoint: str
) -> None:
    s3: Any = s3_client(s3_endpoint)
    bucket = new_bucket(s3)
    await s3_keys_secret(cluster)
    s3_spec = {"bucket": bucket, "prefix": PREFIX, "endpoint": s3_endpoint, "region": REGION}
    storage = {"type": "s3", "s3": {**s3_spec, "credentialsSecret": SECRET}}
    image = kubelet.import_image("local/workload:1")
    async with running_stack(client, cluster, kubelet, tmp_path) as stack:
        resource, token = await captured(stack, image, storage=storage)
        status = resource["status"]
        ckpt, version = status["checkpointID"], status["version"]
        prefix = f"{PREFIX}/{ckpt}/versions/{version}/"
        assert status["storageURI"] == f"s3://{bucket}/{prefix}"
        assert "upload" in status["stepSeconds"]
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
        keys = {o["Key"] for o in listed}
        assert f"{prefix}manifest.json" in keys and any("criu/pages-" in k for k in keys)

        # This node now acts as one that never had it: only S3 holds the version.
        shutil.rmtree(stack.store.checkpoint_dir(ckpt))
        target = Target(stack, "llama-s3", image, tmp_path / "llama-s3.log")
        await target.start(resource)
        assert await target.restore_status() == "restored"
        workflow_id = f"restore/inference/llama-s3/{target.uid}"
        handle = client.get_workflow_handle(workflow_id, result_type=RestoreResult)
        result = await handle.result()

    assert answer_in(target.pid) == token
    # Fetched and verified before the standby ran (`locate`: found by the runtime where
    # this stand-in kubelet started it before the node watched).
    assert set(result.stage_seconds) - {"locate"} == {
        "verify",
        "fetch",
        "await-standby",
        "gate",
        "prepare",
        "criu-restore",
    }
    cache = fetched(NodeLayout(tmp_path / "home").checkpoint_cache)
    assert cache.find(ckpt).name == version
    assert not stack.store.checkpoint_dir(ckpt).exists()
    print(f"\ns3 capture steps: {status['stepSeconds']}; restore: {result.stage_seconds}")
