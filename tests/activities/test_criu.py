"""CRIU command lines and log parsing (the real binary runs in tests/test_pipeline_local.py)."""

from pathlib import Path

from activities.criu import Criu, log_errors


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
