"""Nothing lost, ever: end-to-end checks of claim-then-deliver against real failures.

Each test runs real ``bikewatch run`` children (see :mod:`harness`) on real
folders and checks the invariant by content hashes (:func:`photos.check_nothing_lost`):
every input's bytes are in exactly one place, mountain/, road/, rejected/ or
still in the inbox, and every delivered file has exactly one CSV row.

Failures are real too: SIGKILL at random moments, a second worker on the same
inbox, a full or read-only output (a tmpfs, which needs root to mount: those
tests skip otherwise), an inbox that vanishes, ten thousand photos at once.
Synchronisation is by polling with deadlines; random delays are test inputs only.
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from harness import Daemon, fill_up, read_csv, wait_until
from photos import (
    broken_bytes, check_nothing_lost, hash_multiset, move_in, photo_bytes, rss_kib, work_leftovers, write_photos,
)

OUTPUT_UNAVAILABLE = "output unavailable; photos stay in the inbox, retrying"
INBOX_UNAVAILABLE = "inbox unavailable; will retry, nothing is forgotten"
WORK_VANISHED = "work folder vanished with the inbox's filesystem; started a new one"
FAST = {"settle_seconds": 0.2, "closed_settle_seconds": 0.05, "max_wait_ms": 20, "rescan_seconds": 2.0,
        "decode_workers": 2}


# --------------------------------------------------------------------------- fixtures and helpers


def remount(point: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True, capture_output=True)


def other_filesystem(tmp_path: Path) -> Path | None:
    """A writable folder on another filesystem than tmp_path, without mounting (``/dev/shm``)."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and os.access(shm, os.W_OK) and os.stat(shm).st_dev != os.stat(tmp_path).st_dev:
            return Path(tempfile.mkdtemp(prefix="bikewatch-test-", dir=shm))
    except OSError:
        pass
    return None


def write_inputs(stage: Path, good: int, broken: int = 0, *, size: tuple[int, int] = (32, 32),
                 seed: int = 0, prefix: str = "IMG_") -> collections.Counter[str]:
    """Distinct photos (and broken files) in ``stage``; returns the multiset of their hashes.

    Each ``seed`` gives other bytes under the same names, so later sets also test numbering.
    """
    write_photos(stage, good, size=size, seed=seed, prefix=prefix)
    for i in range(broken):
        (stage / f"BROKEN_{i:03d}.jpg").write_bytes(broken_bytes(i + 1000 * seed))
    return hash_multiset(p for p in stage.iterdir())


def count_rows(path: Path) -> int:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    return max(0, data.count(b"\r\n") - 1)


def inbox_files(inbox: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(inbox):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [Path(root) / f for f in files if not f.startswith(".")]
    return out


def wait_for(daemons: Daemon | list[Daemon], predicate, timeout: float, what: str, interval: float = 0.05):
    """:func:`wait_until`, and on time-out the daemons' latest log lines (as they are then)."""
    try:
        return wait_until(predicate, timeout, interval=interval, what=what)
    except AssertionError as exc:
        group = daemons if isinstance(daemons, list) else [daemons]
        logs = "\n".join(f"--- {d.name}\n" + "\n".join(d.lines[-40:]) for d in group)
        raise AssertionError(f"{exc}\n{logs}") from None


def drained(d: Daemon, total: int, log: Path | None = None) -> bool:
    """Everything delivered and recorded: nothing waits in the inbox, one row per input."""
    return not inbox_files(d.inbox) and count_rows(log or d.log_path) >= total


def retries(d: Daemon) -> int:
    """Back-off retries seen so far (debug): failed batches and failed re-deliveries of earlier ones."""
    return len(d.events(OUTPUT_UNAVAILABLE)) + len(d.events("retry failed"))


def errors(d: Daemon, event: str | None = None) -> list[dict]:
    return [e for e in d.events(event) if e.get("level") == "error"]


def finish(d: Daemon, inputs: collections.Counter[str], timeout: float = 120.0) -> dict[str, int]:
    """Wait until drained, stop gracefully, and check the invariant; returns the places."""
    total = sum(inputs.values())
    wait_for(d, lambda: drained(d, total), timeout, interval=0.2, what=f"{total} files sorted")
    assert d.terminate(30) == 0, d.output_text()
    places = check_nothing_lost(inputs, d.inbox, d.output, d.rows())
    assert places["inbox"] == 0, places
    assert len(d.rows()) == total
    assert not work_leftovers(d.inbox), work_leftovers(d.inbox)
    return places


# --------------------------------------------------------------------------- SIGKILL at any moment


def threads_stopped(pid: int) -> bool:
    """Every thread of ``pid`` has taken its SIGSTOP (state T): nothing of it moves any more."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        return all(Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
                   for t in tasks)
    except (OSError, IndexError):
        return False


def freeze_with_work_in_flight(d: Daemon, rng: random.Random, refill, deadline: float = 90.0) -> list[str]:
    """SIGSTOP the daemon at a moment when its work area holds a claimed photo or a batch journal.

    The daemon is frozen while the test looks, so what it sees is what a SIGKILL now would
    leave behind. Between tries the daemon runs on for a random few milliseconds; when it has
    drained what it was given, ``refill()`` moves more photos in, so the daemon can never run
    out of work before the test has made its kill.
    """
    assert d.proc is not None
    pid = d.proc.pid
    give_up = time.monotonic() + deadline
    while True:
        d.signal(signal.SIGSTOP)
        wait_until(lambda: threads_stopped(pid), 10, interval=0.001, what="daemon stopped")
        in_flight = work_leftovers(d.inbox)
        if in_flight:
            return in_flight
        if not inbox_files(d.inbox):
            assert refill(), "no photos left to keep the daemon busy: raise the test's photo count"
        assert time.monotonic() < give_up, "no moment with work in flight found\n" + d.output_text()
        d.signal(signal.SIGCONT)
        time.sleep(rng.uniform(0, 0.005))  # a random moment to look at: a test input, not synchronisation


@pytest.mark.parametrize("across", [False, True], ids=["same-filesystem", "across-filesystems"])
def test_sigkill_at_random_moments_loses_and_doubles_nothing(tmp_path: Path, daemons: list[Daemon],
                                                             across: bool) -> None:
    """300 photos (some broken), max_batch 8, five SIGKILLs at random moments, restart each time.

    Every kill lands while work is in flight, by construction: photos enter the inbox in
    waves that the test moves in, and the daemon is frozen (SIGSTOP) and killed only at a
    moment when its work area holds a claimed photo or a batch journal. Across filesystems
    the output is on another filesystem (``/dev/shm``), so a kill can land in the middle of a
    copy + fsync + no-clobber link, the hardest case to recover.
    """
    output = tmp_path / "sorted"
    if across:
        other = other_filesystem(tmp_path)
        if other is None:
            pytest.skip("no writable /dev/shm on another filesystem than the test folder")
        output = other / "sorted"
    seed = int(os.environ.get("TEST_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"seed {seed} (set TEST_KILL_SEED to replay)")
    try:
        d = Daemon(tmp_path, output=output, settings={**FAST, "max_batch": 8})
        daemons.append(d)
        stage = tmp_path / "stage"
        inputs = write_inputs(stage, 288, broken=12)
        waiting = sorted(os.listdir(stage))
        rng.shuffle(waiting)

        def refill(n: int = 30) -> int:
            """Move the next ``n`` staged files into the inbox; how many were moved."""
            wave = [waiting.pop() for _ in range(min(n, len(waiting)))]
            for name in wave:
                os.rename(stage / name, d.inbox / name)
            return len(wave)

        d.start()
        refill(60)
        kills = []
        for k in range(5):
            mode = rng.choice(["rows", "rows", "time"]) if k else "rows"
            if mode == "rows":
                # After a random number of new CSV rows (fewer than there are photos to sort).
                moved = sum(inputs.values()) - len(waiting)
                target = min(count_rows(d.log_path) + rng.randint(1, 40), moved - 1)
                wait_for(d, lambda: count_rows(d.log_path) >= target or not inbox_files(d.inbox), 60,
                         interval=0.002, what=f"{target} rows")
            else:
                time.sleep(rng.uniform(0, 0.4))  # soon after READY: recovery, first claims
            in_flight = freeze_with_work_in_flight(d, rng, refill)
            kills.append((mode, count_rows(d.log_path), len(in_flight)))
            d.kill()
            d.start()
        print("killed at (mode, rows, files in the work area):", kills)
        assert all(n > 0 for _, _, n in kills)
        refill(len(waiting))
        places = finish(d, inputs)
        print("places:", places)
        assert places.get("rejected") == 12, places
        recovered = [e for e in d.events("recovered work of a stopped worker")]
        assert recovered, "the last start should have recovered the killed worker's folder"
    finally:
        if across:
            shutil.rmtree(output.parent, ignore_errors=True)


# --------------------------------------------------------------------------- two workers, one inbox


def test_two_workers_share_one_inbox_without_doing_anything_twice(tmp_path: Path, daemons: list[Daemon]) -> None:
    inbox, output = tmp_path / "inbox", tmp_path / "sorted"
    a = Daemon(tmp_path, name="alpha", inbox=inbox, output=output, settings={**FAST, "max_batch": 16})
    b = Daemon(tmp_path, name="bravo", inbox=inbox, output=output, settings={**FAST, "max_batch": 16})
    daemons += [a, b]
    inputs = write_inputs(tmp_path / "stage", 1000)
    a.start(wait_ready=False)
    b.start(wait_ready=False)
    a.wait_ready()
    b.wait_ready()
    move_in(tmp_path / "stage", inbox)
    wait_for([a, b], lambda: drained(a, 1000), 180, interval=0.2, what="1000 sorted")
    assert a.terminate(30) == 0 and b.terminate(30) == 0
    rows = read_csv(a.log_path)
    check_nothing_lost(inputs, inbox, output, rows)
    assert len(rows) == 1000
    by_sha = collections.Counter(r["sha256"] for r in rows)
    assert max(by_sha.values()) == 1, "a photo was processed twice"
    by_source = collections.Counter(r["source"] for r in rows)
    assert max(by_source.values()) == 1, "an inbox file was delivered twice"
    workers = collections.Counter(r["worker"] for r in rows)
    print("work done per worker:", dict(workers))
    assert set(workers) <= {"alpha", "bravo"}
    if len(workers) < 2:
        print("note: one worker happened to do everything (allowed; no duplicates either way)")
    assert not work_leftovers(inbox)


# --------------------------------------------------------------------------- output disk full


def test_output_disk_full_waits_with_one_error_and_resumes(tmp_path: Path, tmpfs, daemons: list[Daemon]) -> None:
    """A 3 MB output (the CSV inside it too) and ~6 MB of photos: stop, wait, one error, resume."""
    output = tmpfs("sorted", "3m")
    d = Daemon(tmp_path, output=output,
               settings={**FAST, "max_batch": 8, "retry_max_seconds": 1.0, "log_level": "debug"})
    daemons.append(d)
    inputs = write_inputs(tmp_path / "stage", 400, broken=5, size=(128, 128))
    total_bytes = sum(p.stat().st_size for p in (tmp_path / "stage").iterdir())
    assert total_bytes > 4 * 1024 * 1024
    d.start()
    move_in(tmp_path / "stage", d.inbox)
    wait_for(d, lambda: errors(d, OUTPUT_UNAVAILABLE), 60, what="the output-full error")
    # Back-off retries (debug) follow the one error; while it lasts, photos wait in the inbox.
    wait_for(d, lambda: retries(d) >= 4, 30, what="retries")
    wait_for(d, lambda: not any(p.name.endswith(".partial") for p in output.rglob("*")), 10,
               what="no partial copy left on the full output")
    waiting = inbox_files(d.inbox)
    assert len(waiting) > 50, f"only {len(waiting)} photos wait in the inbox"
    assert d.proc is not None and d.proc.poll() is None
    assert len(errors(d, OUTPUT_UNAVAILABLE)) == 1, errors(d)
    # A crash while the disk is full must not lose anything either: restart into the full disk.
    d.kill()
    d.start()
    wait_for(d, lambda: errors(d, OUTPUT_UNAVAILABLE) and retries(d) >= 2, 30,
             what="restarted daemon meets the full disk")
    remount(output, "size=64m")
    finish(d, inputs, timeout=120)
    # One error per outage, not one per file or per retry.
    assert len(errors(d, OUTPUT_UNAVAILABLE)) == 1, [e for e in errors(d)]
    waits = [e.get("retry_in_s") for e in d.events(OUTPUT_UNAVAILABLE)]
    print("retry_in_s after the restart:", waits)
    assert all(isinstance(w, (int, float)) and 0 < w <= 1.0 for w in waits)


def test_csv_log_that_cannot_grow_owes_rows_and_pays_them(tmp_path: Path, tmpfs, daemons: list[Daemon]) -> None:
    """The CSV on its own full filesystem: photos may be placed, but each gets its row once it can grow."""
    logfs = tmpfs("logfs", "256k")
    filler = fill_up(logfs)
    log = logfs / "classifications.csv"
    d = Daemon(tmp_path, settings={**FAST, "max_batch": 8, "retry_max_seconds": 1.0, "log_level": "debug",
                                   "log": str(log)})
    daemons.append(d)
    inputs = write_inputs(tmp_path / "stage", 60, broken=3)
    d.start()
    move_in(tmp_path / "stage", d.inbox)
    wait_for(d, lambda: errors(d, OUTPUT_UNAVAILABLE), 60, what="the CSV-full error")
    wait_for(d, lambda: retries(d) >= 4, 30, what="retries")
    # It stops taking photos while rows are owed: most still wait in the inbox.
    placed = [p for p in (tmp_path / "sorted").rglob("*") if p.is_file()]
    assert len(placed) <= 16, f"{len(placed)} photos were moved although their rows could not be written"
    assert len(errors(d, OUTPUT_UNAVAILABLE)) == 1, errors(d)
    d.kill()
    d.start()  # recovery meets the full CSV filesystem: it must still come up
    filler.unlink()
    wait_for(d, lambda: drained(d, 63, log), 60, interval=0.2, what="63 rows")
    assert d.terminate(30) == 0
    rows = read_csv(log)
    check_nothing_lost(inputs, d.inbox, tmp_path / "sorted", rows)
    assert len(rows) == 63
    assert len(errors(d, OUTPUT_UNAVAILABLE)) == 1, errors(d)
    assert not work_leftovers(d.inbox)


# --------------------------------------------------------------------------- output read-only


def test_read_only_output_waits_and_resumes(tmp_path: Path, tmpfs, daemons: list[Daemon]) -> None:
    output = tmpfs("sorted", "64m")
    d = Daemon(tmp_path, output=output,
               settings={**FAST, "max_batch": 8, "retry_max_seconds": 1.0, "log_level": "debug"})
    daemons.append(d)
    first = write_inputs(tmp_path / "stage", 40)
    d.start()
    move_in(tmp_path / "stage", d.inbox)
    wait_for(d, lambda: drained(d, 40), 60, what="first 40 sorted")
    remount(output, "ro")
    second = write_inputs(tmp_path / "stage2", 40, seed=1)
    move_in(tmp_path / "stage2", d.inbox)
    wait_for(d, lambda: errors(d, OUTPUT_UNAVAILABLE), 60, what="the read-only error")
    wait_for(d, lambda: retries(d) >= 3, 30, what="retries")
    # Between retries every new photo is back in the inbox, untouched.
    wait_for(d, lambda: hash_multiset(inbox_files(d.inbox)) == second, 30, what="all 40 back in the inbox")
    assert count_rows(d.log_path) == 40
    # A restart while read-only must come up and wait as well.
    d.kill()
    d.start()
    wait_for(d, lambda: errors(d, OUTPUT_UNAVAILABLE) and retries(d) >= 2, 30,
             what="restarted daemon meets the read-only output")
    remount(output, "rw")
    finish(d, first + second, timeout=60)
    assert len(errors(d, OUTPUT_UNAVAILABLE)) == 1, errors(d)


# --------------------------------------------------------------------------- the inbox vanishes


def test_inbox_renamed_away_and_back(tmp_path: Path, daemons: list[Daemon]) -> None:
    """The inbox is renamed away in the middle of the work (batches claimed, journals being written)."""
    d = Daemon(tmp_path, settings={**FAST, "max_batch": 8, "rescan_seconds": 0.5, "retry_max_seconds": 1.0})
    daemons.append(d)
    first = write_inputs(tmp_path / "stage", 200)
    d.start()
    move_in(tmp_path / "stage", d.inbox)
    wait_for(d, lambda: count_rows(d.log_path) >= 40, 60, interval=0.005, what="40 rows")
    away = tmp_path / "inbox.away"
    os.rename(d.inbox, away)
    wait_for(d, lambda: errors(d, INBOX_UNAVAILABLE), 30, what="the inbox-unavailable error")
    # Photos that arrive while it is away (they are in the moved folder) are sorted once it is back.
    second = write_inputs(tmp_path / "stage2", 10, seed=1, prefix="AWAY_")
    move_in(tmp_path / "stage2", away)
    os.rename(away, d.inbox)
    wait_for(d, lambda: d.events("inbox available again"), 30, what="inbox back")
    wait_for(d, lambda: not inbox_files(d.inbox), 60, what="the photos of the away time sorted")
    third = write_inputs(tmp_path / "stage3", 10, seed=2)
    move_in(tmp_path / "stage3", d.inbox)
    finish(d, first + second + third, timeout=60)
    assert len(errors(d, INBOX_UNAVAILABLE)) == 1, errors(d)


def _mount_test_daemon(tmp_path: Path, inbox: Path, daemons: list[Daemon]) -> Daemon:
    """A daemon for the inbox-mount tests: small batches, rescans every 0.5 s, retries within 1 s."""
    d = Daemon(tmp_path, inbox=inbox, settings={**FAST, "max_batch": 8, "rescan_seconds": 0.5,
                                                "retry_max_seconds": 1.0})
    daemons.append(d)
    return d


def test_inbox_filesystem_unmounted_and_mounted_again(tmp_path: Path, tmpfs, daemons: list[Daemon]) -> None:
    """The inbox is a mount that goes away (lazily, as a busy mount does) and comes back empty."""
    inbox = tmpfs("inbox", "64m")
    d = _mount_test_daemon(tmp_path, inbox, daemons)
    stage = inbox / ".incoming"  # hidden, so ignored, and on the inbox's filesystem
    first = write_inputs(stage, 20)
    d.start()
    move_in(stage, inbox)
    wait_for(d, lambda: drained(d, 20), 60, what="first 20 sorted")
    subprocess.run(["umount", "-l", str(inbox)], check=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(inbox)], capture_output=True)
    assert res.returncode == 0, res.stderr
    stage = inbox / ".incoming"
    second = write_inputs(stage, 20, seed=1)
    move_in(stage, inbox)
    wait_for(d, lambda: drained(d, 40), 60, interval=0.2, what="photos dropped after the remount sorted")
    assert errors(d, WORK_VANISHED), errors(d)
    assert d.terminate(30) == 0
    check_nothing_lost(first + second, inbox, d.output, d.rows())


def _bind(source: Path, target: Path) -> None:
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True, capture_output=True)


def _lazy_umount(point: Path) -> None:
    subprocess.run(["umount", "-l", str(point)], check=True, capture_output=True)


def test_inbox_filesystem_swapped_and_the_first_one_back(tmp_path: Path, tmpfs, daemons: list[Daemon]) -> None:
    """The inbox's filesystem goes away mid-work, another one is mounted, then the first comes back.

    Batches in flight when the first went away sit in its old work folder, whose lock names
    our own (live) pid: once that filesystem is back, recovery must finish them, and in the
    meantime intake must not stall waiting for them.
    """
    fs_x, fs_y = tmpfs("fs_x", "64m"), tmpfs("fs_y", "16m")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _bind(fs_x, inbox)
    try:
        d = _mount_test_daemon(tmp_path, inbox, daemons)
        stage = inbox / ".incoming"  # hidden, so ignored, and on the inbox's filesystem
        first = write_inputs(stage, 300)
        d.start()
        move_in(stage, inbox)
        wait_for(d, lambda: count_rows(d.log_path) >= 40, 60, interval=0.005, what="40 rows")
        _lazy_umount(inbox)
        _bind(fs_y, inbox)
        wait_for(d, lambda: errors(d, WORK_VANISHED), 30, what="a new work folder on the second filesystem")
        stage = inbox / ".incoming"
        second = write_inputs(stage, 10, seed=1, prefix="Y_")
        move_in(stage, inbox)
        wait_for(d, lambda: sum(os.path.basename(r["source"]).startswith("Y_") for r in d.rows()) == 10, 60,
                 interval=0.1, what="the second filesystem's photos delivered")
        _lazy_umount(inbox)
        _bind(fs_x, inbox)
        wait_for(d, lambda: len(errors(d, WORK_VANISHED)) >= 2, 30, what="back on the first filesystem")
        try:
            wait_for(d, lambda: drained(d, 310) and not work_leftovers(inbox), 90, interval=0.2,
                     what="everything sorted, the old work folder included")
        except AssertionError as exc:
            events = [e for e in d.events() if e.get("event") not in ("sorted", "batch")]
            raise AssertionError(f"{exc}\nrows {count_rows(d.log_path)}, inbox {inbox_files(inbox)[:5]}, "
                                 f"work {work_leftovers(inbox)[:8]}\nother events: {events[-25:]}") from None
        assert d.terminate(30) == 0, d.output_text()
        places = check_nothing_lost(first + second, inbox, d.output, d.rows())
        assert places["inbox"] == 0 and len(d.rows()) == 310, places
    finally:
        subprocess.run(["umount", "-l", str(inbox)], capture_output=True)


# --------------------------------------------------------------------------- ten thousand at once


def test_ten_thousand_photos_at_once_with_bounded_memory(tmp_path: Path, daemons: list[Daemon]) -> None:
    count = int(os.environ.get("TEST_FLOOD_PHOTOS", "10000"))
    d = Daemon(tmp_path, settings={"settle_seconds": 0.3, "rescan_seconds": 5.0})
    daemons.append(d)
    stage = tmp_path / "stage"
    inputs = write_inputs(stage, count)
    d.start()
    assert d.proc is not None
    baseline = rss_kib(d.proc.pid)
    started = time.monotonic()
    move_in(stage, d.inbox)
    peak = [baseline]

    def done() -> bool:
        peak[0] = max(peak[0], rss_kib(d.proc.pid))  # type: ignore[union-attr]
        return drained(d, count)

    wait_for(d, done, 240, interval=0.1, what=f"{count} sorted")
    elapsed = time.monotonic() - started
    print(f"{count} photos sorted in {elapsed:.1f}s ({count / elapsed:.0f}/s); "
          f"RSS after start {baseline / 1024:.0f} MiB, peak {peak[0] / 1024:.0f} MiB")
    assert d.terminate(30) == 0
    check_nothing_lost(inputs, d.inbox, d.output, d.rows())
    assert peak[0] < 1200 * 1024, f"peak RSS {peak[0] / 1024:.0f} MiB"
    assert peak[0] - baseline < 500 * 1024, f"RSS grew by {(peak[0] - baseline) / 1024:.0f} MiB"


def test_a_live_worker_recovers_a_dead_neighbour_without_a_restart(tmp_path: Path) -> None:
    """One of two workers dies for good: the survivor finishes its claimed files at its next rescan."""
    import socket as _socket

    from bikewatch.store.journal import PHASE_CLAIMED, Item, Journal, write_journal

    d = Daemon(tmp_path, settings={"rescan_seconds": 1.0}).start()
    try:
        dead = d.inbox / ".bikewatch" / "work" / "gone-1-abcdef"
        dead.mkdir(parents=True)
        # Its owner line names this host and a pid that does not exist: provably dead.
        (dead / "lock").write_text(f"{_socket.gethostname()} 999999999")
        data = photo_bytes(1234)
        (dead / "gone.1.0000").write_bytes(data)
        write_journal(dead / "gone.1.json", Journal(batch="gone.1", phase=PHASE_CLAIMED, worker="gone",
                                                    items=(Item(key="gone.1.0000", source="orphan.jpg"),)))
        rows = wait_until(lambda: [r for r in d.rows() if r["source"].endswith("orphan.jpg")], 30,
                          what="the dead worker's claimed photo sorted by the live one")
        assert len(rows) == 1 and rows[0]["sha256"] == hashlib.sha256(data).hexdigest()
        wait_until(lambda: not dead.exists(), 10, what="the dead worker's folder removed")
        assert d.events("recovered work of a stopped worker")
        assert d.terminate() == 0
    finally:
        d.stop_quietly()
