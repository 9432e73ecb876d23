"""The daemon spec, end to end: real ``bikewatch run`` children on real folders.

Each daemon start imports TensorFlow (seconds), so a few runs carry many checks:

* run A (inotify): files dropped while it was down, subfolders, awkward and
  colliding names, broken files, ignored files, symlinks, a folder moved in, an
  uploader's rename, one photo in a quiet inbox; stopped with SIGTERM.
* run B (same folders): files dropped while down, a dead worker's journals,
  env/flag layering, unsure/, watchdog pings, a slow writer; stopped with SIGINT.
* run C (polling, output on another filesystem when a tmpfs can be mounted):
  a slow writer against polling, the state folder without a hidden-file pattern,
  a FIFO and a link moved across filesystems.
* an unloadable model, and bad settings, which stop start-up with exit code 2.

Each run's observations are gathered once by a module-scoped fixture; the
tests below only read them. Synchronisation is by polling with deadlines; the
slow writer's pauses are the scenario itself, not waits for the daemon.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import os
import re
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
from PIL import Image

from bikewatch.store.journal import PHASE_CLAIMED, PHASE_DECIDED, Item, Journal, write_journal
from bikewatch.store.ledger import COLUMNS
from harness import REPO, Daemon, files_under, read_csv, wait_until

pytestmark = pytest.mark.slow

OLD = 1_300_000_000  # mtimes far in the past, so "preserved" cannot be a coincidence
LABELS = ("mountain", "road", "rejected", "unsure")
IGNORED_NAMES = (".hidden.jpg", "upload.jpg.part", "x.tmp", "y.jpg.crdownload", "backup.jpg~", ".DS_Store",
                 "Thumbs.db", "desktop.ini", "DCIM/.thumbnails/t.jpg", "DCIM/100CANON/.DS_Store")
LONG = "é" * 125 + ".jpg"  # 254 bytes: " (1)" does not fit without trimming
BAD_BYTES = os.fsdecode(b"bad-\xff-bytes.jpg")  # not UTF-8


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha_file(path: Path) -> str:
    return sha(path.read_bytes())


def _noise_jpeg(i: int) -> bytes:
    import numpy as np

    rng = np.random.default_rng(i)
    im = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


SHARED_BIKES = REPO.parent / "shared" / "data" / "bikes"
_SHARED_PHOTOS = sorted(SHARED_BIKES.glob("test/*/*.jpg")) if SHARED_BIKES.is_dir() else []


def photo(i: int) -> bytes:
    """Real bike photos from ../shared when present, else generated JPEGs; distinct for distinct i."""
    if i < len(_SHARED_PHOTOS):
        return _SHARED_PHOTOS[i].read_bytes()
    return _noise_jpeg(i)


def variant(data: bytes, tag: str) -> bytes:
    """Other bytes, same pixels (JPEG decoders stop at EOI): the same label, a different sha256."""
    return data + b"\0bikewatch-test-" + tag.encode()


def put(path: Path, data: bytes, mtime: int = OLD) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(mtime * 10**9 + 123, mtime * 10**9 + 123))
    return path


def move_in(staging: Path, dest: Path) -> None:
    """What a well-behaved uploader does: write elsewhere on the filesystem, then rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, dest)


def slow_write(path: Path, data: bytes, *, chunk: int, pause: float) -> None:
    """A writer that keeps the file open and appends with pauses (shorter than the settle time)."""
    with open(path, "wb", buffering=0) as fh:
        for i in range(0, len(data), chunk):
            fh.write(data[i:i + chunk])
            time.sleep(pause)  # the scenario: a slow network upload


@dataclass
class Run:
    daemon: Daemon
    inbox: Path
    output: Path
    rows: list[dict[str, str]] = field(default_factory=list)
    expected: dict[str, bytes] = field(default_factory=dict)  # source rel -> bytes that must be delivered
    mtimes: dict[str, int] = field(default_factory=dict)  # source rel -> mtime_ns
    rc: int | None = None
    stop_seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def row(self, rel: str) -> dict[str, str]:
        src = str(self.inbox / rel)
        found = [r for r in self.rows if r["source"] == _csv_text(src)]
        assert len(found) == 1, f"{len(found)} rows for {rel!r}"
        return found[0]

    def dest(self, rel: str) -> Path:
        return _fs_path(self.row(rel)["destination"])


def _csv_text(s: str) -> str:
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _fs_path(s: str) -> Path:
    """A CSV path back to the file system's name (\\xNN escapes stand for raw bytes)."""
    return Path(re.sub(r"\\x([89a-f][0-9a-f])", lambda m: chr(0xDC00 + int(m.group(1), 16)), s))


def stop(d: Daemon, sig: int) -> tuple[int, float]:
    t0 = time.monotonic()
    d.signal(sig)
    rc = d.wait(15)
    return rc, time.monotonic() - t0


def wait(d: Daemon, predicate: Any, timeout: float, what: str) -> None:
    """wait_until, with the daemon's last log lines in the failure message."""
    try:
        wait_until(predicate, timeout, what=what)
    except AssertionError as exc:
        code = d.proc.poll() if d.proc else None
        raise AssertionError(f"{exc} (daemon exit code {code})\n{d.output_text()}") from None


def rows_for(d_rows: list[dict[str, str]], inbox: Path, rels: list[str]) -> bool:
    have = {r["source"] for r in d_rows}
    return all(_csv_text(str(inbox / r)) in have for r in rels)


# =========================================================================== run A


@pytest.fixture(scope="module")
def run_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("a")
    inbox, output, outside = root / "inbox", root / "sorted", root / "outside"
    run = Run(Daemon(root, name="a", env={"PYTHONIOENCODING": "utf-8:strict"}), inbox, output)
    exp = run.expected

    # ----- before start: files dropped while the service was down
    p0 = photo(0)
    exp["IMG_0001.jpg"] = variant(p0, "root")
    exp["DCIM/100CANON/IMG_0001.jpg"] = variant(p0, "100")
    exp["DCIM/100CANON/IMG_0002.JPG"] = photo(1)
    exp["weird name ü 日本.jpg"] = photo(2)
    exp['comma, "quote".jpg'] = photo(3)
    exp["new\nline.jpg"] = photo(4)
    exp[BAD_BYTES] = photo(5)
    exp[LONG] = variant(photo(6), "a")
    exp["DCIM/100CANON/" + LONG] = variant(photo(6), "b")
    exp["noext"] = photo(7)
    broken = {
        "broken.jpg": b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n",
        "DCIM/100CANON/broken.jpg": photo(8)[:3000],
        "empty.jpg": b"",
        "notes.txt": b"shopping list: chain oil\n",
        "data.bin": bytes(range(256)) * 8,
    }
    exp.update(broken)
    run.notes["broken"] = sorted(broken)
    for i, (rel, data) in enumerate(exp.items()):
        put(inbox / rel, data, OLD + i)
    for i, rel in enumerate(IGNORED_NAMES):
        put(inbox / rel, photo(20 + i), OLD - 1000 - i)
    # Symlinks: never followed, moved as links.
    target = put(outside / "target.jpg", photo(9), OLD - 5)
    put(outside / "dir" / "inner.jpg", photo(10), OLD - 6)
    (inbox / "link-out.jpg").symlink_to(target)
    (inbox / "dangling.jpg").symlink_to(root / "nowhere")
    (inbox / "linkdir").symlink_to(outside / "dir", target_is_directory=True)
    run.notes["links"] = {"link-out.jpg": str(target), "dangling.jpg": str(root / "nowhere"),
                          "linkdir": str(outside / "dir")}
    # Names already taken in the output, which must never be overwritten.
    for label in ("mountain", "road", "rejected"):
        put(output / label / "IMG_0001.jpg", f"pre-existing {label}".encode())
    put(output / "rejected" / "broken.jpg", b"pre-existing broken")
    ignored_before = {rel: ((inbox / rel).read_bytes(), os.stat(inbox / rel).st_mtime_ns) for rel in IGNORED_NAMES}
    outside_before = {p: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in files_under(outside)}
    run.mtimes = {rel: os.stat(inbox / rel).st_mtime_ns for rel in exp}

    d = run.daemon
    try:
        d.start()

        # ----- while running: a folder moved in, an uploader's rename, a direct write, an ignored file
        staging = root / "staging"
        later = {"DCIM/101CANON/IMG_0001.jpg": variant(p0, "101"), "DCIM/101CANON/IMG_0003.jpg": photo(11),
                 "upload2.jpg": photo(12)}
        for i, (rel, data) in enumerate(later.items()):
            run.mtimes[rel] = os.stat(put(staging / rel, data, OLD + 100 + i)).st_mtime_ns
        move_in(staging / "DCIM" / "101CANON", inbox / "DCIM" / "101CANON")
        move_in(staging / "upload2.jpg", inbox / "upload2.jpg.part")
        os.rename(inbox / "upload2.jpg.part", inbox / "upload2.jpg")
        with open(inbox / "direct.jpg", "wb") as fh:  # written in place, in one go
            fh.write(photo(13))
            fh.flush()
            run.mtimes["direct.jpg"] = os.fstat(fh.fileno()).st_mtime_ns
        later["direct.jpg"] = photo(13)
        put(inbox / "late.tmp", b"still downloading")
        exp.update(later)
        moved = [*exp, *run.notes["links"]]
        wait(d, lambda: rows_for(d.rows(), inbox, moved), 60, what="run A: a row for every file")

        # ----- one photo in a now quiet inbox
        run.mtimes["single.jpg"] = os.stat(put(staging / "single", photo(14), OLD + 200)).st_mtime_ns
        move_in(staging / "single", inbox / "single.jpg")
        exp["single.jpg"] = photo(14)
        wait(d, lambda: rows_for(d.rows(), inbox, ["single.jpg"]), 30, what="run A: the single photo")

        run.rows = d.rows()
        run.notes["inbox_left"] = sorted(str(p.relative_to(inbox)) for p in files_under(inbox))
        run.notes["ignored_before"] = ignored_before
        run.notes["outside_before"] = outside_before
        run.notes["ignored_after"] = {
            rel: ((inbox / rel).read_bytes(), os.stat(inbox / rel).st_mtime_ns) if (inbox / rel).exists() else None
            for rel in IGNORED_NAMES
        }
        run.notes["outside_after"] = {p: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in files_under(outside)}
        run.rc, run.stop_seconds = stop(d, signal.SIGTERM)
        yield run
    finally:
        d.stop_quietly()


def test_a_ready_only_after_the_model_is_loaded(run_a: Run) -> None:
    events = [e.get("event") for e in run_a.daemon.events()]
    assert events.index("model loaded") < events.index("ready")
    notes = run_a.daemon.notifications
    ready = [i for i, n in enumerate(notes) if "READY=1" in n.split("\n")]
    assert len(ready) == 1
    assert any(n.startswith("EXTEND_TIMEOUT_USEC=") for n in notes[: ready[0]])


def test_a_status_messages(run_a: Run) -> None:
    statuses = [line for n in run_a.daemon.notifications for line in n.split("\n") if line.startswith("STATUS=")]
    assert statuses[0].startswith("STATUS=watching ")
    assert any("sorted" in s and "rejected" in s for s in statuses[1:])


def test_a_sigterm_exits_0_within_10s_with_stopping(run_a: Run) -> None:
    assert run_a.rc == 0, run_a.daemon.output_text()
    assert run_a.stop_seconds < 10
    assert "STOPPING=1" in run_a.daemon.notifications
    assert run_a.daemon.events("stopped")


def test_a_no_crash_or_traceback(run_a: Run) -> None:
    text = "\n".join(run_a.daemon.lines)
    assert "Traceback" not in text and "UnicodeEncodeError" not in text


def test_a_csv_loads_with_header_and_one_row_per_moved_file(run_a: Run) -> None:
    raw = run_a.daemon.log_path.read_bytes().decode("utf-8")
    with open(run_a.daemon.log_path, newline="", encoding="utf-8") as fh:
        table = list(csv.reader(fh))
    assert tuple(table[0]) == COLUMNS
    assert raw.count(",".join(COLUMNS)) == 1
    assert all(len(r) == len(COLUMNS) for r in table[1:])
    moved = len(run_a.expected) + len(run_a.notes["links"])
    assert len(run_a.rows) == moved
    assert len({r["id"] for r in run_a.rows}) == moved
    assert len({r["source"] for r in run_a.rows}) == moved


def test_a_csv_fields(run_a: Run) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    for r in run_a.rows:
        ts = dt.datetime.fromisoformat(r["timestamp"])
        assert ts.utcoffset() == dt.timedelta(0), r["timestamp"]
        assert now - dt.timedelta(minutes=10) < ts <= now + dt.timedelta(seconds=5)
        assert r["source"].startswith(str(run_a.inbox) + "/")
        assert r["destination"].startswith(str(run_a.output) + "/")
        dest = _fs_path(r["destination"])
        assert os.path.lexists(dest), r
        assert dest.parent.name == r["label"] and r["label"] in LABELS
        assert r["model"]
        if r["label"] == "rejected":
            assert r["error"] and r["confidence"] == r["p_mountain"] == r["p_road"] == ""
        else:
            pm, pr, conf = float(r["p_mountain"]), float(r["p_road"]), float(r["confidence"])
            assert r["error"] == ""
            assert abs(pm + pr - 1) < 1e-3 and conf == max(pm, pr)
            assert r["label"] == ("road" if pr > pm else "mountain")
        if not os.path.islink(dest):
            assert r["sha256"] == sha_file(dest)
            assert r["size_bytes"] == str(os.path.getsize(dest))


def test_a_every_source_delivered_exactly_once_bytes_and_mtime(run_a: Run) -> None:
    for rel, data in run_a.expected.items():
        row = run_a.row(rel)
        dest = _fs_path(row["destination"])
        assert dest.read_bytes() == data, rel
        assert row["sha256"] == sha(data)
        assert os.stat(dest).st_mtime_ns == run_a.mtimes[rel], rel
    files = [p for p in files_under(run_a.output) if not p.is_symlink()]
    got = sorted(sha_file(p) for p in files if not p.read_bytes().startswith(b"pre-existing"))
    assert got == sorted(sha(b) for b in run_a.expected.values())


def test_a_inbox_holds_only_what_is_left_alone(run_a: Run) -> None:
    left = set(run_a.notes["inbox_left"])
    assert left == {*IGNORED_NAMES, "late.tmp"}
    assert run_a.notes["ignored_after"] == run_a.notes["ignored_before"]


def test_a_subfolders_processed(run_a: Run) -> None:
    sources = {r["source"] for r in run_a.rows}
    for rel in ("DCIM/100CANON/IMG_0002.JPG", "DCIM/101CANON/IMG_0003.jpg", "DCIM/101CANON/IMG_0001.jpg"):
        assert str(run_a.inbox / rel) in sources


def test_a_collisions_are_numbered_never_overwritten(run_a: Run) -> None:
    out = run_a.output
    for label in ("mountain", "road", "rejected"):
        assert (out / label / "IMG_0001.jpg").read_bytes() == f"pre-existing {label}".encode()
    assert (out / "rejected" / "broken.jpg").read_bytes() == b"pre-existing broken"
    family = ["IMG_0001.jpg", "DCIM/100CANON/IMG_0001.jpg", "DCIM/101CANON/IMG_0001.jpg"]
    labels = {run_a.row(rel)["label"] for rel in family}
    assert len(labels) == 1  # same pixels
    label = labels.pop()
    names = {run_a.dest(rel).name for rel in family}
    assert names == {"IMG_0001 (1).jpg", "IMG_0001 (2).jpg", "IMG_0001 (3).jpg"}
    assert {sha_file(out / label / n) for n in names} == {sha(run_a.expected[rel]) for rel in family}
    broken_names = {run_a.dest(rel).name for rel in ("broken.jpg", "DCIM/100CANON/broken.jpg")}
    assert broken_names == {"broken (1).jpg", "broken (2).jpg"}


def test_a_long_non_ascii_name_collision_fits_255_bytes(run_a: Run) -> None:
    names = sorted(run_a.dest(rel).name for rel in (LONG, "DCIM/100CANON/" + LONG))
    assert LONG in names
    other = [n for n in names if n != LONG][0]
    assert other.endswith(" (1).jpg") and len(other.encode("utf-8")) <= 255
    assert set(other[: -len(" (1).jpg")]) == {"é"}


def test_a_awkward_names_keep_their_names(run_a: Run) -> None:
    for rel in ("weird name ü 日本.jpg", 'comma, "quote".jpg', "new\nline.jpg", "noext"):
        assert run_a.dest(rel).name == rel
    dest = _fs_path(run_a.row(BAD_BYTES)["destination"])
    assert os.fsencode(dest.name) == b"bad-\xff-bytes.jpg"
    assert run_a.row(BAD_BYTES)["source"].endswith("bad-\\xff-bytes.jpg")


def test_a_broken_files_rejected_with_reason_and_bytes_kept(run_a: Run) -> None:
    for rel in run_a.notes["broken"]:
        row = run_a.row(rel)
        assert row["label"] == "rejected" and row["error"], rel
        assert run_a.dest(rel).read_bytes() == run_a.expected[rel]
    assert "empty" in run_a.row("empty.jpg")["error"]


def test_a_symlinks_moved_as_links_targets_untouched(run_a: Run) -> None:
    for rel, target in run_a.notes["links"].items():
        row = run_a.row(rel)
        dest = run_a.dest(rel)
        assert row["label"] == "rejected" and "link" in row["error"], row
        assert dest.is_symlink() and os.readlink(dest) == target
    assert run_a.notes["outside_after"] == run_a.notes["outside_before"]


def test_a_state_folder_is_never_input(run_a: Run) -> None:
    assert not any("/.bikewatch" in r["source"] for r in run_a.rows)
    work = run_a.inbox / ".bikewatch" / "work"
    assert work.is_dir() and list(work.iterdir()) == []  # our work folder removed on a clean stop


def test_a_json_log_events(run_a: Run) -> None:
    sorted_ev = run_a.daemon.events("sorted")
    assert sorted_ev and all({"source", "label", "confidence"} <= set(e) for e in sorted_ev)
    assert all(e["label"] in ("mountain", "road", "unsure") for e in sorted_ev)
    batches = run_a.daemon.events("batch")
    assert batches and all("size" in e and any(k == "ms" or k.endswith("_ms") for k in e) for e in batches)
    assert sum(e["size"] for e in batches) == len(run_a.rows)
    rejected = run_a.daemon.events("rejected")
    assert {e["source"] for e in rejected} >= {"empty.jpg", "notes.txt", "link-out.jpg"}
    assert all(e.get("reason") for e in rejected)


def test_a_output_layout(run_a: Run) -> None:
    assert sorted(p.name for p in run_a.output.iterdir() if p.is_dir()) == ["mountain", "rejected", "road"]


# =========================================================================== run B


@pytest.fixture(scope="module")
def run_b(run_a: Run) -> Iterator[Run]:
    inbox, output, root = run_a.inbox, run_a.output, run_a.inbox.parent
    # ----- while down: new files, and a dead worker's unfinished work
    down = {"down.jpg": photo(15), "DCIM/200/IMG_0100.jpg": photo(16)}
    for rel, data in down.items():
        put(inbox / rel, data, OLD + 300)
    dead = inbox / ".bikewatch" / "work" / "dead-1-abcdef"
    dead.mkdir(parents=True)
    (dead / "lock").write_bytes(b"")
    placed = put(output / "road" / "was-placed.jpg", photo(17), OLD + 400)  # placed before the crash, no row
    put(dead / "dead.1.0001", photo(18), OLD + 401)  # decided, not placed yet
    decided = Journal(batch="dead.1", phase=PHASE_DECIDED, worker="dead", model="bikes@dead", items=(
        Item(key="dead.1.0000", source="was-placed.jpg", label="road", p_mountain=0.1, p_road=0.9,
             sha256=sha(photo(17)), size=len(photo(17)), mtime_ns=os.stat(placed).st_mtime_ns,
             timestamp="2024-01-01T00:00:00.000+00:00", dest="road/was-placed.jpg"),
        Item(key="dead.1.0001", source="decided.jpg", label="mountain", p_mountain=0.8, p_road=0.2,
             sha256=sha(photo(18)), size=len(photo(18)), mtime_ns=os.stat(dead / "dead.1.0001").st_mtime_ns,
             timestamp="2024-01-01T00:00:00.000+00:00", dest="mountain/decided.jpg"),
    ))
    write_journal(dead / "dead.1.json", decided)
    put(dead / "dead.2.0000", photo(19), OLD + 402)  # claimed only: back to the inbox, then sorted
    write_journal(dead / "dead.2.json", Journal(batch="dead.2", phase=PHASE_CLAIMED, worker="dead",
                                                items=(Item(key="dead.2.0000", source="DCIM/back.jpg"),)))

    decoy_toml, decoy_env = root / "decoy-toml", root / "decoy-env"
    d = Daemon(root, name="b", inbox=inbox, output=decoy_toml,
               env={"BIKEWATCH_OUTPUT": str(decoy_env), "BIKEWATCH_SETTLE_SECONDS": "1.0",
                    "BIKEWATCH_UNSURE_BELOW": "0.9", "WATCHDOG_USEC": "400000"},
               args=["--output", str(output)])
    run = Run(d, inbox, output)
    run.expected = {**down, "DCIM/back.jpg": photo(19)}
    run.notes["decoys"] = (decoy_toml, decoy_env)
    run.notes["dead"] = dead
    try:
        d.start()
        wait(d, lambda: rows_for(read_csv(output / "classifications.csv"), inbox, [*run.expected]), 30,
             what="run B: files dropped while down and returned by recovery")
        # ----- idle now: WATCHDOG_USEC=400000 asks for a ping at least every 0.2 s
        n0 = sum(n == "WATCHDOG=1" for n in d.notifications)
        wait(d, lambda: sum(n == "WATCHDOG=1" for n in d.notifications) >= n0 + 5, 10,
             what="five more WATCHDOG=1 pings")
        # ----- a slow writer: pauses of 0.1 s, settle time 1 s
        big = _big_jpeg()
        slow_write(inbox / "slow.jpg", big, chunk=max(1, len(big) // 25), pause=0.1)
        run.expected["slow.jpg"] = big
        wait(d, lambda: rows_for(read_csv(output / "classifications.csv"), inbox, ["slow.jpg"]), 30,
             what="run B: the slow file")
        run.rows = read_csv(output / "classifications.csv")
        run.notes["inbox_left"] = sorted(str(p.relative_to(inbox)) for p in files_under(inbox))
        run.rc, run.stop_seconds = stop(d, signal.SIGINT)
        yield run
    finally:
        d.stop_quietly()


def _big_jpeg() -> bytes:
    import numpy as np

    rng = np.random.default_rng(99)
    im = Image.fromarray(rng.integers(0, 256, (400, 600, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_b_settings_layering_end_to_end(run_b: Run) -> None:
    (start,) = run_b.daemon.events("starting")
    s = start["settings"]
    assert s["settle_seconds"] == 1.0  # BIKEWATCH_SETTLE_SECONDS beat the file's 0.3
    assert s["output"] == str(run_b.output)  # --output beat BIKEWATCH_OUTPUT and the file
    assert s["unsure_below"] == 0.9 and s["worker_name"] == "b"  # env, and the file beat the default
    for decoy in run_b.notes["decoys"]:
        assert not decoy.exists()


def test_b_unsure_folder_when_unsure_below_is_set(run_b: Run) -> None:
    assert (run_b.output / "unsure").is_dir()
    for r in run_b.rows:
        if r["confidence"] and r["worker"] == "b":
            assert (r["label"] == "unsure") == (float(r["confidence"]) < 0.9), r


def test_b_files_dropped_while_down_are_sorted(run_b: Run) -> None:
    for rel, data in run_b.expected.items():
        if rel == "slow.jpg":
            continue
        (row,) = [r for r in run_b.rows if r["source"] == str(run_b.inbox / rel)]
        assert _fs_path(row["destination"]).read_bytes() == data
        assert row["worker"] == "b"


def test_b_dead_worker_recovered_rows_exactly_once(run_b: Run) -> None:
    dead_rows = [r for r in run_b.rows if r["worker"] == "dead"]
    assert sorted(r["id"] for r in dead_rows) == ["dead.1.0000", "dead.1.0001"]
    assert (run_b.output / "mountain" / "decided.jpg").read_bytes() == photo(18)
    assert (run_b.output / "road" / "was-placed.jpg").read_bytes() == photo(17)
    assert not run_b.notes["dead"].exists()
    assert any(e.get("event") == "returned to inbox" for e in run_b.daemon.events())


def test_b_slow_writer_never_taken_half_written(run_b: Run) -> None:
    (row,) = [r for r in run_b.rows if r["source"] == str(run_b.inbox / "slow.jpg")]
    full = run_b.expected["slow.jpg"]
    assert row["label"] != "rejected", row
    assert row["sha256"] == sha(full) and row["size_bytes"] == str(len(full))
    assert _fs_path(row["destination"]).read_bytes() == full


def test_b_csv_header_once_across_restarts(run_b: Run) -> None:
    raw = (run_b.output / "classifications.csv").read_bytes().decode("utf-8")
    assert raw.count(",".join(COLUMNS)) == 1
    assert len([r for r in run_b.rows if r["worker"] == "b"]) == len(run_b.expected)
    assert len({r["id"] for r in run_b.rows}) == len(run_b.rows)


def test_b_watchdog_pings_while_idle(run_b: Run) -> None:
    assert sum(n == "WATCHDOG=1" for n in run_b.daemon.notifications) >= 5


def test_b_sigint_exits_0_within_10s_with_stopping(run_b: Run) -> None:
    assert run_b.rc == 0, run_b.daemon.output_text()
    assert run_b.stop_seconds < 10
    assert "STOPPING=1" in run_b.daemon.notifications
    assert run_b.daemon.events("stopping")[0]["signal"] == "SIGINT"


def test_b_inbox_left_alone_files_survive_a_restart(run_b: Run) -> None:
    assert set(run_b.notes["inbox_left"]) == {*IGNORED_NAMES, "late.tmp"}


# =========================================================================== run C


@pytest.fixture(scope="module")
def other_fs_output(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, bool]]:
    mnt = tmp_path_factory.mktemp("c-out")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "bikewatch-test-c", str(mnt)],
                         capture_output=True, text=True)
    mounted = res.returncode == 0
    try:
        yield mnt, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="module")
def run_c(tmp_path_factory: pytest.TempPathFactory, other_fs_output: tuple[Path, bool]) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("c")
    inbox = root / "inbox"
    output, cross = other_fs_output
    d = Daemon(root, name="c", inbox=inbox, output=output / "sorted",
               settings={"poll": "no", "poll_interval_seconds": 2.0, "settle_seconds": 1.0, "ignore": ["*.part"]},
               env={"BIKEWATCH_POLL": "yes"})
    run = Run(d, inbox, output / "sorted")
    run.notes["cross"] = cross
    run.expected = {"a.jpg": photo(30), ".hidden.jpg": photo(31)}
    for i, (rel, data) in enumerate(run.expected.items()):
        put(inbox / rel, data, OLD + i)
    run.mtimes = {rel: os.stat(inbox / rel).st_mtime_ns for rel in run.expected}
    target = put(root / "outside.jpg", photo(32), OLD - 9)
    (inbox / "link.jpg").symlink_to(target)
    os.mkfifo(inbox / "pipe")
    run.notes["target"] = (target, target.read_bytes(), os.stat(target).st_mtime_ns)
    try:
        d.start()
        staging = root / "staging"
        run.mtimes["b.jpg"] = os.stat(put(staging / "b", photo(33), OLD + 50)).st_mtime_ns
        move_in(staging / "b", inbox / "b.jpg")
        run.expected["b.jpg"] = photo(33)
        # A slow writer. The poll interval is longer than the settle time, as with the defaults,
        # so between two polls only a fresh look before claiming can tell the file still grows;
        # without it the file is taken within poll interval + settle = 3 s of its first byte,
        # and writing for longer than that makes a half-written claim certain, not just likely.
        big = _big_jpeg()
        slow_write(inbox / "slow.jpg", big, chunk=max(1, len(big) // 45), pause=0.1)
        run.expected["slow.jpg"] = big
        log = run.output / "classifications.csv"
        wait(d, lambda: rows_for(read_csv(log), inbox, [*run.expected, "link.jpg", "pipe"]), 30,
             what="run C: every file")
        run.rows = read_csv(log)
        run.notes["inbox_left"] = sorted(str(p.relative_to(inbox)) for p in files_under(inbox))
        run.rc, run.stop_seconds = stop(d, signal.SIGTERM)
        yield run
    finally:
        d.stop_quietly()


def test_c_polling_mode_chosen_by_env_over_file(run_c: Run) -> None:
    (watching,) = run_c.daemon.events("watching inbox")
    assert watching["mode"] == "poll"


def test_c_polling_sorts_files(run_c: Run) -> None:
    for rel, data in run_c.expected.items():
        row = run_c.row(rel)
        assert _fs_path(row["destination"]).read_bytes() == data, rel
        assert row["sha256"] == sha(data)
    assert run_c.rc == 0 and run_c.stop_seconds < 10


def test_c_slow_writer_never_taken_half_written_when_polling(run_c: Run) -> None:
    row = run_c.row("slow.jpg")
    full = run_c.expected["slow.jpg"]
    assert row["label"] != "rejected", row
    assert row["sha256"] == sha(full) and row["size_bytes"] == str(len(full))
    assert run_c.dest("slow.jpg").read_bytes() == full


def test_c_state_folder_never_input_even_without_hidden_pattern(run_c: Run) -> None:
    assert run_c.row(".hidden.jpg")["label"] in ("mountain", "road")  # the setting is honoured...
    assert not any(".bikewatch" in r["source"] for r in run_c.rows)  # ...but the state folder is never input
    assert run_c.notes["inbox_left"] == []


def test_c_cross_filesystem_keeps_bytes_mtime_links_and_fifos(run_c: Run) -> None:
    if not run_c.notes["cross"]:
        pytest.skip("could not mount a tmpfs for the output: moved on one filesystem only")
    assert os.stat(run_c.output).st_dev != os.stat(run_c.inbox).st_dev
    for rel in ("a.jpg", ".hidden.jpg", "b.jpg"):
        assert os.stat(run_c.dest(rel)).st_mtime_ns == run_c.mtimes[rel], rel
    link = run_c.dest("link.jpg")
    target, data, mtime = run_c.notes["target"]
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == data and os.stat(target).st_mtime_ns == mtime
    pipe = run_c.dest("pipe")
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode) and run_c.row("pipe")["label"] == "rejected"
    assert not list(run_c.output.rglob(".bikewatch-*.partial"))


# =========================================================================== start-up failures


def test_unloadable_model_exits_2_without_ready(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("d")
    model = root / "garbage.keras"
    model.write_bytes(b"this is not a model")
    d = Daemon(root, name="d", settings={"model": str(model)})
    try:
        d.start(wait_ready=False)
        assert d.proc is not None
        rc = d.wait(90)
    finally:
        d.stop_quietly()
    assert rc == 2, d.output_text()
    assert not any("READY=1" in n for n in d.notifications)
    (err,) = d.events("cannot load model")
    assert "garbage.keras" in err["error"]
    assert not (root / "sorted" / "mountain").exists()


CONFIG_CASES: dict[str, tuple[str, dict[str, str], list[str], str]] = {
    # name: (toml body, extra env, extra args, text the one line must contain)
    "missing-inbox": ('inbox = "{root}/nope"\noutput = "{root}/out"\n', {}, [], "setting 'inbox'"),
    "output-inside-inbox": ('inbox = "{root}/in"\noutput = "{root}/in/sorted"\n', {}, [], "setting 'output'"),
    "missing-model": ('inbox = "{root}/in"\noutput = "{root}/out"\nmodel = "{root}/nope.keras"\n', {}, [],
                      "setting 'model'"),
    "model-is-a-folder": ('inbox = "{root}/in"\noutput = "{root}/out"\nmodel = "{root}/in"\n', {}, [],
                          "setting 'model'"),
    "unknown-key": ('inbox = "{root}/in"\noutput = "{root}/out"\nsettle_secs = 2\n', {}, [], "'settle_secs'"),
    "unknown-env": ('inbox = "{root}/in"\noutput = "{root}/out"\n', {"BIKEWATCH_COLOUR": "red"}, [],
                    "BIKEWATCH_COLOUR"),
    "bad-value": ('inbox = "{root}/in"\noutput = "{root}/out"\nmax_batch = 0\n', {}, [], "setting 'max_batch'"),
    "bad-env-value": ('inbox = "{root}/in"\noutput = "{root}/out"\n', {"BIKEWATCH_SETTLE_SECONDS": "soon"}, [],
                      "BIKEWATCH_SETTLE_SECONDS"),
    "flag-output-inside-inbox": ('inbox = "{root}/in"\noutput = "{root}/out"\n', {}, ["--output", "{root}/in/x"],
                                 "setting 'output'"),
    "bad-toml": ('inbox = \n', {}, [], "not valid TOML"),
}


@pytest.fixture(scope="module")
def config_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str]]:
    """Start every bad configuration at once (they exit before TensorFlow loads)."""
    procs = {}
    for name, (body, env, args, _) in CONFIG_CASES.items():
        root = tmp_path_factory.mktemp(name)
        (root / "in").mkdir()
        cfg = root / "bw.toml"
        cfg.write_text(body.format(root=root))
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("BIKEWATCH_") and k != "NOTIFY_SOCKET"}
        full_env.update(env)
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "bikewatch", "run", "--config", str(cfg), *(a.format(root=root) for a in args)],
            cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=60)
        out[name] = (p.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_setting_stops_startup_with_one_line_and_exit_2(config_results, case: str) -> None:
    rc, stdout, stderr = config_results[case]
    assert rc == 2, (stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("bikewatch: error: ") and CONFIG_CASES[case][3] in lines[0], lines[0]
    assert "Traceback" not in stderr and stdout == ""


def test_bad_settings_exit_before_importing_tensorflow(tmp_path: Path) -> None:
    code = ("import sys; from bikewatch.cli import main; rc = main(['run', '--inbox', sys.argv[1], '--output', "
            "sys.argv[2]]); print(rc, 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nope"), str(tmp_path / "out")], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.stdout.split() == ["2", "False", "False"], res.stderr


# =========================================================================== the writer's "done" signals


def test_a_rename_or_a_close_after_writing_ends_the_wait_but_an_open_file_waits(tmp_path: Path) -> None:
    """The upload contract's rename, and a close after writing, each say "complete": the short
    settle applies. A file that is written but still open says nothing and waits the full time.

    The full settle time here (120 s) is far beyond the test's deadlines, so a file sorted
    within them can only have been taken on one of those signals.
    """
    inbox, staging = tmp_path / "inbox", tmp_path / "staging"
    d = Daemon(tmp_path, name="done", inbox=inbox,
               settings={"settle_seconds": 120.0, "closed_settle_seconds": 0.05})
    try:
        d.start()
        put(staging / "renamed", photo(40), OLD)
        writer = open(inbox / "open.jpg", "wb")
        writer.write(photo(41))
        writer.flush()
        move_in(staging / "renamed", inbox / "renamed.jpg")  # after open.jpg's write: its events come first
        wait(d, lambda: rows_for(d.rows(), inbox, ["renamed.jpg"]), 30, what="the renamed photo")
        assert (inbox / "open.jpg").exists()  # seen (its events came first), written, not closed: waits
        assert not rows_for(d.rows(), inbox, ["open.jpg"])
        writer.close()
        wait(d, lambda: rows_for(d.rows(), inbox, ["open.jpg"]), 30, what="the photo closed after writing")
        assert sorted(p.name for p in files_under(d.output) if p.suffix == ".jpg") == ["open.jpg", "renamed.jpg"]
    finally:
        d.stop_quietly()
