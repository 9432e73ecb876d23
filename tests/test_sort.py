"""`bikewatch sort`: one dump, sorted exactly as the daemon would, then exit."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from harness import REPO, files_under, read_csv


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sort(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bikewatch", "sort", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})


def test_dry_run_changes_nothing_then_sort_moves_everything(tmp_path: Path) -> None:
    dump, out = tmp_path / "dump", tmp_path / "sorted"
    (dump / "DCIM" / "100CANON").mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(dump / "DCIM" / "100CANON" / f"IMG_{i}.jpg")
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(dump / "IMG_0.jpg")  # name collision
    (dump / "notes.txt").write_text("not a photo")
    (dump / "upload.part").write_bytes(b"half")
    before = {p.relative_to(dump): _digest(p) for p in files_under(dump)}

    plan = _sort(str(dump), "--output", str(out), "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "dry run: 8 files would be moved" in plan.stdout
    assert "IMG_0 (1).jpg" in plan.stdout  # the collision is planned, not discovered later
    assert "rejected/notes.txt" in plan.stdout
    assert {p.relative_to(dump): _digest(p) for p in files_under(dump)} == before
    assert not out.exists() or not any(out.iterdir())

    done = _sort(str(dump), "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert "sorted 8 files" in done.stdout
    assert "rejected 1: not an image" in done.stdout
    rows = read_csv(out / "classifications.csv")
    assert len(rows) == 8
    delivered = {_digest(p) for p in files_under(out)}
    inputs = {d for rel, d in before.items() if rel.name != "upload.part"}
    assert delivered == inputs
    assert (dump / "upload.part").exists()  # in-progress uploads are left alone
    assert not (dump / ".bikewatch").exists()  # no trace of our work area is left behind
    for row in rows:
        assert Path(row["destination"]).exists()
        assert _digest(Path(row["destination"])) == row["sha256"]


def test_sort_refuses_output_inside_the_dump(tmp_path: Path) -> None:
    (tmp_path / "dump").mkdir()
    res = _sort(str(tmp_path / "dump"), "--output", str(tmp_path / "dump" / "sorted"))
    assert res.returncode == 2
    assert "setting 'output'" in res.stderr and "inside the inbox" in res.stderr
