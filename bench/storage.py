"""Storage throughput: the filesystem backend against `cp -r`, and the S3 backend against a
naive single stream (put_object/get_object file by file) and boto3's defaults
(upload_file/download_file), all on one moto S3 server (a subprocess). The CPU time of
the server and of this process (the client) is printed per transfer, to show which side
is the bottleneck.

Usage, from the repository root: `.venv/bin/python -m bench.storage [--sizes 1,4]
[--repeat 3] [--only filesystem|s3]`. The filesystem copies run `--repeat` times each,
interleaved, and report their median: page cache and writeback drift between runs. A
durable copy (fsync per file) is compared with `cp -r; sync`, a plain one with `cp -r`.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import boto3

from activities.storage.objectstore.filesystem import FilesystemBackend
from activities.storage.objectstore.s3 import S3Backend, S3Location
from activities.storage.objectstore.s3calls import client_config
from activities.storage.objectstore.transfer import TransferSettings
from activities.storage.store import CheckpointStore, digest_tree
from api.identity import CheckpointIdentity
from api.manifest import CriuInfo, HostInfo, Manifest, SourceInfo
from workers.ports import free_port, port_open

GiB = 1 << 30
MiB = 1 << 20
CKPT = "0123456789abcdef"
VERSION = "20260101T000000Z-bench0"
_BLOCK = os.urandom(16 * MiB)


@dataclass
class Row:
    what: str
    seconds: float
    nbytes: int
    server_cpu: float | None = None
    client_cpu: float = 0.0

    @property
    def mbps(self) -> float:
        return self.nbytes / self.seconds / 1e6


def build_tree(root: Path, size: int) -> Path:
    """A committed version of `size` bytes: 10% in 300 small files, the rest in 4 large."""
    store = CheckpointStore(root)
    staging = store.fresh_staging(CKPT, VERSION)
    (staging / "criu").mkdir()
    small = size // 10 // 300
    for n in range(300):
        _write(staging / "criu" / f"small-{n}.img", small, seed=n)
    for n in range(4):
        _write(staging / "criu" / f"pages-{n}.img", (size - 300 * small) // 4, seed=1000 + n)
    manifest = Manifest(
        checkpoint_id=CKPT,
        version=VERSION,
        identity=CheckpointIdentity(model="bench", backend_framework="vllm"),
        created_at=datetime.now(UTC),
        source=SourceInfo(node="bench", namespace="bench", name="bench"),
        criu=CriuInfo(version="4.2.1"),
        host=HostInfo(kernel="k", arch="x86_64"),
        files=digest_tree(staging),
    )
    return store.commit(staging, manifest)


def _write(path: Path, size: int, *, seed: int) -> None:
    """Random-looking bytes, fast: one random block, each copy prefixed differently."""
    with path.open("wb") as out:
        written, n = 0, 0
        while written < size:
            chunk = (seed * 1_000_003 + n).to_bytes(8, "little") + _BLOCK[8:]
            written += out.write(chunk[: size - written])
            n += 1


def warm_memory(nbytes: int) -> None:
    """Touch and free memory once: this VM backs fresh memory lazily (see ENVIRONMENT)."""
    buf = bytearray(nbytes)
    for offset in range(0, nbytes, 4096):
        buf[offset] = 1
    del buf


@contextmanager
def moto_server() -> Iterator[tuple[str, int]]:
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_open(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("moto_server did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(
    what: str, nbytes: int, run: Callable[[], object], *, server: int | None, quiet: bool = False
) -> Row:
    before = cpu_seconds(server) if server else 0.0
    mine = _own_cpu()
    start = time.monotonic()
    run()
    seconds = time.monotonic() - start
    cpu = cpu_seconds(server) - before if server else None
    row = Row(what, seconds, nbytes, cpu, _own_cpu() - mine)
    if not quiet:
        _print_row(row)
    return row


def _own_cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def _print_row(row: Row, *, note: str = "") -> None:
    server = (
        f"{row.server_cpu:6.1f} s ({row.server_cpu / row.seconds:4.0%})" if row.server_cpu else ""
    )
    client = f"{row.client_cpu:6.1f} s ({row.client_cpu / row.seconds:4.0%})"
    print(
        f"  {row.what:<44} {row.seconds:7.2f} s {row.mbps:8.0f} MB/s  client {client}  "
        f"server {server}  {note}".rstrip(),
        flush=True,
    )


def files_of(version_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(version_dir)) for p in version_dir.rglob("*") if p.is_file())


def bench_filesystem(version: Path, work: Path, size: int, *, repeat: int) -> list[Row]:
    """Each contender `repeat` times, interleaved (page cache and writeback state drift
    between runs); the median run of each is reported."""
    contenders = ("cp -r", "cp -r; sync", "ours, durable", "ours, not durable")
    runs: dict[str, list[Row]] = {attempt: [] for attempt in contenders}
    for _ in range(repeat):
        for attempt in contenders:
            target = work / "pvc"
            shutil.rmtree(target, ignore_errors=True)
            run: Callable[[], object]
            if attempt.startswith("cp"):
                command = f"cp -r {version} {target}" + ("; sync" if "sync" in attempt else "")
                run = partial(subprocess.run, command, shell=True, check=True)
            else:
                settings = TransferSettings(durable="not durable" not in attempt)
                backend = FilesystemBackend(root=target, settings=settings)
                run = partial(backend.upload_version, version, checkpoint_id=CKPT, version=VERSION)
            subprocess.run(["sync"], check=True)
            runs[attempt].append(timed(f"filesystem {attempt}", size, run, server=None, quiet=True))
    shutil.rmtree(work / "pvc", ignore_errors=True)
    rows = []
    for measured in runs.values():
        median = sorted(measured, key=lambda r: r.seconds)[len(measured) // 2]
        spread = ", ".join(f"{r.seconds:.2f}" for r in measured)
        _print_row(median, note=f"median of {len(measured)}: {spread} s")
        rows.append(median)
    return rows


def bench_s3(version: Path, work: Path, size: int, settings: TransferSettings) -> list[Row]:
    rows = []
    with moto_server() as (endpoint, pid):
        print(f"  (S3 server: moto_server subprocess, pid {pid}, {endpoint})")
        plain = _client(endpoint, None)
        ours = S3Backend(
            client=_client(endpoint, settings), location=S3Location("ours"), settings=settings
        )
        names = files_of(version)
        contenders: dict[str, tuple[Callable[[str], object], Callable[[str, Path], object]]] = {
            "ours": (
                lambda b: ours.upload_version(version, checkpoint_id=CKPT, version=VERSION),
                lambda b, dest: ours.download_version(
                    checkpoint_id=CKPT, version=VERSION, dest_dir=dest
                ),
            ),
            "naive single stream": (
                lambda b: _naive_upload(plain, b, version, names),
                lambda b, dest: _naive_download(plain, b, dest, names),
            ),
            "boto3 defaults": (
                lambda b: [plain.upload_file(str(version / n), b, n) for n in names],
                lambda b, dest: _default_download(plain, b, dest, names),
            ),
        }
        for name, (upload, download) in contenders.items():
            bucket = name.split()[0]
            plain.create_bucket(Bucket=bucket)
            send = partial(upload, bucket)
            rows.append(timed(f"S3 upload: {name}", size, send, server=pid))
            fetch = partial(download, bucket, work / "fetched" / VERSION)
            rows.append(timed(f"S3 download: {name}", size, fetch, server=pid))
            shutil.rmtree(work / "fetched")
            _empty(plain, bucket)
    return rows


def _client(endpoint: str, settings: TransferSettings | None) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        config=client_config(settings) if settings else None,
    )


def _naive_upload(client: Any, bucket: str, version: Path, names: list[str]) -> None:
    for name in names:
        with (version / name).open("rb") as body:
            client.put_object(Bucket=bucket, Key=name, Body=body)


def _naive_download(client: Any, bucket: str, dest: Path, names: list[str]) -> None:
    for name in names:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        body = client.get_object(Bucket=bucket, Key=name)["Body"]
        with (dest / name).open("wb") as out:
            while chunk := body.read(8 * MiB):
                out.write(chunk)


def _default_download(client: Any, bucket: str, dest: Path, names: list[str]) -> None:
    for name in names:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, name, str(dest / name))


def _empty(client: Any, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=item["Key"])


def summary(rows: list[Row]) -> None:
    by = {row.what: row for row in rows}
    pairs = (("ours, durable", "cp -r; sync"), ("ours, not durable", "cp -r"))
    for ours, theirs in pairs:
        if f"filesystem {ours}" in by:
            ratio = by[f"filesystem {theirs}"].seconds / by[f"filesystem {ours}"].seconds
            print(f"  filesystem {ours}: {ratio:.2f}x the speed of {theirs}")
    for direction in ("upload", "download"):
        if f"S3 {direction}: ours" not in by:
            continue
        mine = by[f"S3 {direction}: ours"]
        for other in ("naive single stream", "boto3 defaults"):
            theirs = by[f"S3 {direction}: {other}"]
            print(f"  S3 {direction}, ours vs {other}: {theirs.seconds / mine.seconds:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1,4", help="tree sizes in GiB, comma-separated")
    parser.add_argument("--part-size-mib", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--dir", default=None, help="where to build the trees (default: TMPDIR)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each filesystem copy")
    parser.add_argument("--only", choices=("filesystem", "s3"), help="one of the two parts")
    args = parser.parse_args()
    settings = TransferSettings(part_size=args.part_size_mib * MiB, concurrency=args.concurrency)
    print(f"settings: {settings}")
    warm_memory(min(6 * GiB, 2 * max(int(float(s) * GiB) for s in args.sizes.split(","))))
    for text in args.sizes.split(","):
        size = int(float(text) * GiB)
        with tempfile.TemporaryDirectory(prefix="warmstart-bench-", dir=args.dir) as tmp:
            work = Path(tmp)
            version = build_tree(work / "node", size)
            print(f"\n{text} GiB tree ({len(files_of(version))} files):")
            rows = []
            if args.only != "s3":
                rows += bench_filesystem(version, work, size, repeat=args.repeat)
            if args.only != "filesystem":
                rows += bench_s3(version, work, size, settings)
            summary(rows)
        used = resource.getrusage(resource.RUSAGE_SELF)
        print(f"  (bench process CPU so far: {used.ru_utime + used.ru_stime:.1f} s)")


if __name__ == "__main__":
    main()
