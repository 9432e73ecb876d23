"""`bikewatch sort`: one dump, sorted exactly as the daemon would, then exit."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from harness import REPO, files_under, fill_up, read_csv


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


# --------------------------------------------------------------------------- one accounting path
# Every delivered file is counted in the summary, however it was delivered: in its batch, by a
# retry after an outage, or by start-up recovery of a dead worker's batch.


def _photos(folder: Path, n: int, seed: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"P{seed}_{i}.png")
    return sorted(p.name for p in folder.iterdir())


def test_summary_counts_files_recovered_from_a_dead_worker(tmp_path: Path) -> None:
    """A dump whose state folder holds a dead worker's decided batch: its file is delivered and counted."""
    from dataclasses import replace

    from journals import decided_by_hand

    from bikewatch.store.journal import PHASE_CLAIMED, Item, Journal, write_journal

    dump, out = tmp_path / "dump", tmp_path / "sorted"
    _photos(dump, 3, seed=1)
    dead = dump / ".bikewatch" / "work" / "dead-1-abcdef"
    dead.mkdir(parents=True)
    (dead / "lock").write_bytes(b"")  # no owner and not locked: a dead worker
    Image.new("RGB", (64, 48), (90, 120, 30)).save(dead / "dead.1.0000", format="PNG")
    claimed = Journal(batch="dead.1", phase=PHASE_CLAIMED, worker="dead", model="bikes@dead",
                      items=(Item(key="dead.1.0000", source="from-before.png"),))
    decided = decided_by_hand(claimed, dead, "road")
    write_journal(dead / "dead.1.json", replace(decided, items=tuple(
        replace(it, dest="road/from-before.png") for it in decided.items)))

    done = _sort(str(dump), "--output", str(out))
    assert done.returncode == 0, done.stderr
    rows = read_csv(out / "classifications.csv")
    assert len(rows) == 4
    assert (out / "road" / "from-before.png").is_file()
    assert "sorted 4 files" in done.stdout, done.stdout


def test_summary_counts_files_whose_rows_were_written_by_a_retry(tmp_path: Path, tmpfs) -> None:
    """The CSV's filesystem is full at first: the batch is placed, its rows are owed, a retry pays them.

    Needs root to mount a tmpfs (skips otherwise)."""
    logfs = tmpfs("logfs", "256k")
    filler = fill_up(logfs)
    dump, out, log = tmp_path / "dump", tmp_path / "sorted", logfs / "classifications.csv"
    names = _photos(dump, 5, seed=2)
    config = tmp_path / "bikewatch.toml"
    config.write_text("[bikewatch]\nretry_max_seconds = 1.0\nmax_batch = 8\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bikewatch", "sort", str(dump), "--output", str(out), "--log", str(log),
         "--config", str(config), "--no-progress"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    err: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the first error line says the rows are owed; then make room
            err.append(line)
            if "output unavailable" in line:
                break
        assert any("output unavailable" in line for line in err), "".join(err)
        assert not log.exists() or not read_csv(log)
        filler.unlink()
        stdout, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, "".join(err) + rest
    rows = read_csv(log)
    assert sorted(Path(r["source"]).name for r in rows) == names
    assert "sorted 5 files" in stdout, stdout


# --------------------------------------------------------------------------- the dry run decodes as the daemon


def test_dry_run_gives_the_daemons_reason_for_a_144_megapixel_png(tmp_path: Path) -> None:
    """Same decode path and limits: the plan's reason is the one the daemon writes in the CSV."""
    dump, out = tmp_path / "dump", tmp_path / "sorted"
    _photos(dump, 2, seed=3)
    Image.new("1", (12000, 12000), 1).save(dump / "huge.png")  # 144 megapixels, a few KiB on disk

    plan = _sort(str(dump), "--output", str(out), "--dry-run")
    assert plan.returncode == 0, plan.stderr
    line = next(ln for ln in plan.stdout.splitlines() if "huge.png" in ln)
    assert line.startswith(f"{dump / 'huge.png'} -> {out / 'rejected' / 'huge.png'} (rejected: ")
    planned_reason = line.split("(rejected: ", 1)[1].removesuffix(")")
    assert planned_reason.startswith("too large to decode safely"), line
    assert "dry run: 3 files would be moved" in plan.stdout

    done = _sort(str(dump), "--output", str(out))
    assert done.returncode == 0, done.stderr
    row = next(r for r in read_csv(out / "classifications.csv") if r["source"].endswith("huge.png"))
    assert (row["label"], row["error"]) == ("rejected", planned_reason)
    assert Path(row["destination"]) == out / "rejected" / "huge.png"
