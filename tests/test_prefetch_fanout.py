"""A version prefetched to several nodes at most N at a time (issue 24, point 3; decision
0042): real node workers, the real PrefetchWorkflow, a real S3-protocol server counting
what it serves."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.client import Client

from tests.checkpoint_trees import MiB
from tests.conftest import needs_criu
from tests.fanout import FanOut, fan_out
from tests.s3server import ACCESS_KEY, SECRET_KEY, new_bucket, s3_client, s3_process

NODES = 4
AT_ONCE = 2


@pytest.fixture
def s3_recording(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # The nodes' credentials come from boto3's standard chain, as on a real node.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    with s3_process(tmp_path) as endpoint:
        yield endpoint


async def _fan_out(
    client: Client, endpoint: str, tmp: Path, files: dict[str, bytes], *, at_once: int
) -> FanOut:
    bucket = new_bucket(s3_client(endpoint))
    return await fan_out(
        client, endpoint=endpoint, bucket=bucket, tmp=tmp, files=files, nodes=NODES, at_once=at_once
    )


@needs_criu  # a node worker checks its CRIU when it starts
async def test_prefetch_to_many_nodes_reads_each_byte_once_per_node_at_most_n_at_a_time(
    client: Client, s3_recording: str, tmp_path: Path
) -> None:
    files = {
        "criu/pages-1.img": os.urandom(12 * MiB),  # its chunk table comes with it
        "criu/core-1.img": os.urandom(70_000),
        "workload-output.log": b"serving\n",
    }
    run = await _fan_out(client, s3_recording, tmp_path, files, at_once=AT_ONCE)
    assert [node.error for node in run.report.nodes] == [""] * NODES
    assert all(node.result is not None and node.result.downloaded for node in run.report.nodes)
    # Never more than AT_ONCE nodes fetching: the workflow's own record says so.
    assert run.most_at_once == AT_ONCE
    # Every file of the version served once per node, never more (counted by the server).
    per_node = run.file_reads_per_node(NODES)
    assert len(per_node) == len(files)  # the page image's chunk table among them
    assert set(per_node.values()) == {1.0}, per_node
    for node in range(NODES):
        name = run.report.nodes[node].node
        cached = list((tmp_path / name / "cache").rglob("criu/pages-1.img"))
        assert len(cached) == 1 and cached[0].read_bytes() == files["criu/pages-1.img"]


@needs_criu
async def test_without_a_cap_every_node_fetches_at_once(
    client: Client, s3_recording: str, tmp_path: Path
) -> None:
    files = {"criu/pages-1.img": os.urandom(1 * MiB), "workload-output.log": b"serving\n"}
    run = await _fan_out(client, s3_recording, tmp_path, files, at_once=0)
    assert [node.error for node in run.report.nodes] == [""] * NODES
    assert run.most_at_once == NODES
    assert set(run.file_reads_per_node(NODES).values()) == {1.0}
