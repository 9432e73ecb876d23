"""Claim-then-deliver and crash recovery (bikewatch.store: claim, deliver, recovery) without the model.

Journals are fabricated by hand in the states a crash can leave them in, and
:func:`finish_batch` / :func:`recover_dir` must finish the batch: every file placed
or back in the inbox, exactly one CSV row per placed file, nothing overwritten.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import pytest

from bikewatch.files import sha256_file
from bikewatch.store.claim import claim, return_to_inbox
from bikewatch.store.deliver import BatchOutcome, DeliveryError, deliver_decided, finish_batch, free_name, row_for
from bikewatch.store.journal import PHASE_CLAIMED, PHASE_DECIDED, Item, Journal, journals, read_journal, write_journal
from bikewatch.store.recovery import recover_dir
from bikewatch.store.workarea import LOCK_NAME, WorkArea
from bikewatch.store.ledger import COLUMNS, Ledger

OLD_NS = 1_400_000_000_987_654_321


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.output = root / "sorted"
        self.inbox.mkdir()
        for label in ("mountain", "road", "rejected"):
            (self.output / label).mkdir(parents=True)
        self.ledger = Ledger(self.output / "classifications.csv")
        self.work = WorkArea(self.inbox / ".bikewatch", "t")

    def put(self, rel: str, data: bytes) -> Path:
        p = self.inbox / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, ns=(OLD_NS, OLD_NS))
        return p

    def rows(self) -> list[dict[str, str]]:
        if not self.ledger.path.exists():
            return []
        with open(self.ledger.path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))

    def finish(self, path: Path, **kw: object):
        return finish_batch(path, self.work.dir, inbox=self.inbox, output=self.output, ledger=self.ledger,
                            digest=sha256_file, **kw)  # type: ignore[arg-type]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.work.close()


Finish = Callable[[Env, Path, Journal], BatchOutcome]


def _by_finish_batch(env: Env, path: Path, _decided: Journal) -> BatchOutcome:
    return env.finish(path, fresh=True)


def _by_deliver_decided(env: Env, path: Path, decided: Journal) -> BatchOutcome:
    return deliver_decided(path, decided, env.work.dir, inbox=env.inbox, output=env.output, ledger=env.ledger,
                           digest=sha256_file)


@pytest.fixture(params=[_by_finish_batch, _by_deliver_decided], ids=["finish_batch", "deliver_decided"])
def finish(request: pytest.FixtureRequest) -> Finish:
    """The two ways a decided batch is finished: the service's fast path, and finish_batch(), which it falls back to."""
    return request.param  # type: ignore[no-any-return]


def claimed_journal(env: Env, sources: list[str], batch: str = "") -> tuple[Journal, Path]:
    batch = batch or env.work.new_batch_id()
    items = tuple(Item(key=f"{batch}.{i:04d}", source=s) for i, s in enumerate(sources))
    journal = Journal(batch=batch, phase=PHASE_CLAIMED, worker="t", model="bikes@test", items=items)
    path = env.work.journal_path(batch)
    return claim(env.inbox, env.work.dir, journal, path), path


def decide(env: Env, journal: Journal, path: Path, labels: dict[str, str]) -> Journal:
    """What the service does after classification: fill in each item and rewrite the journal."""
    items = []
    taken: dict[str, set[str]] = {}
    for item in journal.items:
        work = env.work.dir / item.key
        st = os.lstat(work)
        label = labels[item.source]
        name = free_name(env.output / label, os.path.basename(item.source), taken.setdefault(label, set()))
        taken[label].add(name)
        rejected = label == "rejected"
        items.append(replace(
            item, label=label, p_mountain=None if rejected else 0.8, p_road=None if rejected else 0.2,
            sha256=sha256_file(work) if not os.path.islink(work) else "", size=st.st_size, mtime_ns=st.st_mtime_ns,
            error="not an image" if rejected else "", timestamp="2024-01-01T00:00:00.000+00:00",
            dest=f"{label}/{name}",
        ))
    decided = replace(journal, phase=PHASE_DECIDED, items=tuple(items))
    write_journal(path, decided)
    return decided


# --------------------------------------------------------------------------- claim


def test_claim_moves_files_into_the_work_folder(env: Env) -> None:
    env.put("a.jpg", b"A")
    env.put("DCIM/100CANON/b.jpg", b"B")
    journal, path = claimed_journal(env, ["a.jpg", "DCIM/100CANON/b.jpg", "vanished.jpg"])
    assert [i.source for i in journal.items] == ["a.jpg", "DCIM/100CANON/b.jpg"]
    assert not (env.inbox / "a.jpg").exists() and not (env.inbox / "DCIM/100CANON/b.jpg").exists()
    assert (env.work.dir / journal.items[0].key).read_bytes() == b"A"
    on_disk = read_journal(path)  # written before the renames: lists every attempted item
    assert on_disk.phase == PHASE_CLAIMED and len(on_disk.items) == 3


def test_claim_takes_a_symlink_not_its_target(env: Env, tmp_path: Path) -> None:
    target = tmp_path / "outside.jpg"
    target.write_bytes(b"outside")
    (env.inbox / "link.jpg").symlink_to(target)
    journal, _ = claimed_journal(env, ["link.jpg"])
    assert os.path.islink(env.work.dir / journal.items[0].key)
    assert target.read_bytes() == b"outside"


def test_journal_json_round_trip_with_awkward_names() -> None:
    item = Item(key="k", source=os.fsdecode(b"bad-\xff/\xc3\xbc new\nline.jpg"), label="road", p_mountain=0.25,
                p_road=0.75, dest="road/x.jpg")
    j = Journal(batch="b", phase=PHASE_DECIDED, worker="w", model="m", items=(item,))
    text = j.to_json()
    text.encode("ascii")
    assert Journal.from_json(text) == j
    assert item.confidence == 0.75 and Item(key="k", source="s").confidence is None


# --------------------------------------------------------------------------- finish_batch, the normal path


def test_finish_places_files_and_writes_one_row_each(env: Env, finish: Finish) -> None:
    env.put("a.jpg", b"mountain bytes")
    env.put("DCIM/100CANON/b.jpg", b"road bytes")
    env.put("broken.jpg", b"<html>")
    journal, path = claimed_journal(env, ["a.jpg", "DCIM/100CANON/b.jpg", "broken.jpg"])
    decided = decide(env, journal, path, {"a.jpg": "mountain", "DCIM/100CANON/b.jpg": "road", "broken.jpg": "rejected"})
    res = finish(env, path, decided)
    assert [i.key for i in res.delivered] == [i.key for i in decided.items] and not res.returned
    assert not path.exists()
    assert journals(env.work.dir) == []
    assert (env.output / "mountain" / "a.jpg").read_bytes() == b"mountain bytes"
    assert (env.output / "road" / "b.jpg").read_bytes() == b"road bytes"
    assert (env.output / "rejected" / "broken.jpg").read_bytes() == b"<html>"
    assert os.stat(env.output / "road" / "b.jpg").st_mtime_ns == OLD_NS
    rows = env.rows()
    assert [r["id"] for r in rows] == [i.key for i in decided.items]
    by_src = {r["source"]: r for r in rows}
    a = by_src[str(env.inbox / "a.jpg")]
    assert a["destination"] == str(env.output / "mountain" / "a.jpg")
    assert (a["label"], a["confidence"], a["p_mountain"], a["p_road"]) == ("mountain", "0.800000", "0.800000", "0.200000")
    assert a["sha256"] == sha(b"mountain bytes") and a["model"] == "bikes@test" and a["error"] == ""
    assert a["size_bytes"] == str(len(b"mountain bytes")) and a["worker"] == "t"
    bad = by_src[str(env.inbox / "broken.jpg")]
    assert bad["label"] == "rejected" and bad["error"] == "not an image" and bad["confidence"] == ""
    assert list(rows[0]) == list(COLUMNS)


def test_finish_never_overwrites_a_name_taken_after_the_decision(env: Env, finish: Finish) -> None:
    env.put("IMG_0001.jpg", b"new")
    env.put("IMG_0002.jpg", b"second")
    journal, path = claimed_journal(env, ["IMG_0001.jpg", "IMG_0002.jpg"])
    decided = decide(env, journal, path, {"IMG_0001.jpg": "road", "IMG_0002.jpg": "road"})
    (env.output / "road" / "IMG_0001.jpg").write_bytes(b"arrived meanwhile")
    res = finish(env, path, decided)
    assert (env.output / "road" / "IMG_0002.jpg").read_bytes() == b"second"
    assert len(env.rows()) == 2 and not path.exists()
    assert (env.output / "road" / "IMG_0001.jpg").read_bytes() == b"arrived meanwhile"
    assert (env.output / "road" / "IMG_0001 (1).jpg").read_bytes() == b"new"
    assert res.delivered[0].dest == "road/IMG_0001 (1).jpg"
    assert env.rows()[0]["destination"] == str(env.output / "road" / "IMG_0001 (1).jpg")


def test_a_missing_label_folder_is_made_again(env: Env, finish: Finish) -> None:
    env.put("a.jpg", b"A")
    journal, path = claimed_journal(env, ["a.jpg"])
    decided = decide(env, journal, path, {"a.jpg": "road"})
    shutil.rmtree(env.output / "road")  # a user tidying up the output while the batch was classified
    finish(env, path, decided)
    assert (env.output / "road" / "a.jpg").read_bytes() == b"A"
    assert [r["destination"] for r in env.rows()] == [str(env.output / "road" / "a.jpg")]


def test_a_work_file_gone_before_delivery_counts_as_placed_as_in_recovery(env: Env, finish: Finish) -> None:
    env.put("a.jpg", b"A")
    env.put("b.jpg", b"B")
    journal, path = claimed_journal(env, ["a.jpg", "b.jpg"])
    decided = decide(env, journal, path, {"a.jpg": "road", "b.jpg": "mountain"})
    os.rename(env.work.dir / decided.items[0].key, env.output / "road" / "a.jpg")  # as a crash after its rename
    res = finish(env, path, decided)
    assert [i.key for i in res.delivered] == [i.key for i in decided.items]
    assert (env.output / "mountain" / "b.jpg").read_bytes() == b"B"
    assert sorted(r["id"] for r in env.rows()) == sorted(i.key for i in decided.items)


def test_deliver_decided_copies_across_filesystems(env: Env, tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than tmp_path's")
    output = Path(tempfile.mkdtemp(prefix="bikewatch-test-", dir=shm))
    try:
        env.put("a.jpg", b"A" * 1000)
        journal, path = claimed_journal(env, ["a.jpg"])
        env.output = output
        decided = decide(env, journal, path, {"a.jpg": "road"})
        res = _by_deliver_decided(env, path, decided)
        assert (output / "road" / "a.jpg").read_bytes() == b"A" * 1000
        assert os.stat(output / "road" / "a.jpg").st_mtime_ns == OLD_NS
        assert [i.key for i in res.delivered] == [decided.items[0].key]
        assert os.listdir(output / "road") == ["a.jpg"]  # no partial copy left beside it
        assert not os.path.lexists(env.work.dir / decided.items[0].key) and not path.exists()
    finally:
        shutil.rmtree(output)


def test_free_name_skips_names_on_disk_and_taken_in_the_batch(env: Env) -> None:
    (env.output / "road" / "x.jpg").write_bytes(b"")
    assert free_name(env.output / "road", "x.jpg", set()) == "x (1).jpg"
    assert free_name(env.output / "road", "x.jpg", {"x (1).jpg"}) == "x (2).jpg"
    (env.output / "road" / "dangling.jpg").symlink_to(env.root / "nowhere")
    assert free_name(env.output / "road", "dangling.jpg", set()) == "dangling (1).jpg"


def test_finish_of_a_claimed_journal_returns_files_to_the_inbox(env: Env) -> None:
    env.put("a.jpg", b"A")
    env.put("DCIM/100CANON/b.jpg", b"B")
    journal, path = claimed_journal(env, ["a.jpg", "DCIM/100CANON/b.jpg"])
    shutil.rmtree(env.inbox / "DCIM")  # the user tidied up meanwhile
    env.put("a.jpg", b"a new file with the same name")
    seen: list[tuple[str, str]] = []
    res = env.finish(path, on_return=lambda item, why: seen.append((item.source, why)))
    assert [i.source for i in res.returned] == ["a.jpg", "DCIM/100CANON/b.jpg"] and not res.delivered
    assert (env.inbox / "a.jpg").read_bytes() == b"a new file with the same name"
    assert (env.inbox / "a (1).jpg").read_bytes() == b"A"
    assert (env.inbox / "DCIM/100CANON/b.jpg").read_bytes() == b"B"
    assert os.stat(env.inbox / "a (1).jpg").st_mtime_ns == OLD_NS
    assert [s for s, _ in seen] == ["a.jpg", "DCIM/100CANON/b.jpg"]
    assert not path.exists() and env.rows() == []


def test_finish_raises_delivery_error_when_a_label_folder_is_a_file(env: Env, finish: Finish) -> None:
    env.put("a.jpg", b"A")
    journal, path = claimed_journal(env, ["a.jpg"])
    decided = decide(env, journal, path, {"a.jpg": "road"})
    shutil.rmtree(env.output / "road")
    (env.output / "road").write_bytes(b"not a folder")
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(_catch(lambda: finish(env, path, decided))), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "finish_batch() loops forever when OUTPUT/road is a file"
    assert isinstance(result[0], DeliveryError)
    assert path.exists()  # the journal stays for a retry
    assert (env.work.dir / journal.items[0].key).read_bytes() == b"A"


def _catch(fn):
    try:
        return fn()
    except Exception as exc:
        return exc


@pytest.fixture
def read_only_output(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "bikewatch-ro", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs: {res.stderr.strip() or res.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_unusable_output_then_return_to_inbox_then_finish_later(env: Env, read_only_output: Path) -> None:
    env.put("a.jpg", b"A")
    env.put("b.jpg", b"B")
    env.put("c.jpg", b"C")
    journal, path = claimed_journal(env, ["a.jpg", "b.jpg", "c.jpg"])
    decided = decide(env, journal, path, {"a.jpg": "road", "b.jpg": "road", "c.jpg": "mountain"})
    # a.jpg was placed before the output went away (its row not yet written).
    os.rename(env.work.dir / decided.items[0].key, env.output / "road" / "a.jpg")
    with pytest.raises(DeliveryError):
        finish_batch(path, env.work.dir, inbox=env.inbox, output=read_only_output, ledger=env.ledger, fresh=True,
               digest=sha256_file)
    assert path.exists()
    returned = return_to_inbox(path, env.work.dir, inbox=env.inbox)
    assert sorted(i.source for i in returned) == ["b.jpg", "c.jpg"]
    assert (env.inbox / "b.jpg").read_bytes() == b"B" and (env.inbox / "c.jpg").read_bytes() == b"C"
    assert all(i.back for i in read_journal(path).items if i.source != "a.jpg")
    # Output back: the retry writes a.jpg's row only; b and c are the inbox's again.
    res = env.finish(path)
    assert [i.source for i in res.delivered] == ["a.jpg"]
    assert sorted(i.source for i in res.returned) == ["b.jpg", "c.jpg"]
    assert [r["source"] for r in env.rows()] == [str(env.inbox / "a.jpg")]
    assert (env.inbox / "b.jpg").exists() and not path.exists()


# --------------------------------------------------------------------------- crash states


def test_crash_after_placing_before_the_row_writes_the_row_once(env: Env) -> None:
    env.put("a.jpg", b"A")
    env.put("b.jpg", b"B")
    journal, path = claimed_journal(env, ["a.jpg", "b.jpg"])
    decided = decide(env, journal, path, {"a.jpg": "road", "b.jpg": "mountain"})
    # Crash: a.jpg was already placed (its work file is gone), b.jpg not yet; no rows written.
    os.rename(env.work.dir / decided.items[0].key, env.output / decided.items[0].dest)
    saved = path.read_bytes()
    res = env.finish(path)  # recovery (fresh=False)
    assert sorted(i.source for i in res.delivered) == ["a.jpg", "b.jpg"]
    assert sorted(r["id"] for r in env.rows()) == sorted(i.key for i in decided.items)
    # Crash again before the journal was removed: recovering once more adds nothing.
    path.write_bytes(saved)
    env.finish(path)
    assert len(env.rows()) == 2
    assert (env.output / "road" / "a.jpg").read_bytes() == b"A"
    assert (env.output / "mountain" / "b.jpg").read_bytes() == b"B"
    assert sorted(os.listdir(env.output / "road")) == ["a.jpg"]


def test_finish_batch_twice_is_idempotent(env: Env) -> None:
    env.put("a.jpg", b"A")
    journal, path = claimed_journal(env, ["a.jpg"])
    decide(env, journal, path, {"a.jpg": "road"})
    saved = path.read_bytes()
    env.finish(path, fresh=True)
    before = (env.ledger.path.read_bytes(), sorted(os.listdir(env.output / "road")))
    path.write_bytes(saved)  # as if the process died just before deleting the journal
    res = env.finish(path)
    assert [i.source for i in res.delivered] == ["a.jpg"]
    assert (env.ledger.path.read_bytes(), sorted(os.listdir(env.output / "road"))) == before
    assert not path.exists()


def test_crash_after_link_before_unlink(env: Env) -> None:
    env.put("a.jpg", b"A")
    journal, path = claimed_journal(env, ["a.jpg"])
    decided = decide(env, journal, path, {"a.jpg": "road"})
    os.link(env.work.dir / decided.items[0].key, env.output / "road" / "a.jpg")  # the link() fallback, half done
    env.finish(path)
    assert sorted(os.listdir(env.output / "road")) == ["a.jpg"]
    assert not (env.work.dir / decided.items[0].key).exists()
    assert len(env.rows()) == 1


def test_crash_after_cross_filesystem_copy_before_unlink(env: Env) -> None:
    env.put("a.jpg", b"A" * 5000)
    journal, path = claimed_journal(env, ["a.jpg"])
    decided = decide(env, journal, path, {"a.jpg": "road"})
    shutil.copy2(env.work.dir / decided.items[0].key, env.output / "road" / "a.jpg")  # a finished copy
    env.finish(path)
    assert sorted(os.listdir(env.output / "road")) == ["a.jpg"]  # no "a (1).jpg" duplicate
    assert not (env.work.dir / decided.items[0].key).exists()
    assert len(env.rows()) == 1


def test_crash_mid_copy_removes_the_partial_and_places_again(env: Env) -> None:
    env.put("a.jpg", b"full content")
    journal, path = claimed_journal(env, ["a.jpg"])
    decided = decide(env, journal, path, {"a.jpg": "road"})
    key = decided.items[0].key
    (env.output / "road" / f".bikewatch-{key}.partial").write_bytes(b"full")
    env.finish(path)
    assert sorted(os.listdir(env.output / "road")) == ["a.jpg"]
    assert (env.output / "road" / "a.jpg").read_bytes() == b"full content"
    assert env.rows()[0]["sha256"] == sha(b"full content")


def test_a_different_file_at_the_destination_is_not_mistaken_for_our_copy(env: Env) -> None:
    env.put("a.jpg", b"ours")
    journal, path = claimed_journal(env, ["a.jpg"])
    decide(env, journal, path, {"a.jpg": "road"})
    other = env.output / "road" / "a.jpg"
    other.write_bytes(b"else")  # same size, but different bytes
    os.utime(other, ns=(OLD_NS, OLD_NS))
    env.finish(path)
    assert other.read_bytes() == b"else"
    assert (env.output / "road" / "a (1).jpg").read_bytes() == b"ours"


# --------------------------------------------------------------------------- dead workers


def dead_worker_dir(env: Env, name: str = "old-123-abcdef") -> Path:
    d = env.work.root / name
    d.mkdir()
    (d / LOCK_NAME).write_bytes(b"")  # its lock is free: the worker is gone
    return d


def test_orphaned_dirs_are_only_dead_workers(env: Env) -> None:
    dead = dead_worker_dir(env)
    alive = WorkArea(env.inbox / ".bikewatch", "other")
    try:
        # Taken over by a rename into our own folder before anything in it is touched.
        assert list(env.work.orphaned_dirs()) == [env.work.dir / f"adopted-{dead.name}"]
        assert not dead.exists() and alive.dir.is_dir()
        # Not recovered yet (say the output was full): it comes first again at the next try.
        assert list(env.work.orphaned_dirs()) == [env.work.dir / f"adopted-{dead.name}"]
    finally:
        alive.close()
    assert not alive.dir.exists()  # an empty work folder is removed on close


def test_recover_dir_finishes_everything_a_dead_worker_left(env: Env) -> None:
    dead = dead_worker_dir(env)
    for name, data in [("a.jpg", b"A"), ("b.jpg", b"B"), ("DCIM/c.jpg", b"C"), ("d.jpg", b"D")]:
        env.put(name, data)

    # Batch 1 decided; a.jpg already placed, b.jpg not; no rows yet.
    items1 = (Item(key="old.1.0000", source="a.jpg"), Item(key="old.1.0001", source="b.jpg"))
    j1 = Journal(batch="old.1", phase=PHASE_CLAIMED, worker="old", model="bikes@old", items=items1)
    p1 = dead / "old.1.json"
    j1 = claim(env.inbox, dead, j1, p1)
    j1 = replace(j1, phase=PHASE_DECIDED, items=tuple(
        replace(it, label="road", p_mountain=0.1, p_road=0.9, sha256=sha(data), size=1, mtime_ns=OLD_NS,
                timestamp="2024-01-01T00:00:00.000+00:00", dest=f"road/{it.source}")
        for it, data in zip(j1.items, (b"A", b"B"))))
    write_journal(p1, j1)
    os.rename(dead / "old.1.0000", env.output / "road" / "a.jpg")

    # Batch 2 only claimed: its files go back to the inbox.
    j2 = Journal(batch="old.2", phase=PHASE_CLAIMED, worker="old", items=(Item(key="old.2.0000", source="DCIM/c.jpg"),))
    claim(env.inbox, dead, j2, dead / "old.2.json")
    # A journal rewrite that never completed, and a stray file no journal names.
    (dead / "old.3.json.tmp").write_text("{trunc")
    os.rename(env.inbox / "d.jpg", dead / "stray")

    returned: list[str] = []
    res = recover_dir(dead, inbox=env.inbox, output=env.output, ledger=env.ledger, digest=sha256_file,
                      on_return=lambda item, why: returned.append(item.source))
    assert sorted(i.source for i in res.delivered) == ["a.jpg", "b.jpg"]
    assert sorted(i.source for i in res.returned) == ["DCIM/c.jpg", "recovered-stray"]
    assert returned == ["DCIM/c.jpg"]
    assert (env.output / "road" / "a.jpg").read_bytes() == b"A"
    assert (env.output / "road" / "b.jpg").read_bytes() == b"B"
    assert (env.inbox / "DCIM" / "c.jpg").read_bytes() == b"C"
    assert (env.inbox / "recovered-stray").read_bytes() == b"D"
    rows = env.rows()
    assert sorted(r["id"] for r in rows) == ["old.1.0000", "old.1.0001"]
    assert {r["worker"] for r in rows} == {"old"} and {r["model"] for r in rows} == {"bikes@old"}
    assert not dead.exists()


def test_work_area_lock_is_held_for_its_life(env: Env) -> None:
    fd = os.open(env.work.dir / LOCK_NAME, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    b1, b2 = env.work.new_batch_id(), env.work.new_batch_id()
    assert b1 != b2 and b1.startswith(env.work.name)


def test_work_area_close_keeps_a_folder_with_leftovers(env: Env) -> None:
    wa = WorkArea(env.inbox / ".bikewatch", "x")
    (wa.dir / "x.json").write_text("{}")
    wa.close()
    assert (wa.dir / "x.json").exists()


def test_row_for_uses_absolute_paths(env: Env) -> None:
    item = Item(key="k", source="DCIM/a.jpg", label="rejected", error="empty file", dest="rejected/a.jpg",
                timestamp="t", size=0)
    r = row_for(item, inbox=env.inbox, output=env.output, model="m", worker="w")
    assert r.source == str(env.inbox / "DCIM/a.jpg") and r.destination == str(env.output / "rejected/a.jpg")
    assert (r.confidence, r.p_mountain, r.p_road, r.size_bytes) == ("", "", "", "0")


def test_lock_staleness_trusts_pids_here_and_heartbeats_elsewhere() -> None:
    from bikewatch.store.workarea import lock_is_stale

    me = f"thishost {os.getpid()}"
    assert not lock_is_stale(me, 0.0, host="thishost", now=1e9, stale_after=120)  # alive, however old
    assert lock_is_stale("thishost 999999999", 1e9, host="thishost", now=1e9, stale_after=120)  # no such pid
    # Another machine: a free lock is not enough (NFS 'nolock'), only an old heartbeat is.
    assert not lock_is_stale("otherhost 1", 1000.0, host="thishost", now=1100.0, stale_after=120)
    assert lock_is_stale("otherhost 1", 1000.0, host="thishost", now=1121.0, stale_after=120)
    assert lock_is_stale("", 1000.0, host="thishost", now=1000.0, stale_after=120)


def test_a_new_work_area_is_never_visible_unlocked(tmp_path: Path) -> None:

    first = WorkArea(tmp_path, "w1")
    second = WorkArea(tmp_path, "w2")
    try:
        assert first.dir.is_dir() and second.dir.is_dir()
        assert (first.dir / "lock").read_text().split()[1] == str(os.getpid())
        assert list(second.orphaned_dirs()) == []  # first is alive (same host, live pid, locked)
        assert not [p for p in (tmp_path / "work").iterdir() if p.name.startswith(".new-")]
    finally:
        first.close()
        second.close()


def test_own_retired_work_folder_is_recovered_though_its_lock_names_a_live_pid(tmp_path: Path) -> None:
    """A folder this process used before its inbox's filesystem went away and came back."""
    first = WorkArea(tmp_path / ".bikewatch", "w")
    (first.dir / "b1.json").write_text("{}")  # a batch that was in flight when it vanished
    first.close()  # the service closes it when it starts a new one
    assert first.dir.is_dir()
    second = WorkArea(tmp_path / ".bikewatch", "w")
    try:
        assert (first.dir / LOCK_NAME).read_text().split()[1] == str(os.getpid())  # ours: alive
        assert list(second.orphaned_dirs()) == []
        assert list(second.orphaned_dirs(retired={second.name})) == []  # never our current one
        assert list(second.orphaned_dirs(retired={first.name})) == [second.dir / f"adopted-{first.name}"]
    finally:
        second.close()
