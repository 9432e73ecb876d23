"""Decode worker processes: the same results as decoding in the service, and crashes contained.

Everything is real: spawned worker processes, real image files, real signals (a worker
that really dies of SIGSEGV, a worker really killed with SIGKILL, a service process
really killed while its workers wait).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import imagefactory as img
from bikewatch.decode.prepare import VOUCH_AGE_NS, prepare
from bikewatch.decode.pool import CHUNK, NICENESS, DecodePool, Packed, Task, pack, prepare_task, take_size, unpack
from harness import Daemon, wait_until

MAX_PIXELS = 100_000_000


def crash_on_request(task: Task) -> Packed:
    """A job for the tests: a file named ``*crash*`` kills its worker with a real SIGSEGV, as a codec bug
    would, and one named ``*stuck*`` never finishes."""
    if "crash" in task.key:
        os.kill(os.getpid(), signal.SIGSEGV)
    if "stuck" in task.key:
        time.sleep(3600)  # a codec in an endless loop
    return prepare_task(task)


def slow_pid(task: Task) -> Packed:
    """A job for the tests: a tenth of a second of work, and which worker did it."""
    time.sleep(0.1)
    return (task.key, None, "", os.getpid(), 0, "", None)


def test_take_size_is_a_fair_share_of_the_queue_up_to_a_chunk() -> None:
    assert take_size(1, 2) == 1
    assert take_size(4, 2) == 2 and take_size(5, 2) == 3
    assert take_size(96, 2) == CHUNK
    assert take_size(96, 16) == 6
    assert take_size(0, 0) == 1


def test_a_few_queued_files_spread_over_all_workers(tmp_path: Path) -> None:
    with DecodePool(4, job=slow_pid) as pool:
        assert pool.wait_ready(60)
        futures = [pool.submit(tmp_path / f"f{i}.jpg", f"f{i}", max_pixels=MAX_PIXELS) for i in range(8)]
        pids = {f.result(timeout=60).size for f in futures}
        assert pids <= set(pool.pids())
    # At most a fair share each (2 of 8 queued files per worker): one proxy cannot take them all.
    assert len(pids) >= 3, f"8 files went to only {len(pids)} of 4 workers"


def _gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it runs no more)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _files(folder: Path) -> list[Path]:
    folder.mkdir(exist_ok=True)
    broken = img.truncated_jpeg(folder / "broken.jpg")
    img.jpeg(folder / "whole.jpg")
    link = folder / "link.jpg"
    link.symlink_to(folder / "whole.jpg")
    return [img.jpeg(folder / "a.jpg", image=img.gradient(), exif_orientation=6), img.png(folder / "b.png", mode="RGBA"),
            img.gif(folder / "c.gif"), img.empty(folder / "d.jpg"), broken, link, folder / "missing.jpg"]


def test_pack_and_unpack_keep_a_prepared_exactly(tmp_path: Path) -> None:
    p = prepare(img.jpeg(tmp_path / "a.jpg", image=img.gradient(), exif_orientation=6), "a.jpg", max_pixels=MAX_PIXELS)
    q = unpack(pack(p))
    assert q.array is not None and p.array is not None
    assert q.array.dtype == np.float32 and np.array_equal(q.array, p.array)
    assert (q.key, q.sha256, q.size, q.mtime_ns, q.error, q.signature) == (
        p.key, p.sha256, p.size, p.mtime_ns, p.error, p.signature)


def test_workers_give_what_preparing_in_process_gives(tmp_path: Path) -> None:
    files = _files(tmp_path / "in")
    wait_until(lambda: all(time.time_ns() - os.lstat(f).st_ctime_ns > VOUCH_AGE_NS for f in files[:-1]), 5,
               what="files old enough to vouch for")
    with DecodePool(2) as pool:
        futures = [pool.submit(f, f.name, max_pixels=MAX_PIXELS, vouch=True) for f in files]
        got = [f.result(timeout=60) for f in futures]
        assert pool.restarts == 0
    for path, g in zip(files, got):
        want = prepare(path, path.name, max_pixels=MAX_PIXELS, vouch=True)
        assert (g.key, g.sha256, g.size, g.error, g.signature) == (want.key, want.sha256, want.size, want.error,
                                                                    want.signature), path.name
        if want.array is None:
            assert g.array is None and g.error, path.name
        else:
            assert g.array is not None and np.array_equal(g.array, want.array), path.name
    assert got[0].signature is not None and not got[0].error
    assert "symbolic link" in got[5].error and got[6].error


def test_workers_run_nicer_than_the_service() -> None:
    with DecodePool(2) as pool:
        assert pool.wait_ready(60)
        for pid in pool.pids():
            with open(f"/proc/{pid}/stat") as fh:
                nice = int(fh.read().rpartition(")")[2].split()[16])
            assert nice == min(19, os.nice(0) + NICENESS)


def test_a_file_that_kills_its_decoder_is_rejected_alone_and_the_pool_goes_on(tmp_path: Path) -> None:
    good = [img.jpeg(tmp_path / f"good{i}.jpg") for i in range(5)]
    bad = img.jpeg(tmp_path / "crash.jpg")
    crashed: list[tuple[str, str]] = []
    with DecodePool(1, job=crash_on_request, on_crash=lambda t, why: crashed.append((t.key, why))) as pool:
        first = pool.pids()
        # One worker, so the bad file shares a chunk with good ones: they must not be blamed.
        futures = [pool.submit(p, p.name, max_pixels=MAX_PIXELS) for p in [good[0], bad, *good[1:]]]
        results = [f.result(timeout=120) for f in futures]
        assert pool.pids() != first  # the worker that died was replaced
        after = pool.submit(good[0], "again.jpg", max_pixels=MAX_PIXELS).result(timeout=60)
    verdict = results[1]
    assert verdict.array is None and "crashed" in verdict.error and "SIGSEGV" in verdict.error
    assert all(r.array is not None and not r.error for i, r in enumerate(results) if i != 1)
    assert crashed == [("crash.jpg", verdict.error)]
    assert after.array is not None


def test_a_file_that_stalls_its_decoder_is_given_up_after_the_timeout(tmp_path: Path) -> None:
    good = img.jpeg(tmp_path / "good.jpg")
    stuck = img.jpeg(tmp_path / "stuck.jpg")
    with DecodePool(1, job=crash_on_request, timeout=1.0) as pool:
        futures = [pool.submit(p, p.name, max_pixels=MAX_PIXELS) for p in (stuck, good)]
        verdict, other = (f.result(timeout=60) for f in futures)
    assert verdict.array is None and "longer than 1 s" in verdict.error
    assert other.array is not None and not other.error


def test_a_worker_killed_while_idle_is_replaced_and_no_file_is_blamed(tmp_path: Path) -> None:
    photo = img.jpeg(tmp_path / "a.jpg")
    crashed: list[str] = []
    with DecodePool(1, on_crash=lambda t, why: crashed.append(t.key)) as pool:
        assert pool.submit(photo, "a.jpg", max_pixels=MAX_PIXELS).result(timeout=60).array is not None
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGKILL)  # the OOM killer, say
        wait_until(lambda: _gone(pid), 10, what="the worker to die")
        result = pool.submit(photo, "b.jpg", max_pixels=MAX_PIXELS).result(timeout=60)
        assert pool.restarts == 1 and pool.pids() != [pid]
    assert result.array is not None and not result.error
    assert crashed == []


SERVICE = """
import sys
from pathlib import Path
from typing import Any
from bikewatch.decode.pool import DecodePool
pool = DecodePool(2)
assert pool.wait_ready(60)
print(" ".join(map(str, pool.pids())), flush=True)
for line in sys.stdin:
    r = pool.submit(Path(line.strip()), "x", max_pixels=10**8).result()
    print(r.array is not None, pool.restarts, flush=True)
"""


def test_workers_ignore_stop_signals_and_exit_when_the_service_dies(tmp_path: Path) -> None:
    photo = img.jpeg(tmp_path / "a.jpg")
    proc = subprocess.Popen([sys.executable, "-c", SERVICE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdin and proc.stdout
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2  # printed once both workers said they were up
        for pid in pids:  # what systemd sends the whole control group, and a terminal's Ctrl-C
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                os.kill(pid, sig)
        proc.stdin.write(f"{photo}\n{photo}\n")
        proc.stdin.flush()
        # Pending signals are handled before a worker reads its next file: a worker that had
        # died of them would show as a restart.
        assert [proc.stdout.readline().split() for _ in range(2)] == [["True", "0"]] * 2
        assert not any(_gone(pid) for pid in pids)
        proc.kill()  # the service dies without a chance to stop its workers
        proc.wait(10)
        wait_until(lambda: all(_gone(pid) for pid in pids), 20, what="the workers to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("workers", [1, 3])
def test_shutdown_finishes_queued_work_first(tmp_path: Path, workers: int) -> None:
    photos = [img.jpeg(tmp_path / f"p{i}.jpg") for i in range(12)]
    pool = DecodePool(workers)
    futures = [pool.submit(p, p.name, max_pixels=MAX_PIXELS) for p in photos]
    pids = pool.pids()
    pool.shutdown()
    assert all(f.done() and f.result().array is not None for f in futures)
    wait_until(lambda: all(_gone(pid) for pid in pids), 20, what="the workers to exit")


# ----- in the daemon ------------------------------------------------------------------------------


def _decode_workers(pid: int) -> list[int]:
    """The daemon's spawned decode workers (not multiprocessing's resource tracker)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fh:
            for child in map(int, fh.read().split()):
                with open(f"/proc/{child}/cmdline", "rb") as cmd:
                    if b"spawn_main" in cmd.read():
                        found.append(child)
    return found


@pytest.mark.slow
def test_the_daemon_replaces_a_killed_worker_and_stops_with_its_control_group(tmp_path: Path) -> None:
    d = Daemon(tmp_path, settings={"decode_workers": 1}).start()
    try:
        assert d.proc is not None
        workers = wait_until(lambda: _decode_workers(d.proc.pid), 30, what="the decode worker")
        os.kill(workers[0], signal.SIGKILL)  # the only one: every photo needs its replacement
        names = [f"p{i}.jpg" for i in range(6)]
        for i, name in enumerate(names):
            img.jpeg(tmp_path / name, color=(30 * i, 200, 90))
            os.rename(tmp_path / name, d.inbox / name)
        wait_until(lambda: len(d.rows()) == len(names), 60, what="every photo's CSV row")
        rows = d.rows()
        assert sorted(Path(r["source"]).name for r in rows) == names
        assert all(r["label"] in ("mountain", "road") for r in rows), rows
        assert not d.events("decoder crashed")
        assert [e["reason"] for e in d.events("decode worker replaced")] == ["the decoder crashed (SIGKILL)"]
        assert len(_decode_workers(d.proc.pid)) == 1 and not _gone(_decode_workers(d.proc.pid)[0])
        assert _gone(workers[0])
        # systemd's stop: SIGTERM to every process of the unit's control group at once.
        everyone = [d.proc.pid, *_decode_workers(d.proc.pid)]
        for pid in everyone:
            os.kill(pid, signal.SIGTERM)
        assert d.wait(30) == 0
        assert d.events("stopped")
        wait_until(lambda: all(_gone(pid) for pid in everyone[1:]), 20, what="the workers to exit")
    finally:
        d.stop_quietly()


class _Unpicklable(Exception):
    def __reduce__(self) -> Any:
        raise TypeError("not picklable")


def fail_unpicklably(task: Task) -> Packed:
    """A job for the tests: an unexpected error that pickle cannot carry back."""
    raise _Unpicklable(f"odd failure on {task.key}")


def test_an_unexpected_error_in_a_worker_reaches_the_caller_without_killing_the_worker(tmp_path: Path) -> None:
    photo = img.jpeg(tmp_path / "a.jpg")
    with DecodePool(1, job=fail_unpicklably) as pool:
        future = pool.submit(photo, "a.jpg", max_pixels=MAX_PIXELS)
        with pytest.raises(RuntimeError, match="odd failure on a.jpg"):
            future.result(timeout=60)
        assert pool.restarts == 0
