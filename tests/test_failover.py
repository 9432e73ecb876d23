"""Failover: a worker on another host finishes a dead worker's batches exactly once, in its CSV.

The hosts are real: each daemon runs in its own UTS namespace (``unshare --uts``, as root)
with its own host name, so the live worker cannot ask whether the dead one's pid exists and
goes by the heartbeat alone, as it would across machines. The states a kill can leave,
including the narrow one between the CSV's fsync and the journal's removal, are also put on
disk by hand with the journal's own functions, so that each is tested every run.
"""

from __future__ import annotations

import collections
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from bikewatch.files import sha256_file
from bikewatch.store.failover import locate_ledger, origin
from bikewatch.store.claim import claim
from bikewatch.store.deliver import row_for
from bikewatch.store.journal import PHASE_CLAIMED, Item, Journal, write_journal
from bikewatch.store.recovery import recover_dir
from bikewatch.store.workarea import LOCK_NAME, WorkArea
from bikewatch.store.ledger import Ledger
from harness import Daemon, read_csv, wait_until
from journals import decided_by_hand
from photos import check_nothing_lost, hash_multiset, move_in, photo_bytes, work_leftovers, write_photos

FAST = {"settle_seconds": 0.2, "closed_settle_seconds": 0.05, "max_wait_ms": 20, "rescan_seconds": 1.0,
        "decode_workers": 1}
STALE = 6.0  # seconds; heartbeats every 1.5 s


def uts_available() -> str:
    """'' when ``unshare --uts`` can give a child its own host name here, else why not."""
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    res = subprocess.run(["unshare", "--uts", "sh", "-c", "hostname bikewatch-probe && hostname"],
                         capture_output=True, text=True)
    if res.returncode != 0 or res.stdout.strip() != "bikewatch-probe":
        return f"cannot make a UTS namespace (needs root): {res.stderr.strip() or res.returncode}"
    return ""


def on_host(name: str) -> list[str]:
    """A command prefix that runs the rest under host name ``name``, in the same process (exec)."""
    return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name]


needs_uts = pytest.mark.skipif(bool(uts_available()), reason=uts_available() or "ok")


# --------------------------------------------------------------------------- a dead worker, by hand


class Site:
    """One shared inbox and output; each host writes its own CSV on the share, beside them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inbox, self.output = root / "inbox", root / "sorted"
        self.inbox.mkdir()
        for label in ("mountain", "road", "rejected"):
            (self.output / label).mkdir(parents=True)
        self.work_root = self.inbox / ".bikewatch" / "work"
        self.work_root.mkdir(parents=True)

    def csv(self, host: str) -> Path:
        return self.root / f"{host}.csv"

    def rows(self) -> list[dict[str, str]]:
        return [r for p in sorted(self.root.glob("*.csv")) for r in read_csv(p)]


def dead_worker(site: Site, *, host: str, name: str, photos: dict[str, bytes], stage: str,
                ledger: Path | None = None, batch_no: int = 1) -> tuple[Path, list[Item]]:
    """A work folder as worker ``name`` on ``host`` leaves it when killed at ``stage``.

    ``claimed``: files in the work folder, not classified. ``decided``: journal rewritten
    with destinations, nothing placed. ``placed``: every file in the output, no rows yet.
    ``recorded``: rows appended and fsynced to its CSV, the journal not yet removed.
    """
    ledger = ledger or site.csv(host)
    folder = site.work_root / f"{name}-4242-abcdef"
    folder.mkdir(exist_ok=True)
    (folder / LOCK_NAME).write_text(f"{host} 4242")
    for rel, data in photos.items():
        (site.inbox / rel).write_bytes(data)
    batch = f"{folder.name}.{batch_no:08d}"
    where = origin(site.inbox, ledger, host)
    items = tuple(Item(key=f"{batch}.{i:04d}", source=rel) for i, rel in enumerate(photos))
    path = folder / f"{batch}.json"
    journal = claim(site.inbox, folder, Journal(batch=batch, phase=PHASE_CLAIMED, worker=name, model="m@1",
                                                items=items, **where), path)
    if stage != "claimed":
        journal = decided_by_hand(journal, folder, "road")
        write_journal(path, journal)
    if stage in ("placed", "recorded"):
        for it in journal.items:
            os.rename(folder / it.key, site.output / it.dest)
    if stage == "recorded":
        Ledger(ledger).append([row_for(it, inbox=site.inbox, output=site.output, model=journal.model, worker=name)
                               for it in journal.items])
    old = time.time() - 3600
    os.utime(folder / LOCK_NAME, (old, old))  # its heartbeat stopped an hour ago
    return folder, list(journal.items)


def hashes(photos: dict[str, bytes]) -> collections.Counter[str]:
    return collections.Counter(hashlib.sha256(data).hexdigest() for data in photos.values())


def recover_here(site: Site, ledger: Ledger):
    """What worker alpha's start-up does on this host: take over every dead folder, recover each."""
    work = WorkArea(site.inbox / ".bikewatch", "alpha")
    try:
        return [recover_dir(folder, inbox=site.inbox, output=site.output, ledger=ledger, digest=sha256_file)
                for folder in work.orphaned_dirs()]
    finally:
        work.close()


@pytest.mark.parametrize("stage", ["claimed", "decided", "placed", "recorded"])
def test_another_host_finishes_a_dead_workers_batch_into_its_csv(tmp_path: Path, stage: str) -> None:
    site = Site(tmp_path)
    photos = {f"P{i}.jpg": photo_bytes(i) for i in range(5)}
    inputs = hashes(photos)
    folder, items = dead_worker(site, host="host-b", name="bravo", photos=photos, stage=stage)
    rows_before = len(read_csv(site.csv("host-b")))
    ours = Ledger(site.csv("here"))
    (res,) = recover_here(site, ours)
    assert not folder.exists() and not work_leftovers(site.inbox)
    assert not ours.path.exists(), "the dead worker's rows went into the recovering worker's CSV"
    rows = read_csv(site.csv("host-b"))
    if stage == "claimed":
        assert rows == [] and sorted(p.name for p in site.inbox.iterdir() if p.is_file()) == sorted(photos)
        return
    assert rows_before == (5 if stage == "recorded" else 0)
    assert sorted(r["id"] for r in rows) == sorted(it.key for it in items), "one row per file, in bravo's CSV"
    assert {r["worker"] for r in rows} == {"bravo"}
    assert res.elsewhere and not res.fallback
    places = check_nothing_lost(inputs, site.inbox, site.output, site.rows())
    assert places == {"road": 5, "inbox": 0}


def test_a_csv_on_the_dead_hosts_own_disk_falls_back_to_ours_and_says_so(tmp_path: Path) -> None:
    site = Site(tmp_path)
    # Its CSV was on a filesystem other than the inbox's, not a network one: only it could see it.
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no /dev/shm on another filesystem than the test folder")
    private = Path(tempfile.mkdtemp(dir=shm)) / "bravo.csv"
    try:
        photos = {f"P{i}.jpg": photo_bytes(i) for i in range(3)}
        _folder, items = dead_worker(site, host="host-b", name="bravo", photos=photos, stage="placed",
                                     ledger=private)
        shutil.rmtree(private.parent)  # as seen from here it does not exist at all
        ours = Ledger(site.csv("here"))
        (res,) = recover_here(site, ours)
        assert [b for b, _ in res.fallback] == [items[0].key.rsplit(".", 1)[0]]
        assert "not shared with the inbox" in res.fallback[0][1]
        assert sorted(r["id"] for r in read_csv(ours.path)) == sorted(it.key for it in items)
    finally:
        shutil.rmtree(private.parent, ignore_errors=True)


def test_locate_ledger_translates_through_the_inbox() -> None:
    here = Path("/nonexistent-share/inbox")
    ours = Path("/var/lib/bikewatch/a.csv")
    assert locate_ledger(host="h", ledger="", ledger_rel="", our_host="me", our_inbox=here, our_ledger=ours) == (ours, "")
    assert locate_ledger(host="me", ledger="/x/b.csv", ledger_rel="", our_host="me", our_inbox=here,
                         our_ledger=ours) == (Path("/x/b.csv"), "")  # same host: the path means the same file
    path, why = locate_ledger(host="h", ledger="/mnt/s/sorted/b.csv", ledger_rel="../sorted/b.csv", our_host="me",
                              our_inbox=here, our_ledger=ours)
    assert path == ours and "not at /nonexistent-share/sorted/b.csv" in why  # nothing there from here


def test_two_workers_racing_for_one_dead_folder_never_both_get_it(tmp_path: Path) -> None:
    """Locks are no help across hosts; the rename is: of two takers exactly one wins each folder."""
    site = Site(tmp_path)
    for n in range(40):
        d = site.work_root / f"dead{n}-1-aaaaaa"
        d.mkdir()
        (d / LOCK_NAME).write_text("elsewhere 1")
        os.utime(d / LOCK_NAME, (0, 0))
    a, b = WorkArea(site.inbox / ".bikewatch", "a"), WorkArea(site.inbox / ".bikewatch", "b")
    got: dict[str, list[str]] = {"a": [], "b": []}
    start = threading.Barrier(2)

    def take(name: str, work: WorkArea) -> None:
        start.wait()
        got[name] = [p.name for p in work.orphaned_dirs()]

    threads = [threading.Thread(target=take, args=(n, w)) for n, w in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    both = collections.Counter(got["a"] + got["b"])
    assert len(both) == 40 and max(both.values()) == 1, both
    print("taken over:", {k: len(v) for k, v in got.items()})
    for w in (a, b):
        for p in w.dir.iterdir():
            if p.is_dir():
                (p / LOCK_NAME).unlink()
                p.rmdir()
        w.close()


def test_the_heartbeat_goes_on_while_the_main_loop_is_busy(tmp_path: Path) -> None:
    work = WorkArea(tmp_path, "w", stale_after=0.4)  # a beat every 0.1 s
    lock = work.dir / LOCK_NAME
    os.utime(lock, (0, 0))
    work.beat_in_background()
    try:
        wait_until(lambda: time.time() - lock.stat().st_mtime < 5, 10, what="a heartbeat from the thread")
    finally:
        work.close()
    assert work._beater is not None and not work._beater.is_alive()


# --------------------------------------------------------------------------- real daemons, real host names


def _daemon(site: Site, host: str, daemons: list[Daemon], **extra: object) -> Daemon:
    d = Daemon(site.root, name=host, inbox=site.inbox, output=site.output, wrap=on_host(host),
               settings={**FAST, "log": str(site.csv(host)), "stale_worker_seconds": STALE, **extra})
    daemons.append(d)
    return d


def _inputs(stage: Path, n: int, seed: int = 0, prefix: str = "IMG_") -> collections.Counter[str]:
    write_photos(stage, n, seed=seed, prefix=prefix)
    return hash_multiset(stage.iterdir())


def _one_row_each(site: Site, inputs: collections.Counter[str]) -> dict[str, int]:
    rows = site.rows()
    places = check_nothing_lost(inputs, site.inbox, site.output, rows)
    assert places["inbox"] == 0 and len(rows) == sum(inputs.values()), (places, len(rows))
    by_id = collections.Counter(r["id"] for r in rows)
    assert max(by_id.values()) == 1, "a row in two CSVs"
    return places


@needs_uts
def test_a_live_host_finishes_a_batch_killed_between_csv_fsync_and_journal_removal(
        tmp_path: Path, daemons: list[Daemon]) -> None:
    """The issue's 632-rows-for-600 case: bravo's rows are fsynced in bravo.csv, its journal is still there."""
    site = Site(tmp_path)
    photos = {f"B{i:02d}.jpg": photo_bytes(500 + i) for i in range(32)}
    inputs = hashes(photos)
    folder, items = dead_worker(site, host="host-b", name="bravo", photos=photos, stage="recorded")
    (site.inbox / ".bikewatch" / "status").mkdir()
    status = site.inbox / ".bikewatch" / "status" / f"{folder.name}.json"
    status.write_text('{"worker": "bravo", "pid": 4242, "host": "host-b"}')
    a = _daemon(site, "host-a", daemons).start()
    wait_until(lambda: a.events("recovered work of a stopped worker"), 30, what="bravo's folder recovered")
    assert not folder.exists() and not work_leftovers(site.inbox)
    assert not status.exists(), "the dead worker's status file stayed"
    more = _inputs(tmp_path / "stage", 20, prefix="A_")
    move_in(tmp_path / "stage", site.inbox)
    wait_until(lambda: len(read_csv(site.csv("host-a"))) == 20, 60, what="alpha's own 20 rows")
    assert a.terminate() == 0
    rows_b = read_csv(site.csv("host-b"))
    assert sorted(r["id"] for r in rows_b) == sorted(it.key for it in items), "bravo's 32 rows, once each"
    assert not any(r["id"] in {it.key for it in items} for r in read_csv(site.csv("host-a")))
    (event,) = a.events("recovered work of a stopped worker")
    assert event["csv"] == [str(site.csv("host-b"))], event
    places = _one_row_each(site, inputs + more)
    assert places["road"] >= 32, places


@needs_uts
def test_two_hosts_share_an_inbox_and_one_is_killed_again_and_again(tmp_path: Path, daemons: list[Daemon]) -> None:
    """bravo (host-b) is SIGKILLed mid-dump three times and restarted; alpha (host-a) runs throughout.

    A restarted bravo finds its predecessor's pid gone and recovers that folder itself, unless
    alpha, which can only go by the heartbeat's age, took it over first; the second kill leaves
    bravo dead until alpha has. Every photo ends once, with one row, in one of the two CSVs.
    """
    site = Site(tmp_path)
    a = _daemon(site, "host-a", daemons, max_batch=8)
    b = _daemon(site, "host-b", daemons, max_batch=8)
    a.start(wait_ready=False)
    b.start()
    a.wait_ready()
    inputs: collections.Counter[str] = collections.Counter()
    by_bravo: list[dict] = []  # each bravo's log starts afresh: keep what the killed ones did
    for k in range(3):
        # A wave per kill, so that bravo is busy each time it is killed.
        inputs += _inputs(tmp_path / f"stage{k}", 120, seed=k, prefix=f"W{k}_")
        target = len(site.rows()) + 20
        move_in(tmp_path / f"stage{k}", site.inbox)
        wait_until(lambda: len(site.rows()) >= target, 90, interval=0.01, what=f"{target} rows")
        b.kill()
        by_bravo += b.events("recovered work of a stopped worker")
        if k == 1:
            before = len(a.events("recovered work of a stopped worker"))
            wait_until(lambda: len(a.events("recovered work of a stopped worker")) > before, 60,
                       what="alpha taking over the dead bravo's folder")
        b.start()
    kills = 3
    wait_until(lambda: len(site.rows()) >= 360 and not any(site.inbox.glob("*.jpg")), 180, interval=0.2,
               what="360 rows")
    wait_until(lambda: not work_leftovers(site.inbox), 30, what="every dead folder recovered")
    assert a.terminate(30) == 0 and b.terminate(30) == 0
    places = _one_row_each(site, inputs)
    by_bravo += b.events("recovered work of a stopped worker")
    recovered = a.events("recovered work of a stopped worker") + by_bravo
    by_folder = collections.Counter(e["folder"] for e in recovered)
    print("kills", kills, "recoveries by alpha", len(a.events("recovered work of a stopped worker")),
          "by bravo", len(by_bravo), "places", places,
          "recovered (delivered, returned):", [(e["delivered"], e["returned"]) for e in recovered])
    assert len(by_folder) == kills and max(by_folder.values()) == 1, by_folder
    # Whoever recovered a folder, bravo's batches were recorded in bravo's CSV.
    assert {r["worker"] for r in read_csv(site.csv("host-a"))} <= {"host-a"}
    status = site.inbox / ".bikewatch" / "status"
    assert not list(status.glob("*.json")), list(status.iterdir())


@needs_uts
def test_two_hosts_starting_together_recover_each_dead_folder_once(tmp_path: Path, daemons: list[Daemon]) -> None:
    site = Site(tmp_path)
    inputs: collections.Counter[str] = collections.Counter()
    stages = ["claimed", "decided", "placed", "recorded"] * 3
    for n, stage in enumerate(stages):
        photos = {f"D{n:02d}_{i}.jpg": photo_bytes(1000 + 10 * n + i) for i in range(4)}
        inputs += hashes(photos)
        dead_worker(site, host="host-c", name=f"charlie{n}", photos=photos, stage=stage)
    a, b = _daemon(site, "host-a", daemons), _daemon(site, "host-b", daemons)
    a.start(wait_ready=False)
    b.start(wait_ready=False)
    a.wait_ready()
    b.wait_ready()
    wait_until(lambda: len(site.rows()) >= 48 and not any(site.inbox.glob("*.jpg")), 90, interval=0.2,
               what="48 rows")
    assert a.terminate() == 0 and b.terminate() == 0
    _one_row_each(site, inputs)
    recovered = a.events("recovered work of a stopped worker") + b.events("recovered work of a stopped worker")
    by_folder = collections.Counter(e["folder"] for e in recovered)
    assert len(by_folder) == 12 and max(by_folder.values()) == 1, by_folder
    # Decided, placed and recorded batches are charlie's: 9 folders x 4 rows, all in charlie's CSV;
    # the claimed ones went back to the inbox and were sorted afresh by alpha and bravo.
    assert len(read_csv(site.csv("host-c"))) == 36
