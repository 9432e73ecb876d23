"""Smoke test of the benchmark: a tiny run prints every row and writes its JSON (no speed asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness import REPO


def test_bench_prints_every_measurement(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--photos", "40", "--naive", "10", "--latency-drops", "2",
         "--runs", "2", "--idle-seconds", "1", "--min-seconds", "0.2", "--synthetic", "--workdir", str(tmp_path),
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for row in ("1 naive baseline", "2 decode only", "3 inference only", "4 roofline", "5 end to end",
                "end to end, steady state", "6 latency p50 / p99", "7 idle CPU", "memory idle / peak", "start-up to READY=1",
                "decode limit", "CPU per photo", "8 runtime install", "end-to-end / naive", "end-to-end / decode limit",
                "end-to-end / roofline", "float32 matmul", "inference arithmetic"):
        assert row in res.stdout, f"missing row {row!r} in:\n{res.stdout}"
    assert "decode only (" in res.stdout and "processes)" in res.stdout, res.stdout
    figures = json.loads(out.read_text())
    assert figures, "the JSON output is empty"
    # The ratio targets say what even a service that cost nothing (the roofline) would reach here.
    assert "ceiling here:" in res.stdout, res.stdout
    assert figures["targets"]["vs_decode_limit"]["ceiling"] == figures["ceilings"]["vs_decode_limit"]
    assert figures["machine_ceiling"]["flops_per_photo"] == 102_190_912
    # The roofline is built on the faster way to decode (threads, or the daemon's worker processes).
    decode = max(figures["decode"]["rate"], figures["decode_processes"]["rate"])
    expected = 1 / (1 / decode + 1 / figures["inference"]["rate"])
    assert abs(figures["roofline"]["rate"] - expected) < 1e-6 * expected
    # The daemon's CPU includes its decode workers': it did all the decoding of the end-to-end run.
    assert figures["end_to_end"]["cpu"]["daemon_cpu_s"] > 0
    # Every run is reported; the one compared with the roofline is the best (as for decode and inference).
    runs = figures["end_to_end"]["runs"]
    assert len(runs) == 2 and figures["end_to_end"]["rate"] == max(runs)
    assert "best of 2 runs" in res.stdout, res.stdout
    # The deployed daemon runs under W^X where the kernel has PR_SET_MDWE; the unrestricted one beside it.
    if "wx_unavailable" in figures:
        assert figures["modes"] == ["open"] and "W^X could not be imposed" in res.stdout
    else:
        assert figures["mode"] == "wx" and "5 end to end, W^X" in res.stdout
        assert len(figures["unrestricted"]["end_to_end"]["runs"]) == 2 and "end to end, unrestricted" in res.stdout
    assert figures["inference_runtime"].startswith("litert")  # what the service runs, not TensorFlow
    # Memory is the daemon plus its decode workers; the install counts bikewatch and its runtime deps only.
    assert figures["end_to_end"]["hwm_kib"] > 0 and figures["end_to_end"]["processes"] >= 2
    assert "bikewatch" in figures["install"]["packages"] and "tensorflow" not in figures["install"]["packages"]


def test_servicecost_compares_the_daemon_with_a_bare_loop(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.servicecost", "--photos", "40", "--rounds", "1", "--synthetic"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3", "TMPDIR": str(tmp_path)},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "bare loop" in res.stdout and "daemon / bare, round by round" in res.stdout, res.stdout
    assert list(tmp_path.iterdir()) == [], "the work folder is removed"


def test_threadcpu_names_the_daemons_threads(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.threadcpu", "--photos", "40", "--synthetic"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3", "TMPDIR": str(tmp_path)},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    table = res.stdout.split("ms/photo", 1)[-1]
    # Every thread is listed under its name (a small dump leaves some below the clock's 10 ms tick).
    for who in ("main", "deliver_0", "child process", "all"):
        assert f"  {who}" in table, res.stdout
    assert list(tmp_path.iterdir()) == [], "the work folder is removed"
