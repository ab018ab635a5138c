"""CRIU command lines and log parsing (the real binary runs in tests/test_pipeline_local.py)."""

from pathlib import Path

from activities.criu.command import Criu, explain_log, log_errors


def test_dump_command_targets_the_tree_and_logs_in_the_images() -> None:
    cmd = Criu("/usr/local/sbin/criu").dump_command(pid=42, images_dir=Path("/s/criu"))
    assert cmd[:4] == ["/usr/local/sbin/criu", "dump", "--tree", "42"]
    assert cmd[cmd.index("--images-dir") + 1] == "/s/criu"
    assert cmd[cmd.index("--log-file") + 1] == "dump.log"


def test_restore_command_is_detached_and_logs_outside_the_checkpoint() -> None:
    cmd = Criu("criu").restore_command(
        images_dir=Path("/c/criu"), work_dir=Path("/w"), pidfile=Path("/w/pid")
    )
    assert "--restore-detached" in cmd
    assert cmd[cmd.index("--work-dir") + 1] == "/w"
    assert cmd[cmd.index("--pidfile") + 1] == "/w/pid"


def test_log_errors_picks_the_error_lines(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text(
        "(00.001) Dumping task 42\n(00.002) Error (criu/sk-inet.c:1): inet: Connected TCP socket\n"
        "(00.003) Unlocking tty\n"
    )
    assert log_errors(log) == "(00.002) Error (criu/sk-inet.c:1): inet: Connected TCP socket"


def test_log_errors_falls_back_to_the_tail(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text("one\ntwo\n")
    assert log_errors(log) == "one\ntwo"


# What CRIU 4.2 logs on every successful container restore here, word for word.
RESTORE_LOG_OF_A_SUCCESS = """\
Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
iptables-restore: line 3 failed: Bad rule (does a matching rule exist in that chain?).
Error (criu/util.c:657): exited, status=1
ip6tables-restore: line 3 failed: Bad rule (does a matching rule exist in that chain?).
Error (criu/util.c:657): exited, status=1
"""


def test_a_successful_runs_harmless_error_lines_are_explained_in_its_log(tmp_path: Path) -> None:
    log = tmp_path / "restore.log"
    log.write_text(RESTORE_LOG_OF_A_SUCCESS)
    explain_log(log)
    notes = log.read_text().removeprefix(RESTORE_LOG_OF_A_SUCCESS).splitlines()
    assert len(notes) == 3
    assert all(note.startswith("warmstart: harmless, the run succeeded: ") for note in notes)
    assert "fs.nr_open" in notes[0] and "unlocks the network" in notes[1]
    assert "iptables-restore (or ip6tables-restore) helper above" in notes[2]
    # A failure's message names none of them.
    log.write_text(RESTORE_LOG_OF_A_SUCCESS + "Error (criu/files.c:1): Can't open file\n")
    assert "RLIMIT" not in log_errors(log) and "Bad rule" not in log_errors(log)
    assert "Can't open file" in log_errors(log)


def test_a_helper_failing_otherwise_is_not_explained(tmp_path: Path) -> None:
    log = tmp_path / "restore.log"
    log.write_text("Error (criu/util.c:657): exited, status=1\n")
    explain_log(log)
    assert log.read_text() == "Error (criu/util.c:657): exited, status=1\n"


def test_a_lazy_restore_leaves_memory_to_the_daemon_listening_in_its_work_dir() -> None:
    criu = Criu("criu")
    eager = criu.restore_command(images_dir=Path("/c"), work_dir=Path("/w"), pidfile=Path("/p"))
    lazy = criu.restore_command(
        images_dir=Path("/c"), work_dir=Path("/w"), pidfile=Path("/p"), lazy=True
    )
    assert "--lazy-pages" not in eager
    assert lazy == [*eager, "--lazy-pages"]
    daemon = criu.lazy_pages_command(images_dir=Path("/c"), work_dir=Path("/w"), status_fd=7)
    assert daemon[:2] == ["criu", "lazy-pages"]
    assert daemon[daemon.index("--work-dir") + 1] == "/w"  # where restore finds its socket
    assert daemon[daemon.index("--images-dir") + 1] == "/c"
    assert daemon[daemon.index("--status-fd") + 1] == "7"
