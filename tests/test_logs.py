"""Log set-up: one format for every record (structlog's, the standard library's, Python warnings'),
and native code's writes to stderr during TensorFlow's start-up become debug records."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import warnings

import pytest

from bikewatch.logs import configure, get_logger, native_stderr_as_debug
from harness import Daemon


# conftest's logging_as_it_was puts the root logger and structlog back after each test here.


def test_native_writes_to_fd_2_become_debug_records(capfd: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    configure("json", "debug", out)
    with native_stderr_as_debug("native start-up"):
        os.write(2, b"E0000 00:00:1 cuda_platform.cc:52] failed call to cuInit\n\nsecond line\n")
    os.write(2, b"after the block\n")
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["event"], r["level"], r["line"]) for r in records] == [
        ("native start-up", "debug", "E0000 00:00:1 cuda_platform.cc:52] failed call to cuInit"),
        ("native start-up", "debug", "second line"),
    ]
    err = capfd.readouterr().err
    assert "cuInit" not in err and "after the block" in err  # fd 2 is itself again afterwards


def test_native_lines_are_dropped_below_debug_and_fd_2_is_restored_on_error(capfd: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    configure("json", "info", out)
    with pytest.raises(RuntimeError):
        with native_stderr_as_debug("native start-up"):
            os.write(2, b"noise\n")
            raise RuntimeError("no GPU")
    os.write(2, b"visible again\n")
    assert out.getvalue() == ""
    assert capfd.readouterr().err == "visible again\n"


def test_the_daemon_starts_without_raw_tensorflow_lines(tmp_path):  # type: ignore[no-untyped-def]
    d = Daemon(tmp_path, settings={"log_level": "debug"}).start()
    try:
        raw = [line for line in d.lines if not is_json_object(line)]
        assert raw == [], "\n".join(raw)
        kept = [e["line"] for e in d.events("tensorflow start-up")]
        assert d.terminate() == 0
    finally:
        d.stop_quietly()
    # What TensorFlow wrote is not lost: it is in the debug records (when it wrote anything).
    assert all(isinstance(line, str) and line for line in kept)


def is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def test_stdlib_records_and_warnings_are_json_lines_like_structlogs() -> None:
    out = io.StringIO()
    configure("json", "info", out)
    get_logger().info("sorted", file="a.jpg")
    logging.getLogger("watchdog.observers.inotify_buffer").warning("inotify queue overflow in %s", "/in")
    logging.getLogger("watchdog").info("below warning: left out")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a library is unhappy", UserWarning, stacklevel=1)
    try:
        raise OSError("disk gone")
    except OSError:
        logging.getLogger("tensorflow").exception("cannot save")
    lines = out.getvalue().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert [(r.get("logger"), r["level"]) for r in records] == [
        (None, "info"), ("watchdog.observers.inotify_buffer", "warning"), ("py.warnings", "warning"),
        ("tensorflow", "error")]
    assert records[1]["event"] == "inotify queue overflow in /in"
    assert "a library is unhappy" in records[2]["event"] and not records[2]["event"].endswith("\n")
    assert "OSError: disk gone" in records[3]["exception"]
    assert all(r["timestamp"].endswith("Z") for r in records)


def test_console_format_renders_stdlib_records_as_structlog_does_and_reconfiguring_replaces_it() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure("json", "info", first)
    configure("console", "info", second)
    logging.getLogger("watchdog").warning("watch limit reached")
    get_logger().warning("output blocked")
    assert first.getvalue() == ""  # the first set-up's handler is gone, not doubled
    lines = second.getvalue().splitlines()
    assert len(lines) == 2 and all("[warning" in line and not line.startswith("{") for line in lines)
    assert "watch limit reached" in lines[0] and "watchdog" in lines[0]


def test_log_level_error_drops_library_warnings() -> None:
    out = io.StringIO()
    configure("json", "error", out)
    logging.getLogger("watchdog").warning("not shown")
    logging.getLogger("watchdog").error("shown")
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["shown"]


CHILD = """
import logging, sys, warnings
from bikewatch.logs import configure, get_logger
configure(sys.argv[1], "info", sys.stderr)
get_logger().info("started")
logging.getLogger("watchdog").warning("inotify watch limit reached")
warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
import PIL.Image  # a real library import between the records
logging.getLogger("PIL").error("cannot identify image file")
"""


def test_a_child_process_writes_only_json_lines_to_stderr() -> None:
    env = {**os.environ, "PYTHONWARNINGS": "always"}
    done = subprocess.run([sys.executable, "-c", CHILD, "json"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert [r.get("logger") for r in records] == [None, "watchdog", "py.warnings", "PIL"]
