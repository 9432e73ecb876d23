"""Smoke test of ``bikewatch bench --camera``: a tiny camera dump prints every row and its JSON (no speed asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import REPO


@pytest.mark.slow
def test_camera_bench_prints_every_measurement(tmp_path: Path) -> None:
    out = tmp_path / "camera.json"
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--camera", "6", "--runs", "2", "--min-seconds", "0.2",
         "--synthetic", "--workdir", str(tmp_path), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=400, env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for row in ("1 full decode limit", "2 preview decode", "3 sha256 of whole files", "4 same label",
                "5 end to end (6 photos)", "end to end, previews off", "end-to-end / full decode limit"):
        assert row in res.stdout, f"missing row {row!r} in:\n{res.stdout}"
    r = json.loads(out.read_text())
    assert r["preview_decode"]["decoded_from"] == {"preview": 6}  # every camera photo had a usable preview
    assert r["full_decode"]["decoded_from"] == {"full": 6}
    assert r["end_to_end"]["decoded_from"]["preview"] == 12 and r["end_to_end_full"]["decoded_from"]["full"] == 6
    assert r["agreement"]["photos"] == 6
    assert r["vs_full_decode"] == pytest.approx(r["end_to_end"]["rate"] / r["full_decode"]["rate"])
    assert 2 * 1e6 < r["mean_mb"] * 1e6 < 8 * 1e6  # camera-sized files
