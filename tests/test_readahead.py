"""Reading ahead: files are read and classified while they settle, and a result is used only
for the very file it was read from.

The unit tests drive :class:`ReadAhead` with real files, real reads on a real thread
pool and the real model. The daemon tests run a real ``bikewatch run`` child and
check the CSV against what the model says about the bytes that were finally moved.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bikewatch.decode.prepare import COARSE_VOUCH_AGE_NS, VOUCH_AGE_NS, prepare, signature_of
from bikewatch.decode.preprocess import preprocess_bytes
from bikewatch.service.readahead import QUIET_SECONDS, ReadAhead
from bikewatch.intake.scan import observe
from harness import Daemon, wait_until

MAX_PIXELS = 100_000_000


def _jpeg(seed: int, size: tuple[int, int] = (120, 80)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _same_size_pair() -> tuple[bytes, bytes]:
    """Two different photos padded to the same length (decoders stop at the JPEG end marker)."""
    a, b = _jpeg(1), _jpeg(2)
    n = max(len(a), len(b))
    return a + b"\0" * (n - len(a)), b + b"\0" * (n - len(b))


def _old_enough(path: Path) -> bool:
    return time.time_ns() - os.stat(path).st_ctime_ns > VOUCH_AGE_NS


def _stat(size: int, mtime: int, ctime: int, ino: int = 7) -> os.stat_result:
    return os.stat_result((0o100644, ino, 0, 1, 0, 0, size, 0, 0, 0, 0, 0, 0, 0, mtime, ctime))


# ----- signature_of: when a read vouches for a file (pure) -----------------------------------------


def test_signature_vouches_for_a_still_file() -> None:
    st = _stat(100, 5_123_000_000, 5_123_000_001)
    assert signature_of(st, st, 5_123_000_001 + VOUCH_AGE_NS) == (100, 5_123_000_000, 5_123_000_001, 7)


@pytest.mark.parametrize("after", [
    _stat(101, 5_123_000_000, 5_123_000_001),  # grew while read
    _stat(100, 5_123_000_000, 5_130_000_000),  # written in place (only the ctime tells)
    _stat(100, 5_123_000_000, 5_123_000_001, ino=8),  # replaced
])
def test_signature_refuses_a_file_changed_while_read(after: os.stat_result) -> None:
    before = _stat(100, 5_123_000_000, 5_123_000_001)
    assert signature_of(before, after, 9_000_000_000) is None


def test_signature_refuses_a_read_too_soon_after_a_change_or_from_the_future() -> None:
    st = _stat(100, 5_123_000_000, 5_123_000_001)
    assert signature_of(st, st, 5_123_000_001 + VOUCH_AGE_NS - 1) is None
    assert signature_of(st, st, 5_000_000_000) is None  # ctime ahead of our clock (a skewed share)


def test_signature_waits_longer_on_whole_second_timestamps() -> None:
    st = _stat(100, 5_000_000_000, 5_000_000_000)  # FAT-like: no sub-second part
    assert signature_of(st, st, 5_000_000_000 + VOUCH_AGE_NS) is None
    assert signature_of(st, st, 5_000_000_000 + COARSE_VOUCH_AGE_NS) is not None


def test_prepare_vouches_only_for_a_file_still_for_long_enough(tmp_path: Path) -> None:
    p = tmp_path / "a.jpg"
    p.write_bytes(_jpeg(1))
    fresh = prepare(p, "a", max_pixels=MAX_PIXELS, vouch=True)
    wait_until(lambda: _old_enough(p), 5, interval=0.01, what="ctime to age")
    still = prepare(p, "a", max_pixels=MAX_PIXELS, vouch=True)
    claimed = prepare(p, "a", max_pixels=MAX_PIXELS)
    st = os.stat(p)
    assert fresh.signature is None
    assert still.signature == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    assert claimed.signature is None  # a read at the claim vouches for nothing


# ----- ReadAhead: bookkeeping, on real reads --------------------------------------------------------


def _read_ahead_one(ra: ReadAhead, pool: ThreadPoolExecutor, inbox: Path, rel: str) -> None:
    seen = observe(inbox, rel)
    assert seen is not None and ra.wanted(seen)
    future = pool.submit(prepare, inbox / rel, rel, max_pixels=MAX_PIXELS, vouch=True)
    ra.start(seen, future)
    future.result()
    ra.harvest()


def test_queue_gives_a_file_once_it_has_been_quiet(tmp_path: Path) -> None:
    ra = ReadAhead(limit=10, reading_max=4, arrays_max=8)
    ra.noticed("a.jpg", 100.0)
    ra.noticed("b.jpg", 100.05)
    assert ra.due(100.0 + QUIET_SECONDS / 2) is None
    assert ra.next_due(100.0) == pytest.approx(QUIET_SECONDS)
    assert ra.due(100.0 + QUIET_SECONDS) == "a.jpg"
    assert ra.due(100.0 + QUIET_SECONDS) is None
    assert ra.due(200.0) == "b.jpg"
    assert ra.next_due(200.0) is None


def test_off_reads_nothing() -> None:
    ra = ReadAhead(limit=0, reading_max=4, arrays_max=8)
    ra.noticed("a.jpg", 0.0)
    assert ra.room() == 0 and ra.due(10.0) is None


def test_result_used_for_the_unchanged_file_with_the_model_answer(tmp_path: Path, default_classifier) -> None:
    data = _jpeg(3)
    (tmp_path / "a.jpg").write_bytes(data)
    wait_until(lambda: _old_enough(tmp_path / "a.jpg"), 5, interval=0.01, what="ctime to age")
    ra = ReadAhead(limit=10, reading_max=4, arrays_max=8)
    with ThreadPoolExecutor(2) as pool:
        _read_ahead_one(ra, pool, tmp_path, "a.jpg")
    entries = ra.unclassified(32)
    assert len(entries) == 1
    probs = default_classifier.predict(np.stack([e.array for e in entries]))
    ra.classified(entries, probs, default_classifier.identity)
    assert ra.unclassified(32) == [] and ra.room() == 4

    usable = ra.take(observe(tmp_path, "a.jpg"), default_classifier.identity)
    assert usable is not None and usable.prepared.array is None
    assert usable.prepared.sha256 == hashlib.sha256(data).hexdigest()
    expected = default_classifier.predict(preprocess_bytes(data)[None])[0]
    np.testing.assert_allclose(usable.probs, expected, atol=1e-5)
    assert (ra.used, ra.wasted, len(ra)) == (1, 0, 0)


def test_result_of_another_model_is_not_used(tmp_path: Path, default_classifier) -> None:
    (tmp_path / "a.jpg").write_bytes(_jpeg(3))
    wait_until(lambda: _old_enough(tmp_path / "a.jpg"), 5, interval=0.01, what="ctime to age")
    ra = ReadAhead(limit=10, reading_max=4, arrays_max=8)
    with ThreadPoolExecutor(2) as pool:
        _read_ahead_one(ra, pool, tmp_path, "a.jpg")
    entries = ra.unclassified(32)
    ra.classified(entries, default_classifier.predict(np.stack([e.array for e in entries])), "old@123")
    assert ra.take(observe(tmp_path, "a.jpg"), default_classifier.identity) is None
    assert ra.wasted == 1


def test_file_rewritten_with_same_size_and_mtime_is_not_taken_for_the_one_read(tmp_path: Path) -> None:
    first, second = _same_size_pair()
    p = tmp_path / "a.jpg"
    p.write_bytes(first)
    wait_until(lambda: _old_enough(p), 5, interval=0.01, what="ctime to age")
    ra = ReadAhead(limit=10, reading_max=4, arrays_max=8)
    with ThreadPoolExecutor(2) as pool:
        _read_ahead_one(ra, pool, tmp_path, "a.jpg")
    st = os.stat(p)
    with open(p, "r+b") as fh:  # in place: same inode, same size
        fh.write(second)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime back, as `cp -p` would
    after = observe(tmp_path, "a.jpg")
    assert after is not None and (after.size, after.mtime_ns, after.ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert ra.take(after, "m") is None
    assert (ra.used, ra.wasted) == (0, 1)


def test_a_file_that_changes_after_its_read_is_not_read_ahead_again(tmp_path: Path) -> None:
    p = tmp_path / "slow.jpg"
    p.write_bytes(_jpeg(4)[:500])
    wait_until(lambda: _old_enough(p), 5, interval=0.01, what="ctime to age")
    ra = ReadAhead(limit=10, reading_max=4, arrays_max=8)
    with ThreadPoolExecutor(2) as pool:
        _read_ahead_one(ra, pool, tmp_path, "slow.jpg")
    assert len(ra) == 1  # a truncated JPEG: its rejection is a result too
    with open(p, "ab") as fh:
        fh.write(b"more")
    changed = observe(tmp_path, "slow.jpg")
    assert changed is not None
    assert not ra.wanted(changed)  # dropped, and a slow writer is left to the claim
    assert len(ra) == 0
    ra.noticed("slow.jpg", 1.0)
    assert ra.due(10.0) is None


def test_read_too_soon_after_a_change_is_dropped(tmp_path: Path) -> None:
    p = tmp_path / "new.jpg"
    p.write_bytes(_jpeg(5))
    ra = ReadAhead(limit=10, reading_max=4, arrays_max=8)
    with ThreadPoolExecutor(2) as pool:
        _read_ahead_one(ra, pool, tmp_path, "new.jpg")  # at once: the ctime is too fresh
    assert len(ra) == 0 and ra.wasted == 1


def test_room_is_bounded_by_the_limit_and_by_arrays_waiting_for_the_model(tmp_path: Path) -> None:
    ra = ReadAhead(limit=3, reading_max=4, arrays_max=2)
    assert ra.room() == 2  # arrays_max
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(10 + i))
    wait_until(lambda: _old_enough(tmp_path / "2.jpg"), 5, interval=0.01, what="ctime to age")
    with ThreadPoolExecutor(2) as pool:
        for i in range(2):
            _read_ahead_one(ra, pool, tmp_path, f"{i}.jpg")
        assert ra.room() == 0  # two arrays wait for the model
        entries = ra.unclassified(32)
        ra.classified(entries, np.full((len(entries), 2), 0.5, dtype=np.float32), "m")
        assert ra.room() == 1  # the limit: 3 files held at most
        _read_ahead_one(ra, pool, tmp_path, "2.jpg")
    assert len(ra) == 3 and ra.room() == 0
    ra.forget("0.jpg")
    ra.retain({"2.jpg"})
    assert len(ra) == 1 and ra.room() == 1  # 2.jpg's array still waits


# ----- the daemon ---------------------------------------------------------------------------------------


def _expected_probs(classifier, data: bytes) -> np.ndarray:
    return classifier.predict(preprocess_bytes(data)[None])[0]


def test_daemon_sorts_from_the_read_ahead_with_each_file_its_own_answer(tmp_path: Path, default_classifier) -> None:
    stage = tmp_path / "stage"
    (stage / "dump").mkdir(parents=True)
    photos = {f"IMG_{i:02d}.jpg": _jpeg(100 + i, (160 + 8 * i, 100)) for i in range(12)}
    for name, data in photos.items():
        (stage / "dump" / name).write_bytes(data)
    d = Daemon(tmp_path, settings={"settle_seconds": 2.0, "log_level": "debug"}).start()
    try:
        # A folder moved in: its files are found by a scan, with no "done" signal of their own,
        # so the full settle applies to each (a photo renamed in by itself would need 0.1 s).
        os.rename(stage / "dump", d.inbox / "dump")
        rows = wait_until(lambda: len(d.rows()) == len(photos) and d.rows(), 60, what="12 rows")
    finally:
        assert d.terminate() == 0
    assert d.events("read ahead"), "nothing was classified ahead"
    assert sum(e["read_ahead"] for e in d.events("batch")) == len(photos)
    for row in rows:
        data = photos[Path(row["source"]).name]
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert (d.output / row["destination"]).read_bytes() == data
        expected = _expected_probs(default_classifier, data)
        assert float(row["p_mountain"]) == pytest.approx(float(expected[0]), abs=1e-4), row["source"]
        assert float(row["p_road"]) == pytest.approx(float(expected[1]), abs=1e-4), row["source"]


def test_daemon_reads_again_a_file_rewritten_in_place_after_its_read_ahead(tmp_path: Path,
                                                                         default_classifier) -> None:
    first, second = _same_size_pair()
    assert not np.allclose(_expected_probs(default_classifier, first), _expected_probs(default_classifier, second))
    stage = tmp_path / "stage"
    (stage / "dump").mkdir(parents=True)
    (stage / "dump" / "a.jpg").write_bytes(first)
    d = Daemon(tmp_path, settings={"settle_seconds": 3.0, "log_level": "debug"}).start()
    try:
        os.rename(stage / "dump", d.inbox / "dump")  # found by a scan: the full settle, read ahead meanwhile
        wait_until(lambda: d.events("read ahead"), 20, what="the photo classified ahead")
        target = d.inbox / "dump" / "a.jpg"
        st = os.stat(target)
        with open(target, "r+b") as fh:
            fh.write(second)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as they were
        rows = wait_until(lambda: d.rows(), 30, what="the row")
    finally:
        assert d.terminate() == 0
    (row,) = rows
    assert row["sha256"] == hashlib.sha256(second).hexdigest()
    assert (d.output / row["destination"]).read_bytes() == second
    expected = _expected_probs(default_classifier, second)
    assert float(row["p_mountain"]) == pytest.approx(float(expected[0]), abs=1e-4)
    (batch,) = d.events("batch")
    assert batch["read_ahead"] == 0
    (stopped,) = d.events("stopped")
    assert stopped["read_ahead_wasted"] >= 1
