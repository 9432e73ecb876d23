"""Log set-up: native code's writes to stderr during TensorFlow's start-up become debug records."""

from __future__ import annotations

import io
import json
import os

import pytest

from bikewatch.logs import configure, native_stderr_as_debug
from harness import Daemon


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
        raw = [line for line in d.lines if not line.startswith("{")]
        assert raw == [], "\n".join(raw)
        kept = [e["line"] for e in d.events("tensorflow start-up")]
        assert d.terminate() == 0
    finally:
        d.stop_quietly()
    # What TensorFlow wrote is not lost: it is in the debug records (when it wrote anything).
    assert all(isinstance(line, str) and line for line in kept)
