"""CLI latency: wall time of `warmstart` commands from the shell, against baselines.

Measures, as the median and p90 of N runs of whole processes (time.perf_counter around
subprocess.run): interpreter start (`python3 -c pass`), `warmstart --help`, `warmstart list`
answered by the dev server's control worker (the CLI reads no local disk), and
`warmstart restore NAME -o json` side by side with a raw `criu restore --restore-detached`
of the same committed image. The restore pair runs against a throwaway `warmstart dev`
(temporary WARMSTART_HOME, free ports) and a captured `python -m http.server` workload;
each restored process is checked to answer HTTP (untimed), then killed. One untimed restore
first says which way `warmstart restore` goes (this node's worker, or the Temporal SDK).
Needs root and CRIU >= 4.2; uses only the `warmstart` and `criu` executables.

Usage, from the repository root: `.venv/bin/python -m bench.cli_latency [--runs N]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINT = "bench-http"
DEV_READY_SECONDS = 60.0
CAPTURE_TIMEOUT_SECONDS = 120.0
RESTORE_TIMEOUT_SECONDS = 60.0
ANSWER_SECONDS = 10.0
EXIT_SECONDS = 10.0
STALE_SENTINELS = ("restore-complete", "restore-failed", "snapshot-complete", "ready-for-snapshot")
CLI_TARGET = 0.25
ADDED_TARGET = 0.35


@dataclass(frozen=True)
class Workload:
    """A `python -m http.server` on a free port, which knows nothing of sentinels."""

    argv: tuple[str, ...]
    url: str
    cwd: Path


@dataclass(frozen=True)
class Bench:
    """What a capture set up: the CLI, its environment, and where the committed image lives."""

    warmstart: str
    criu: str
    env: Mapping[str, str]
    workload: Workload
    version_dir: Path
    log_path: Path
    control_dir: Path
    scratch: Path


@dataclass(frozen=True)
class Row:
    label: str
    p50: float
    p90: float
    target: str = "-"
    limit: float | None = None

    @property
    def met(self) -> bool | None:
        return None if self.limit is None else self.p50 <= self.limit


def warm_memory(size: int = 2 << 30, page: int = 4096) -> None:
    """Touch 2 GiB once: this VM backs memory lazily and first touches are slow."""
    buf = bytearray(size)
    for offset in range(0, size, page):
        buf[offset] = 1
    del buf


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_warmstart() -> str:
    beside = Path(sys.executable).with_name("warmstart")
    found = str(beside) if beside.exists() else shutil.which("warmstart")
    if found is None:
        raise SystemExit("warmstart executable not found")
    return found


def find_criu() -> str:
    found = shutil.which("criu") or shutil.which("criu", path="/usr/local/sbin:/usr/sbin:/sbin")
    if found is None:
        raise SystemExit("criu executable not found")
    return found


def timed(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60.0,
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall time of one whole process, from start to exit."""
    started = time.perf_counter()
    proc = subprocess.run(
        list(cmd), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    return time.perf_counter() - started, proc


def checked(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, proc.args))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def json_object(text: str) -> dict[str, Any]:
    document = json.loads(text)
    if not isinstance(document, dict):
        raise RuntimeError(f"expected a JSON object, got: {text!r}")
    return document


def p50_p90(samples: Sequence[float]) -> tuple[float, float]:
    if len(samples) < 2:
        return samples[0], samples[0]
    return statistics.median(samples), statistics.quantiles(samples, n=10, method="inclusive")[8]


def sample(cmd: Sequence[str], runs: int, env: Mapping[str, str] | None = None) -> list[float]:
    results = [timed(cmd, env) for _ in range(runs)]
    for _, proc in results:
        checked(proc)
    return [seconds for seconds, _ in results]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def await_answer(url: str, seconds: float = ANSWER_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not http_ok(url):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {seconds:g} s")
        time.sleep(0.02)


def process_state(pid: int) -> str | None:
    """The /proc state letter of `pid`, or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rpartition(")")[2].split()[0]


def kill_restored(pid: int) -> None:
    """SIGKILL (a PID namespace init ignores SIGTERM), then wait until gone or a zombie."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + EXIT_SECONDS
    while process_state(pid) not in (None, "Z"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"restored pid {pid} still alive {EXIT_SECONDS:g} s after SIGKILL")
        time.sleep(0.005)


def kill_leftovers(argv: Sequence[str]) -> None:
    """Kill any process still running exactly our workload's command line (unique port)."""
    wanted = "\0".join(argv) + "\0"
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            cmdline = (proc_dir / "cmdline").read_text()
        except OSError:
            continue
        if cmdline == wanted:
            print(f"killing leftover workload pid {proc_dir.name}", file=sys.stderr)
            kill_restored(int(proc_dir.name))


def http_workload(cwd: Path) -> Workload:
    cwd.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = (sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1")
    return Workload(argv=argv, url=f"http://127.0.0.1:{port}/", cwd=cwd)


def dev_env(home: Path, port: int, ui_port: int) -> dict[str, str]:
    return os.environ | {
        "WARMSTART_HOME": str(home),
        "WARMSTART_TEMPORAL__ADDRESS": f"127.0.0.1:{port}",
        "WARMSTART_TEMPORAL__UI_PORT": str(ui_port),
        "WARMSTART_NODE__NAME": "local",
    }


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def dev_server(
    warmstart: str, env: Mapping[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`warmstart dev` in the background; stopped with SIGINT, then SIGTERM, then SIGKILL."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [warmstart, "dev"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    for sig, grace in ((signal.SIGINT, 20.0), (signal.SIGTERM, 10.0)):
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # its own process group: whatever it left behind
    proc.wait()


def capture(
    warmstart: str, env: Mapping[str, str], dev: subprocess.Popen[bytes], workload: Workload
) -> dict[str, Any]:
    """Retry the capture itself until the dev server and its workers take it, or 60 s pass."""
    cmd = [warmstart, "capture", CHECKPOINT, "--ready-http", workload.url, "-o", "json"]
    cmd += ["--", *workload.argv]
    deadline = time.monotonic() + DEV_READY_SECONDS
    while True:
        if dev.poll() is not None:
            raise RuntimeError(f"warmstart dev exited with {dev.returncode}")
        _, proc = timed(cmd, env, workload.cwd, timeout=CAPTURE_TIMEOUT_SECONDS)
        if proc.returncode == 0:
            return json_object(proc.stdout)
        if time.monotonic() > deadline:
            checked(proc)
        time.sleep(0.5)


def committed(home: Path, result: Mapping[str, Any]) -> tuple[Path, Path, Path]:
    """The version directory, and the output file and control directory named in its manifest."""
    version_dir = home / "checkpoints" / result["checkpoint_id"] / "versions" / result["version"]
    source = json_object((version_dir / "manifest.json").read_text())["source"]
    return version_dir, Path(source["log_path"]), Path(source["control_dir"])


def finish(url: str, pid: int) -> None:
    """Check the restored process answers (untimed), then kill it."""
    try:
        await_answer(url)
    finally:
        kill_restored(pid)


def restore_warmstart(bench: Bench) -> float:
    cmd = [bench.warmstart, "restore", CHECKPOINT, "-o", "json"]
    seconds, proc = timed(cmd, bench.env, timeout=RESTORE_TIMEOUT_SECONDS)
    result = json_object(checked(proc).stdout)
    if "pid" not in result:
        kill_leftovers(bench.workload.argv)
        raise RuntimeError(f"restore JSON has no pid field; it has {sorted(result)}: {result}")
    finish(bench.workload.url, int(result["pid"]))
    return seconds


def restore_path(bench: Bench) -> str:
    """Which way `warmstart restore` went (one untimed run): through this node's worker, or
    through the Temporal SDK (docs/decisions/0035), from Python's import-time report."""
    env = {**bench.env, "PYTHONPROFILEIMPORTTIME": "1"}
    cmd = [bench.warmstart, "restore", CHECKPOINT, "-o", "json"]
    _, proc = timed(cmd, env, timeout=RESTORE_TIMEOUT_SECONDS)
    finish(bench.workload.url, int(json_object(checked(proc).stdout)["pid"]))
    if "| temporalio.client" in proc.stderr:
        return "the Temporal SDK (temporalio.client imported)"
    return "this node's worker (no Temporal SDK imported)"


def prepare_raw(bench: Bench) -> None:
    """What CRIU needs by path, as the pipeline does it: the output file, no stale sentinels."""
    bench.log_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bench.version_dir / "workload-output.log", bench.log_path)
    for name in STALE_SENTINELS:
        (bench.control_dir / name).unlink(missing_ok=True)


def restore_raw(bench: Bench) -> float:
    prepare_raw(bench)
    work = Path(tempfile.mkdtemp(prefix="criu-", dir=bench.scratch))
    pidfile = work / "pid"
    cmd = [bench.criu, "restore", "--images-dir", str(bench.version_dir / "criu")]
    cmd += ["--work-dir", str(work), "--log-file", "restore.log", "--pidfile", str(pidfile)]
    cmd += ["--restore-detached"]
    seconds, proc = timed(cmd, timeout=RESTORE_TIMEOUT_SECONDS)
    if proc.returncode != 0:
        raise RuntimeError(
            f"criu restore exited {proc.returncode}:\n{log_tail(work / 'restore.log')}"
        )
    finish(bench.workload.url, int(pidfile.read_text()))
    return seconds


def restore_pairs(bench: Bench, runs: int) -> tuple[list[float], list[float]]:
    """Both contenders each run, alternating which goes first."""
    ws: list[float] = []
    raw: list[float] = []
    for run in range(runs):
        if run % 2 == 0:
            ws.append(restore_warmstart(bench))
            raw.append(restore_raw(bench))
        else:
            raw.append(restore_raw(bench))
            ws.append(restore_warmstart(bench))
    return ws, raw


def list_through_control(bench: Bench, runs: int) -> list[float]:
    """`warmstart list` answered by the control worker; it must show the checkpoint."""
    _, first = timed([bench.warmstart, "list", "-o", "json"], bench.env)
    names = [entry.get("name") for entry in json.loads(checked(first).stdout)]
    if CHECKPOINT not in names:
        raise RuntimeError(f"warmstart list does not show {CHECKPOINT}:\n{first.stdout}")
    return sample([bench.warmstart, "list"], runs, bench.env)


def pipeline_bench(
    warmstart: str, criu: str, scratch: Path, runs: int
) -> tuple[list[float], list[float], list[float], str]:
    """Capture under a throwaway `warmstart dev`; then time list, and restore against raw CRIU."""
    home, workload = scratch / "home", http_workload(scratch / "workload")
    env = dev_env(home, free_port(), free_port())
    log = scratch / "warmstart-dev.log"
    try:
        with dev_server(warmstart, env, log) as dev:
            version_dir, log_path, control_dir = committed(
                home, capture(warmstart, env, dev, workload)
            )
            bench = Bench(
                warmstart=warmstart,
                criu=criu,
                env=env,
                workload=workload,
                version_dir=version_dir,
                log_path=log_path,
                control_dir=control_dir,
                scratch=scratch,
            )
            listed = list_through_control(bench, runs)
            path = restore_path(bench)
            ws, raw = restore_pairs(bench, runs)
            return listed, ws, raw, path
    except BaseException:
        print(f"--- tail of {log}:\n{log_tail(log)}", file=sys.stderr)
        raise
    finally:
        kill_leftovers(workload.argv)


def rows(
    python: list[float], help_: list[float], listed: list[float], ws: list[float], raw: list[float]
) -> list[Row]:
    raw_p50, raw_p90 = p50_p90(raw)
    ws_p50, ws_p90 = p50_p90(ws)
    return [
        Row("python3 -c pass", *p50_p90(python)),
        Row("warmstart --help", *p50_p90(help_), f"<= {CLI_TARGET}", CLI_TARGET),
        Row("warmstart list (control)", *p50_p90(listed)),
        Row("criu restore (raw, same image)", raw_p50, raw_p90),
        Row(
            "warmstart restore", ws_p50, ws_p90, f"<= raw + {ADDED_TARGET}", raw_p50 + ADDED_TARGET
        ),
        Row(
            "restore added over raw criu",
            ws_p50 - raw_p50,
            ws_p90 - raw_p90,
            f"<= {ADDED_TARGET}",
            ADDED_TARGET,
        ),
    ]


def report(table: list[Row], runs: int) -> None:
    print(f"CLI wall time from the shell, median of {runs} runs (s)")
    print(f"{'command':<38}{'p50':>7}{'p90':>8}{'target':>16}")
    for row in table:
        print(f"{row.label:<38}{row.p50:>7.3f}{row.p90:>8.3f}{row.target:>16}")
    verdicts = [
        f"{row.label}: {'met' if row.met else 'missed'}" for row in table if row.limit is not None
    ]
    print("targets (on p50): " + "; ".join(verdicts))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10, help="runs per command (default 10)")
    args = parser.parse_args(argv)
    runs: int = max(1, args.runs)
    warm_memory()
    warmstart, criu = find_warmstart(), find_criu()
    python = sample([sys.executable, "-c", "pass"], runs)
    help_ = sample([warmstart, "--help"], runs)
    scratch = Path(tempfile.mkdtemp(prefix="warmstart-cli-bench-"))
    try:
        listed, ws, raw, path = pipeline_bench(warmstart, criu, scratch, runs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(rows(python, help_, listed, ws, raw), runs)
    print(f"warmstart restore went through {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
