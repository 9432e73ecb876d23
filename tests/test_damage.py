"""Damaged state never stops the service, and never costs a photo.

Every file bikewatch reads back from its own state may be damaged: a failing disk, a full
disk during a write, a share that does not honour ``fsync``. Batch journals empty, cut off
mid-JSON, garbage, or of the wrong shape; status files of dead workers; a lock file that is
garbage or a folder; a CSV whose tail is torn or NULs. Each kind is put on disk for real and
met at start-up and at a rescan: the journal is quarantined (never deleted) with one error
naming it, its photos go back to the inbox or stay delivered, each with exactly one CSV row.
"""

from __future__ import annotations

import collections
import hashlib
import os
import shutil
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from bikewatch.files import sha256_file
from bikewatch.store.claim import claim
from bikewatch.store.journal import PHASE_CLAIMED, Item, Journal, JournalDamaged, read_journal, write_journal
from bikewatch.store.recovery import recover_dir
from bikewatch.store.workarea import LOCK_NAME, WorkArea
from bikewatch.store.ledger import Ledger
from harness import Daemon, read_csv, wait_until
from journals import decided_by_hand
from photos import check_nothing_lost, hash_multiset, move_in, photo_bytes, work_leftovers, write_photos

QUARANTINED = "damaged batch journal moved to quarantine; its photos are kept"
FAST = {"settle_seconds": 0.2, "closed_settle_seconds": 0.05, "max_wait_ms": 20, "rescan_seconds": 1.0,
        "decode_workers": 1}


def _cut(text: bytes) -> bytes:
    """Cut off in the middle of the third item, as a full disk would leave it."""
    at = [i for i in range(len(text)) if text.startswith(b'{"key":', i)][2]
    return text[: at + 20]


DAMAGE = {
    "empty": lambda text: b"",
    "cut-off": _cut,
    "garbage": lambda text: bytes(range(256)) * 3,
    "nuls": lambda text: b"\0" * len(text),  # a power cut after the size, before the data
    "wrong-shape": lambda text: b'{"batch": 1, "items": "none"}',
    "escaping-path": lambda text: text.replace(b'"source":"', b'"source":"../../', 1),
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dead_folder(state: Path, name: str, inbox: Path, batches: dict[str, dict[str, bytes]],
                *, phase: str = PHASE_CLAIMED) -> Path:
    """A work folder of a dead worker on this host, one claimed journal per entry of ``batches``."""
    folder = state / "work" / f"{name}-999999999-dddddd"
    folder.mkdir(parents=True)
    (folder / LOCK_NAME).write_text(f"{socket.gethostname()} 999999999")  # no such pid: provably dead
    for n, photos in enumerate(batches.values(), 1):
        for rel, data in photos.items():
            (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
            (inbox / rel).write_bytes(data)
        batch = f"{folder.name}.{n:08d}"
        items = tuple(Item(key=f"{batch}.{i:04d}", source=rel) for i, rel in enumerate(photos))
        claim(inbox, folder, Journal(batch=batch, phase=phase, worker=name, model="m@1", items=items),
              folder / f"{batch}.json")
    return folder


def damage(folder: Path, kinds: list[str]) -> list[Path]:
    """Damage the folder's journals in turn, one kind each; returns the damaged paths."""
    paths = sorted(folder.glob("*.json"))
    for path, kind in zip(paths, kinds):
        path.write_bytes(DAMAGE[kind](path.read_bytes()))
    return paths[: len(kinds)]


class Env:
    def __init__(self, root: Path) -> None:
        self.inbox, self.output = root / "inbox", root / "sorted"
        self.inbox.mkdir()
        for label in ("mountain", "road", "rejected"):
            (self.output / label).mkdir(parents=True)
        self.state = self.inbox / ".bikewatch"
        self.ledger = Ledger(self.output / "classifications.csv")
        self.work = WorkArea(self.state, "live")

    def recover(self):
        out = []
        for folder in self.work.orphaned_dirs():
            out.append(recover_dir(folder, inbox=self.inbox, output=self.output, ledger=self.ledger,
                                   digest=sha256_file))
        return out


@pytest.fixture
def env(tmp_path: Path):
    e = Env(tmp_path)
    yield e
    e.work.close()


def photos(prefix: str, n: int, seed: int = 0) -> dict[str, bytes]:
    return {f"{prefix}{i}.jpg": photo_bytes(i, seed=seed) for i in range(n)}


@pytest.mark.parametrize("kind", sorted(DAMAGE) + ["folder"])
def test_a_damaged_journal_is_quarantined_and_its_files_go_back(env: Env, kind: str) -> None:
    batch = photos("P", 5, seed=hash(kind) % 1000)
    folder = dead_folder(env.state, "dead", env.inbox, {"b": batch})
    (journal,) = folder.glob("*.json")
    original = journal.read_bytes()
    if kind == "folder":
        journal.unlink()
        journal.mkdir()
    else:
        damage(folder, [kind])
        with pytest.raises(JournalDamaged):
            read_journal(journal)
    (res,) = env.recover()
    assert not folder.exists() and not work_leftovers(env.inbox)
    assert len(res.quarantined) == 1 and res.quarantined[0][0] == str(journal)
    moved = Path(res.quarantined[0][1])
    assert moved.parent == env.state / "quarantine" and os.path.lexists(moved)
    if kind != "folder":
        assert moved.read_bytes() == DAMAGE[kind](original), "the damaged journal is kept as it was"
    back = {p.relative_to(env.inbox).as_posix(): p.read_bytes() for p in env.inbox.rglob("*.jpg*")
            if ".bikewatch" not in p.parts}
    back.update({p.name: p.read_bytes() for p in env.inbox.glob("recovered-*")})
    assert sorted(map(sha, back.values())) == sorted(map(sha, batch.values())), "a photo was lost"
    named = {rel for rel in back if not rel.startswith("recovered-")}
    if kind == "cut-off":
        assert named == {"P0.jpg", "P1.jpg"}, "the items still whole keep their names"
    if kind == "escaping-path":
        assert not any(p.exists() for p in (env.inbox.parent.parent / "P0.jpg",)), "a path left the inbox"
    assert env.ledger.path.exists() is False, "nothing was delivered, so nothing is recorded"


def test_a_cut_off_decided_journal_finishes_the_whole_items_as_decided(env: Env) -> None:
    batch = photos("D", 4)
    folder = dead_folder(env.state, "dead", env.inbox, {"b": batch})
    (path,) = folder.glob("*.json")
    j = read_journal(path)
    j = decided_by_hand(j, folder, "mountain")
    write_journal(path, j)
    os.rename(folder / j.items[0].key, env.output / "mountain" / "D0.jpg")  # placed before the crash, no row
    damage(folder, ["cut-off"])
    (res,) = env.recover()
    rows = read_csv(env.ledger.path)
    assert sorted(r["id"] for r in rows) == [j.items[0].key, j.items[1].key]
    assert {r["label"] for r in rows} == {"mountain"} and {r["p_mountain"] for r in rows} == {"0.900000"}
    assert sorted(p.name for p in env.inbox.glob("recovered-*")) == [f"recovered-{it.key}" for it in j.items[2:]]
    inputs = collections.Counter(map(sha, batch.values()))
    check_nothing_lost(inputs, env.inbox, env.output, rows)
    assert len(res.quarantined) == 1


def test_a_finished_copy_across_filesystems_is_kept_and_recorded_once(env: Env, tmp_path: Path) -> None:
    """Copy done, source not yet removed, journal garbage: the output's copy stands, the work file goes."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no /dev/shm on another filesystem than the test folder")
    other = Path(tempfile.mkdtemp(dir=shm))
    try:
        env.output = other / "sorted"
        for label in ("mountain", "road", "rejected"):
            (env.output / label).mkdir(parents=True)
        env.ledger = Ledger(env.output / "classifications.csv")
        batch = photos("X", 3)
        folder = dead_folder(env.state, "dead", env.inbox, {"b": batch})
        (path,) = folder.glob("*.json")
        first = sorted(p for p in folder.iterdir() if p.name.endswith(".0000"))[0]
        shutil.copy2(first, env.output / "road" / "X0.jpg")  # bytes and mtime, as place() copies
        damage(folder, ["garbage"])
        (res,) = env.recover()
        rows = read_csv(env.ledger.path)
        assert [(r["id"], r["label"]) for r in rows] == [(first.name, "road")]
        assert [i.dest for i in res.delivered] == ["road/X0.jpg"]
        assert not first.exists() and len(list(env.inbox.glob("recovered-*"))) == 2
        check_nothing_lost(collections.Counter(map(sha, batch.values())), env.inbox, env.output, rows)
        # A second photo with the same bytes already recorded elsewhere is not mistaken for it.
        assert env.ledger.present([first.name]) == {first.name}
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_a_lock_that_is_a_folder_is_judged_by_its_age(env: Env) -> None:
    batch = photos("L", 2)
    folder = dead_folder(env.state, "dead", env.inbox, {"b": batch})
    (folder / LOCK_NAME).unlink()
    (folder / LOCK_NAME).mkdir()  # nobody can open, let alone lock, this
    assert env.recover() == [], "a fresh folder without a usable lock may still be in use"
    os.utime(folder, (time.time() - 3600,) * 2)
    (res,) = env.recover()
    assert sorted(i.source for i in res.returned) == sorted(batch)
    assert sorted(p.name for p in env.inbox.glob("*.jpg")) == sorted(batch)


def test_csv_ids_are_found_through_damage_elsewhere_in_the_file(tmp_path: Path) -> None:
    from bikewatch.store.ledger import Row

    ledger = Ledger(tmp_path / "log.csv")
    row = Row(*(["x"] * 11), id="w-1-abc.00000001.0000", worker="w,with \"comma\"")  # type: ignore[misc]
    ledger.append([row])
    with open(ledger.path, "ab") as fh:
        fh.write(b'"unbalanced quote, then NULs\0\0\0\r\n')
    ledger.append([replace(row, id="w-1-abc.00000001.0001")])
    assert ledger.present(["w-1-abc.00000001.0000", "w-1-abc.00000001.0001", "w-1-abc.00000001.000"]) == {
        "w-1-abc.00000001.0000", "w-1-abc.00000001.0001"}
    assert ledger.row("w-1-abc.00000001.0001")["worker"] == 'w,with "comma"'  # type: ignore[index]


# --------------------------------------------------------------------------- real daemons


KINDS = ["empty", "cut-off", "garbage", "nuls", "wrong-shape", "escaping-path"]


def _damaged_site(d: Daemon) -> tuple[Path, list[Path], collections.Counter[str]]:
    """A dead worker's folder with one journal per kind of damage, 4 photos each; its status file garbage."""
    batches = {k: {f"{k}/{i}.jpg": photo_bytes(i, seed=n + 1) for i in range(4)} for n, k in enumerate(KINDS)}
    state = d.inbox / ".bikewatch"
    # Built aside (its photos claimed from a staging inbox on the same filesystem, so that the
    # running daemon cannot take them first), then renamed in at once: a rescan sees it whole.
    stage, stage_inbox = d.root / "deadstage", d.root / "deadinbox"
    stage_inbox.mkdir()
    folder = dead_folder(stage, "dead", stage_inbox, batches)
    damaged = damage(folder, KINDS)
    # Its lock garbage (so only its age tells), its status file garbage: neither may stop anything.
    (folder / LOCK_NAME).write_bytes(b"\xff\xfe" + socket.gethostname().encode() + b" 999999999")
    os.utime(folder / LOCK_NAME, (time.time() - 3600,) * 2)
    (state / "status").mkdir(parents=True, exist_ok=True)
    (state / "status" / f"{folder.name}.json").write_bytes(b'{"worker": "dead", "pid": 9')
    # A status file of a worker whose folder went long ago (garbage, too): swept, not kept for ever.
    gone = state / "status" / "gone-1-zzzzzz.json"
    gone.write_bytes(b"\0" * 40)
    os.utime(gone, (time.time() - 3600,) * 2)
    (state / "work").mkdir(parents=True, exist_ok=True)
    final = state / "work" / folder.name
    os.rename(folder, final)
    inputs = collections.Counter(sha(data) for b in batches.values() for data in b.values())
    return final, [final / p.name for p in damaged], inputs


def _check(d: Daemon, folder: Path, damaged: list[Path], inputs: collections.Counter[str]) -> None:
    total = sum(inputs.values())
    wait_until(lambda: len(d.rows()) >= total and not [p for p in d.inbox.rglob("*.jpg") if ".bikewatch" not in p.parts]
               and not any(d.inbox.glob("recovered-*")), 90, interval=0.2, what=f"{total} rows")
    errors = [e for e in d.events(QUARANTINED) if e.get("level") == "error"]
    assert sorted(e["journal"] for e in errors) == sorted(map(str, damaged)), "one error per damaged journal"
    assert d.proc is not None and d.proc.poll() is None, "the service stopped"
    assert d.terminate() == 0
    rows = d.rows()
    places = check_nothing_lost(inputs, d.inbox, d.output, rows)
    assert places["inbox"] == 0 and len(rows) == total
    quarantine = d.inbox / ".bikewatch" / "quarantine"
    assert len(list(quarantine.iterdir())) == len(damaged)
    assert not folder.exists() and not work_leftovers(d.inbox)
    assert not (d.inbox / ".bikewatch" / "status" / f"{folder.name}.json").exists(), "dead status file left"
    assert not (d.inbox / ".bikewatch" / "status" / "gone-1-zzzzzz.json").exists(), "orphan status file left"


def test_damaged_journals_at_start_up(tmp_path: Path, daemons: list[Daemon]) -> None:
    d = Daemon(tmp_path, settings=FAST)
    daemons.append(d)
    folder, damaged, inputs = _damaged_site(d)
    # The CSV's header torn, then NULs, as a power cut leaves it: trimmed, written again.
    d.output.mkdir()
    d.log_path.write_bytes(b"timestamp,source,destin" + b"\0" * 100)
    d.start()
    _check(d, folder, damaged, inputs)


def test_damaged_journals_found_at_a_rescan(tmp_path: Path, daemons: list[Daemon]) -> None:
    d = Daemon(tmp_path, settings=FAST).start()
    daemons.append(d)
    first = {f"first{i}.jpg": photo_bytes(i, seed=99) for i in range(3)}
    for rel, data in first.items():
        (tmp_path / rel).write_bytes(data)
        os.rename(tmp_path / rel, d.inbox / rel)
    wait_until(lambda: len(d.rows()) == 3, 30, what="3 rows")
    folder, damaged, inputs = _damaged_site(d)
    _check(d, folder, damaged, inputs + collections.Counter(map(sha, first.values())))


def test_kill_mid_dump_then_damage_every_journal_left(tmp_path: Path, daemons: list[Daemon]) -> None:
    """The issue's case: kill -9 in a dump, leave the journals empty and cut off; the restart finishes."""
    d = Daemon(tmp_path, settings={**FAST, "max_batch": 8, "decode_workers": 2})
    daemons.append(d)
    write_photos(tmp_path / "stage", 200)
    inputs = hash_multiset((tmp_path / "stage").iterdir())
    d.start()
    move_in(tmp_path / "stage", d.inbox)
    damaged: list[Path] = []
    for _attempt in range(5):
        target = len(d.rows()) + 16
        wait_until(lambda: len(d.rows()) >= target or len(d.rows()) >= 200, 60, interval=0.002, what="rows")
        d.kill()
        left = sorted((d.inbox / ".bikewatch" / "work").glob("*/*.json"))
        if left:
            for n, path in enumerate(left):
                data = path.read_bytes()
                path.write_bytes(b"" if n % 2 == 0 else data[: len(data) // 2])  # empty, cut off mid-JSON
            damaged = left
            break
        d.start()
    assert damaged, "no kill left a journal behind in five tries"
    print("damaged:", [p.name for p in damaged])
    d.start()
    wait_until(lambda: len(d.rows()) >= 200 and not [p for p in d.inbox.rglob("*") if p.is_file()
                                                       and ".bikewatch" not in p.parts], 120, interval=0.2,
               what="200 rows")
    errors = [e for e in d.events(QUARANTINED) if e.get("level") == "error"]
    assert sorted(e["journal"] for e in errors) == sorted(map(str, damaged))
    assert d.terminate() == 0
    places = check_nothing_lost(inputs, d.inbox, d.output, d.rows())
    assert places["inbox"] == 0 and len(d.rows()) == 200
    assert not work_leftovers(d.inbox)
