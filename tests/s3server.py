"""A real S3-protocol server for the tests (moto's server mode), one per session, and
helpers to reach it with a plain boto3 client and a fresh bucket."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

from workers.ports import free_port

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_client(endpoint: str, *, key: str = ACCESS_KEY, config: Config | None = None) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=key,
        aws_secret_access_key=SECRET_KEY,
        config=config,
    )


def new_bucket(client: Any) -> str:
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


@contextlib.contextmanager
def s3_process(workdir: Path) -> Iterator[str]:
    """moto's S3 server in a process of its own (stopped by its PID), able to record the
    requests it serves into `workdir` once asked (`start_recording`): reads counted where
    they are served, not where they are made."""
    port = free_port()
    env = {**os.environ, "MOTO_RECORDER_FILEPATH": str(workdir / "s3-requests.jsonl")}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


def start_recording(endpoint: str) -> None:
    """The server records every request from now on (and forgets those before)."""
    for step in ("reset-recording", "start-recording"):
        call = urllib.request.Request(f"{endpoint}/moto-api/recorder/{step}", method="POST")
        urllib.request.urlopen(call, timeout=10).close()


@dataclass(frozen=True)
class Reads:
    """What the server sent of each object since recording started: GET requests and bytes
    (a ranged GET counts its range, a plain one the object's size)."""

    gets: dict[str, int]
    bytes: dict[str, int]

    def total(self, under: str = "") -> int:
        return sum(n for key, n in self.bytes.items() if key.startswith(under))


def recorded_reads(endpoint: str, bucket: str) -> Reads:
    """The object reads of `bucket` the server recorded (see `start_recording`)."""
    with urllib.request.urlopen(f"{endpoint}/moto-api/recorder/download-recording") as got:
        lines = got.read().decode().splitlines()
    listed = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    sizes = {o["Key"]: o["Size"] for page in listed for o in page.get("Contents", [])}
    gets: dict[str, int] = {}
    read: dict[str, int] = {}
    for line in lines:
        entry = json.loads(line)
        url = urlsplit(entry["url"])
        path = unquote(url.path).lstrip("/")
        if entry["method"] != "GET" or not path.startswith(f"{bucket}/") or url.query:
            continue  # not an object read (listings carry a query)
        key = path[len(bucket) + 1 :]
        size = sizes.get(key, 0)
        headers = {k.lower(): v for k, v in entry["headers"].items()}
        if found := re.fullmatch(r"bytes=(\d+)-(\d*)", headers.get("range", "")):
            first, last = int(found[1]), int(found[2]) if found[2] else size - 1
            length = max(0, min(last, size - 1) - first + 1)
        else:
            length = size
        gets[key] = gets.get(key, 0) + 1
        read[key] = read.get(key, 0) + length
    return Reads(gets=gets, bytes=read)
