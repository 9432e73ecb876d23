"""Claim-then-deliver, in the spirit of Maildir: what makes a crash harmless.

Each worker owns a work folder ``STATE/work/<worker>-<pid>-<rand>/`` on the
inbox's filesystem, held by an ``flock`` for as long as the worker lives. A
batch goes through these steps, each durable before the next begins:

1. **claimed**: the batch journal ``<batch>.json`` lists each item's key and
   inbox path; then each photo is renamed into the work folder as ``<key>``.
   The rename is the claim: of several workers only one rename succeeds.
2. **decided**: after classification the journal is rewritten with each
   item's label, probabilities, digest and chosen destination.
3. :func:`settle` places each file with a no-clobber rename, appends the CSV
   rows of the batch in one write, fsyncs, and deletes the journal. (The service
   runs :func:`deliver_decided`, the same steps without the checks only a restart
   can need; it hands anything unexpected to :func:`settle`.)

:func:`settle` is also the recovery procedure: it is idempotent, and it tells
what was done from what is on disk (a work file that is gone was placed). A
worker at start-up (and at each rescan) takes over every dead worker's folder
by renaming it into its own (one rename wins, on any share), settles every
journal in it into the CSV that journal names, then removes the folder. A
journal that cannot be read is moved to ``STATE/quarantine/`` and its files are
saved from what is on disk.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import secrets
import socket
import stat
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Collection, Iterator

from bikewatch.store.delivery import fsync_dir, numbered_name, place, rename_noreplace
from bikewatch.store.failover import locate_ledger, safe_rel, salvage
from bikewatch.store.ledger import Ledger, Row

PHASE_CLAIMED = "claimed"
PHASE_DECIDED = "decided"
LOCK_NAME = "lock"
ADOPTED_PREFIX = "adopted-"
"""A dead worker's folder, renamed into the live worker's own folder that recovers it."""
QUARANTINE = "quarantine"
"""STATE/quarantine/: damaged journals, moved aside (never deleted) for a person to look at."""


@dataclass(frozen=True)
class Item:
    """One claimed file, from inbox to its final place."""

    key: str
    source: str  # path relative to the inbox
    label: str = ""  # mountain, road, unsure or rejected once decided
    p_mountain: float | None = None
    p_road: float | None = None
    sha256: str = ""
    size: int = 0
    mtime_ns: int = 0
    error: str = ""
    timestamp: str = ""
    dest: str = ""  # relative to the output folder, e.g. "road/IMG_0001.jpg"
    back: str = ""  # relative to the inbox: returned there instead of delivered
    decoded_from: str = ""  # "preview" or "full" (bikewatch.decode.prepare.Prepared.decoded_from)

    @property
    def confidence(self) -> float | None:
        if self.p_mountain is None or self.p_road is None:
            return None
        return max(self.p_mountain, self.p_road)


class JournalDamaged(ValueError):
    """A journal that cannot be read back as one: empty, cut off, garbage, or not a journal's shape."""


@dataclass(frozen=True)
class Journal:
    batch: str
    phase: str
    worker: str
    model: str = ""
    items: tuple[Item, ...] = field(default_factory=tuple)
    # Where the batch is recorded (see bikewatch.store.failover), so that any host can finish it there:
    host: str = ""  # the writer's host name
    inbox: str = ""  # the inbox, as the writer saw it
    ledger: str = ""  # the CSV it appends to, as it saw it
    ledger_rel: str = ""  # that CSV relative to the inbox, when other hosts can reach it that way

    def to_json(self) -> str:
        # Shallow on purpose: every value is a str, a number or None. dataclasses.asdict()
        # deep-copied each one (the items twice): 1.6 ms for a 40-item journal, now 0.2 ms.
        # The items last: a journal cut off in its items still says whose batch it is.
        data: dict[str, object] = {name: getattr(self, name) for name in _JOURNAL_FIELDS if name != "items"}
        data["items"] = [{name: getattr(i, name) for name in _ITEM_FIELDS} for i in self.items]
        return json.dumps(data, ensure_ascii=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Journal":
        """Parse and check a journal; anything that is not a sound one raises :class:`JournalDamaged`."""
        try:
            data = json.loads(text)
            items = tuple(Item(**i) for i in data.pop("items"))
            journal = cls(items=items, **data)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise JournalDamaged(f"{type(exc).__name__}: {exc}") from None
        problem = journal_problem(journal)
        if problem:
            raise JournalDamaged(problem)
        return journal


def journal_problem(journal: Journal) -> str:
    """What makes a parsed journal unusable (names that leave their folders, unknown phase); pure."""
    if journal.phase not in (PHASE_CLAIMED, PHASE_DECIDED):
        return f"unknown phase {journal.phase!r}"
    for name in ("batch", "worker", "model", "host", "inbox", "ledger", "ledger_rel"):
        if not isinstance(getattr(journal, name), str):
            return f"{name} is not a string"
    for item in journal.items:
        for f in fields(Item):
            value = getattr(item, f.name)
            if f.name in ("p_mountain", "p_road"):
                ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            elif f.name in ("size", "mtime_ns"):
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, str)
            if not ok:
                return f"item field {f.name} holds {type(value).__name__}"
        if not safe_rel(item.key) or "/" in item.key:
            return f"bad item key {item.key!r}"
        if not safe_rel(item.source):
            return f"bad source {item.source!r} of item {item.key}"
        if item.back and not safe_rel(item.back):
            return f"bad return path {item.back!r} of item {item.key}"
        if journal.phase == PHASE_DECIDED and not item.back and not safe_rel(item.dest):
            return f"bad destination {item.dest!r} of item {item.key}"
    return ""


_ITEM_FIELDS = tuple(f.name for f in fields(Item))
_JOURNAL_FIELDS = tuple(f.name for f in fields(Journal))


@dataclass
class SettleResult:
    delivered: list[Item] = field(default_factory=list)
    returned: list[Item] = field(default_factory=list)
    missing: list[Item] = field(default_factory=list)
    quarantined: list[tuple[str, str, str]] = field(default_factory=list)  # (journal, moved to, why)
    elsewhere: list[tuple[str, str]] = field(default_factory=list)  # (batch, CSV): rows in another worker's CSV
    fallback: list[tuple[str, str]] = field(default_factory=list)  # (batch, why its worker's CSV was not used)

    def add(self, other: "SettleResult") -> None:
        for name in ("delivered", "returned", "missing", "quarantined", "elsewhere", "fallback"):
            getattr(self, name).extend(getattr(other, name))


class DeliveryError(OSError):
    """The output (or the CSV log) cannot take files right now: full, read-only, gone."""


def _fmt(p: float | None) -> str:
    return "" if p is None else f"{p:.6f}"


def row_for(item: Item, *, inbox: Path, output: Path, model: str, worker: str) -> Row:
    return Row(
        timestamp=item.timestamp, source=os.path.join(inbox, item.source), destination=os.path.join(output, item.dest),
        label=item.label, confidence=_fmt(item.confidence), p_mountain=_fmt(item.p_mountain),
        p_road=_fmt(item.p_road), sha256=item.sha256, model=model, error=item.error,
        size_bytes=str(item.size), id=item.key, worker=worker, decoded_from=item.decoded_from,
    )


HEARTBEAT_SECONDS = 10.0
"""How often a live worker touches its lock file (see :meth:`WorkArea.orphaned_dirs`)..."""
STALE_SECONDS = 120.0
"""...and how old that touch must be before a worker on another host counts as dead (the
``stale_worker_seconds`` setting; a quarter of it is the heartbeat when that is shorter)."""


def lock_is_stale(owner: str, mtime: float, *, host: str, now: float, stale_after: float) -> bool:
    """Is the worker that wrote ``owner`` ("host pid") dead? Pure.

    On this host the pid answers. For another host only a heartbeat older than
    ``stale_after`` does: a free flock alone is not trusted there, because an
    NFS share mounted with ``nolock`` grants every machine every lock.
    """
    parts = owner.split()
    if not parts:
        return True  # no owner ever written: nothing but the free lock to go by
    if len(parts) == 2 and parts[0] == host and parts[1].isdigit():
        return not os.path.exists(f"/proc/{parts[1]}")
    return now - mtime > stale_after


class WorkArea:
    """This worker's claim folder; holds its lock for the life of the process."""

    def __init__(self, state_dir: Path, worker: str, stale_after: float = STALE_SECONDS) -> None:
        self.stale_after = stale_after
        self.heartbeat_every = min(HEARTBEAT_SECONDS, stale_after / 4)
        self.root = state_dir / "work"
        self.root.mkdir(parents=True, exist_ok=True)
        self.name = f"{worker}-{os.getpid()}-{secrets.token_hex(3)}"
        self.dir = self.root / self.name
        # Locked under a hidden name first, so no other worker ever sees it unlocked.
        nursery = self.root / f".new-{self.name}"
        nursery.mkdir()
        self._lock_fd = os.open(nursery / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(self._lock_fd, f"{socket.gethostname()} {os.getpid()}".encode())
        os.rename(nursery, self.dir)
        self._seq = 0
        self._beat = time.monotonic()
        self._stop_beating = threading.Event()
        self._beater: threading.Thread | None = None
        fsync_dir(self.root)

    def heartbeat(self, now: float) -> None:
        """Touch the lock file so workers on other machines can tell we are alive."""
        if now - self._beat >= self.heartbeat_every:
            self._beat = now
            try:
                os.utime(self._lock_fd)
            except OSError:
                pass

    def beat_in_background(self) -> None:
        """Keep the heartbeat going on a thread of its own until :meth:`close`.

        A live worker whose main loop waits a long time (an fsync on a slow share, a big
        recovery) must not look dead to other hosts: one that took its folder over then could
        record a batch the worker is just recording itself. The process dying stops it.
        """
        if self._beater is not None:
            return

        def beat() -> None:
            while not self._stop_beating.wait(self.heartbeat_every):
                self.heartbeat(time.monotonic())

        self._beater = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._beater.start()

    def new_batch_id(self) -> str:
        self._seq += 1
        return f"{self.name}.{self._seq:08d}"

    def journal_path(self, batch: str) -> Path:
        return self.dir / f"{batch}.json"

    def close(self) -> None:
        """Remove our folder when nothing is left in it; release the lock."""
        self._stop_beating.set()
        if self._beater is not None:
            self._beater.join(timeout=5)
        try:
            for tmp in self.dir.glob("*.json.tmp"):
                os.unlink(tmp)  # a journal rewrite that failed (inbox gone meanwhile); the previous version stands
            leftovers = [p for p in self.dir.iterdir() if p.name != LOCK_NAME]
            if not leftovers:
                os.unlink(self.dir / LOCK_NAME)
                os.rmdir(self.dir)
        except OSError:
            pass
        os.close(self._lock_fd)

    def orphaned_dirs(self, stale_after: float | None = None, retired: Collection[str] = ()) -> Iterator[Path]:
        """Work folders of dead workers, each yielded once it is ours: taken over by a rename.

        A dead worker's folder is renamed into our own folder (``adopted-<name>``) before
        anything in it is touched. Of several workers that judge it dead at once, on this
        host or another, one rename wins; the others find it gone (ENOENT) and move on. No
        lock is needed, which matters on shares whose locks do not reach every host (sshfs,
        NFS mounted ``nolock``). Until it is recovered, the adopted folder is as safe as our
        own: if we die too, whoever takes over our folder recovers it with ours.
        Folders adopted earlier and not recovered yet (the output was unusable) come first.

        ``retired`` names folders this very process used before (its inbox's filesystem
        went away and it started a new one): their lock names a live pid, ours, yet
        nobody works in them any more.
        """
        stale_after = self.stale_after if stale_after is None else stale_after
        for entry in sorted(self.dir.iterdir()):
            if entry.name.startswith(ADOPTED_PREFIX) and entry.is_dir():
                yield entry
        host, now = socket.gethostname(), time.time()
        for entry in sorted(self.root.iterdir()):
            if entry == self.dir or entry.name.startswith(".") or not entry.is_dir():
                continue
            if self._is_dead(entry, host=host, now=now, stale_after=stale_after, retired=retired):
                adopted = self._take_over(entry)
                if adopted is not None:
                    yield adopted

    def _is_dead(self, entry: Path, *, host: str, now: float, stale_after: float, retired: Collection[str]) -> bool:
        try:
            fd = os.open(entry / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            # No usable lock file (a folder in its place, a damaged entry): nobody can hold it,
            # so only age tells, as for a worker on another host.
            try:
                return now - os.lstat(entry).st_mtime > stale_after
            except OSError:
                return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # alive
            # Garbage, empty or cut off: lock_is_stale then goes by the heartbeat alone.
            owner = os.pread(fd, 256, 0).decode("utf-8", "replace")
            return entry.name in retired or lock_is_stale(owner, os.fstat(fd).st_mtime, host=host, now=now,
                                                          stale_after=stale_after)
        except OSError:
            return False
        finally:
            os.close(fd)  # releases the flock; the rename that follows is what makes the folder ours

    def _take_over(self, entry: Path) -> Path | None:
        """Rename a dead worker's folder into ours; None when another worker's rename won."""
        target = self.dir / f"{ADOPTED_PREFIX}{entry.name}"
        try:
            os.rename(entry, target)
        except FileNotFoundError:
            # Another worker won, or (NFS) our retransmitted rename did succeed.
            if not os.path.isdir(target):
                return None
        except OSError:
            return None  # ENOTEMPTY/EEXIST: cannot be ours (names are unique); leave it be
        try:
            fsync_dir(self.root)
            fsync_dir(self.dir)
        except OSError:
            pass
        return target


def write_journal(path: Path, journal: Journal) -> None:
    """Atomic and durable: tmp, fsync, rename, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write(journal.to_json())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_journal(path: Path) -> Journal:
    """The journal at ``path``; :class:`JournalDamaged` when it cannot be one (an OSError when unreadable)."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise JournalDamaged("a folder, not a file") from None
    if not data:
        raise JournalDamaged("empty")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise JournalDamaged(f"not text: {exc.reason} at byte {exc.start}") from None
    return Journal.from_json(text)


def claim(inbox: Path, work_dir: Path, journal: Journal, journal_path: Path) -> Journal:
    """Write the claimed journal, then rename each source into the work folder.

    Returns the journal with only the items actually claimed (another worker
    may have won a file, or it vanished).
    """
    write_journal(journal_path, journal)
    won: list[Item] = []
    inbox_s, work_s = os.fspath(inbox), os.fspath(work_dir)
    for item in journal.items:
        target = os.path.join(work_s, item.key)
        try:
            os.rename(os.path.join(inbox_s, item.source), target)
        except FileNotFoundError:
            # NFS can report ENOENT for a retransmitted rename that did succeed.
            if not os.path.lexists(target):
                continue
        won.append(item)
    fsync_dir(work_dir)
    return replace(journal, items=tuple(won))


def free_name(folder: str | Path, name: str, taken: set[str]) -> str:
    """First of ``name``, ``name (1)``... that exists neither on disk nor in ``taken``.

    A choice, not a reservation: :func:`place` is no-clobber, so a race only costs a retry.
    """
    n = 0
    while True:
        candidate = numbered_name(name, n)
        if candidate not in taken and not os.path.lexists(os.path.join(folder, candidate)):
            return candidate
        n += 1


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_copy_of(work: Path, dest: Path, item: Item, digest: Callable[[Path], str]) -> bool:
    """After a crash mid cross-filesystem move: is ``dest`` the finished copy of ``work``?"""
    try:
        st = os.lstat(dest)
    except OSError:
        return False
    if st.st_size != item.size or st.st_mtime_ns != item.mtime_ns:
        return False
    # A photo classified from its preview was never hashed (its row has no sha256): compare the bytes.
    return digest(dest) == (item.sha256 or digest(work))


def _partial_name(item: Item) -> str:
    return f".bikewatch-{item.key}.partial"


def settle(
    journal_path: Path,
    work_dir: Path,
    *,
    inbox: Path,
    output: Path,
    ledger: Ledger,
    fresh: bool = False,
    digest: Callable[[Path], str],
    on_return: Callable[[Item, str], None] | None = None,
    stale_after: float = STALE_SECONDS,
) -> SettleResult:
    """Finish a batch from whatever state it is in; idempotent; deletes the journal at the end.

    ``fresh`` says the CSV cannot hold rows of this batch yet (the normal
    path), which saves reading the CSV. Raises :class:`DeliveryError` when the
    output cannot take the files: the journal then stays, and the caller
    returns the batch to the inbox with :func:`return_to_inbox` or retries.

    The rows go to the CSV the journal names (another worker's, perhaps on another host:
    see :func:`bikewatch.store.failover.locate_ledger`), and ids are checked there. A damaged
    journal is moved to the quarantine folder and its files are saved as far as they can be
    (:func:`_settle_damaged`); ``result.quarantined`` says so, for the caller's log.
    """
    try:
        journal = read_journal(journal_path)
    except JournalDamaged as exc:
        return _settle_damaged(journal_path, work_dir, str(exc), inbox=inbox, output=output, ledger=ledger,
                               digest=digest, on_return=on_return, stale_after=stale_after)
    result = SettleResult()
    if journal.phase == PHASE_CLAIMED:
        for item in journal.items:
            if _return_one(work_dir / item.key, inbox, item.source):
                result.returned.append(item)
                if on_return:
                    on_return(item, "not classified before the worker stopped")
        _remove_journal(journal_path)
        return result

    items = list(journal.items)
    placed: list[Item] = []
    touched: set[Path] = set()
    for i, item in enumerate(items):
        work = work_dir / item.key
        if item.back:
            # Decided to return it; finish that if it had not happened.
            if os.path.lexists(work):
                _return_one(work, inbox, item.back)
            result.returned.append(item)
            continue
        if not os.path.lexists(work):
            placed.append(item)  # a work file that is gone was placed
            continue
        dest = output / item.dest
        partial = dest.with_name(_partial_name(item))
        if os.path.lexists(partial):
            os.unlink(partial)  # an interrupted copy; the original is still in work
        if _same_file(work, dest) or (not fresh and _is_copy_of(work, dest, item, digest)):
            os.unlink(work)
            placed.append(item)
            continue
        while True:
            try:
                # Not in the try below: mkdir's FileExistsError (a *file* named like the label
                # folder) is no name collision, and retrying it would loop forever.
                dest.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DeliveryError(exc.errno, f"cannot deliver to {dest.parent}: {exc.strerror}") from exc
            try:
                place(work, dest, tmp_name=_partial_name(item))
                break
            except FileExistsError:
                # Someone took the name since we chose it: choose again, durably.
                new = free_name(dest.parent, Path(item.dest).name, set())
                item = replace(item, dest=str(Path(item.dest).parent / new))
                items[i] = item
                write_journal(journal_path, replace(journal, items=tuple(items)))
                dest = output / item.dest
            except OSError as exc:
                raise DeliveryError(exc.errno, f"cannot deliver to {dest.parent}: {exc.strerror}") from exc
        touched.add(dest.parent)
        placed.append(item)
    target = ledger if fresh else _ledger_of(journal, ledger, inbox, result)
    _record(journal_path, journal, placed, touched, inbox=inbox, output=output, ledger=target, fresh=fresh,
            repair=target.path != ledger.path and _quiet_for(target.path, stale_after))
    result.delivered = placed
    return result


def _ledger_of(journal: Journal, ours: Ledger, inbox: Path, result: SettleResult) -> Ledger:
    """The CSV ``journal``'s rows belong in (noted in ``result`` when it is not ours)."""
    path, why = locate_ledger(host=journal.host, ledger=journal.ledger, ledger_rel=journal.ledger_rel,
                              our_host=socket.gethostname(), our_inbox=Path(os.path.abspath(inbox)),
                              our_ledger=ours.path)
    if why:
        result.fallback.append((journal.batch, why))
    if path == ours.path:
        return ours
    result.elsewhere.append((journal.batch, str(path)))
    return Ledger(path)


def _quiet_for(path: Path, seconds: float) -> bool:
    """Has nobody written ``path`` for ``seconds``? Only then is a torn last line surely no live append."""
    try:
        return time.time() - os.stat(path).st_mtime > seconds
    except OSError:
        return False


def _record(
    journal_path: Path,
    journal: Journal,
    placed: list[Item],
    folders: Collection[str | Path],
    *,
    inbox: Path,
    output: Path,
    ledger: Ledger,
    fresh: bool,
    repair: bool = False,
) -> None:
    """The end of every delivery: the new names durable, one CSV row per placed file, the journal gone.

    Unless ``fresh``, rows the CSV already holds (a restart after the append) are not written again.
    ``repair`` trims a torn last line first (another worker's CSV, which its start-up did not trim).
    """
    try:
        for folder in folders:
            fsync_dir(folder)
        if repair:
            ledger.repair_tail()
        existing = set() if fresh else ledger.present(it.key for it in placed)
        rows = [
            row_for(it, inbox=inbox, output=output, model=journal.model, worker=journal.worker)
            for it in placed
            if it.key not in existing
        ]
        ledger.append(rows)
    except OSError as exc:
        raise DeliveryError(exc.errno, f"cannot write the CSV log {ledger.path}: {exc.strerror}") from exc
    _remove_journal(journal_path)


def deliver_decided(
    journal_path: Path,
    journal: Journal,
    work_dir: Path,
    *,
    inbox: Path,
    output: Path,
    ledger: Ledger,
    digest: Callable[[Path], str],
) -> SettleResult:
    """:func:`settle` for a batch this process has just decided and journalled: the normal path.

    Nothing of the batch can have been placed yet, so the checks that make :func:`settle`
    idempotent (a partial copy or a finished destination left by an earlier attempt, rows
    already in the CSV) are skipped, each label folder is made once per batch rather than
    once per file, and ``journal`` is not read back. They cost about as much CPU as the
    renames themselves. Anything unexpected (a name taken since it was chosen, a work file
    gone, an output error) hands the batch to :func:`settle`, which finishes it from the
    journal on disk exactly as recovery would.
    """
    if journal.phase != PHASE_DECIDED or any(it.back for it in journal.items):
        return settle(journal_path, work_dir, inbox=inbox, output=output, ledger=ledger, fresh=True, digest=digest)
    work_s, output_s = os.fspath(work_dir), os.fspath(output)
    folders = {os.path.join(output_s, os.path.dirname(it.dest)) for it in journal.items}
    try:
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
        for item in journal.items:
            src, dest = os.path.join(work_s, item.key), os.path.join(output_s, item.dest)
            try:
                rename_noreplace(src, dest)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                place(Path(src), Path(dest), tmp_name=_partial_name(item))  # across filesystems: a durable copy
    except OSError:
        return settle(journal_path, work_dir, inbox=inbox, output=output, ledger=ledger, fresh=True, digest=digest)
    placed = list(journal.items)
    _record(journal_path, journal, placed, folders, inbox=inbox, output=output, ledger=ledger, fresh=True)
    return SettleResult(delivered=placed)


def return_to_inbox(journal_path: Path, work_dir: Path, *, inbox: Path) -> list[Item]:
    """The output is unusable: send every not-yet-placed file of the batch back to the inbox.

    Files already placed keep their place; their rows are written by the next
    :func:`settle` of this journal, which the caller runs when the output is back.
    """
    try:
        journal = read_journal(journal_path)
    except JournalDamaged:
        return []  # the next settle() quarantines it and saves its files
    items = list(journal.items)
    returned: list[Item] = []
    for i, item in enumerate(items):
        if item.back or not os.path.lexists(work_dir / item.key):
            continue
        items[i] = replace(item, back=item.source)
        returned.append(items[i])
    write_journal(journal_path, replace(journal, items=tuple(items)))
    for item in returned:
        _return_one(work_dir / item.key, inbox, item.source)
    return returned


def _return_one(work: Path, inbox: Path, rel: str) -> bool:
    """Put a claimed file back at its inbox path (numbered if that name is taken now)."""
    if not os.path.lexists(work):
        return False
    target = inbox / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        try:
            rename_noreplace(work, target.with_name(numbered_name(target.name, n)))
            return True
        except FileExistsError:
            n += 1


def _remove_journal(path: Path) -> None:
    os.unlink(path)
    fsync_dir(path.parent)


# ----------------------------------------------------------------------------- damaged journals


def quarantine_dir(work_dir: Path) -> Path:
    """STATE/quarantine for a work folder STATE/work/<name> (or a folder adopted inside one)."""
    p = work_dir
    while p.name != "work" and p.parent != p:
        p = p.parent
    return (p.parent if p.name == "work" else work_dir.parent) / QUARANTINE


def _quarantine(journal_path: Path, work_dir: Path) -> Path:
    """Move a damaged journal aside, never over another one; returns where it went."""
    folder = quarantine_dir(work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    base = f"{work_dir.name.removeprefix(ADOPTED_PREFIX)}.{journal_path.name}"
    n = 0
    while True:
        target = folder / (base if n == 0 else f"{base}.{n}")
        try:
            rename_noreplace(journal_path, target)
            break
        except FileExistsError:
            n += 1
    fsync_dir(folder)
    fsync_dir(journal_path.parent)
    return target


def _settle_damaged(
    journal_path: Path,
    work_dir: Path,
    why: str,
    *,
    inbox: Path,
    output: Path,
    ledger: Ledger,
    digest: Callable[[Path], str],
    on_return: Callable[[Item, str], None] | None,
    stale_after: float,
) -> SettleResult:
    """A journal that cannot be read: quarantine it and lose none of the files it covered.

    Items still whole in it (a journal cut off keeps its first ones) are finished as they
    were decided, or returned under their inbox names. Any other work file of the batch is
    returned to the inbox as ``recovered-<key>``, unless the output already holds its bytes
    (a copy across filesystems that finished just before the crash): then that copy stands,
    gets its CSV row if it has none, and the work file, a duplicate, is removed.
    """
    try:
        text = journal_path.read_bytes().decode("ascii", "replace")
    except OSError:
        text = ""
    header, objects = salvage(text)
    moved = _quarantine(journal_path, work_dir)
    shown = journal_path  # named where its worker left it, not where recovery adopted it
    if work_dir.name.startswith(ADOPTED_PREFIX):
        shown = work_dir.parent.parent / work_dir.name.removeprefix(ADOPTED_PREFIX) / journal_path.name
    result = SettleResult(quarantined=[(str(shown), str(moved), why)])
    batch = journal_path.name[: -len(".json")]
    phase = header.get("phase", "")
    base = Journal(batch=batch, phase=phase if phase in (PHASE_CLAIMED, PHASE_DECIDED) else PHASE_CLAIMED,
                   worker=header.get("worker", ""), model=header.get("model", ""), host=header.get("host", ""),
                   inbox=header.get("inbox", ""), ledger=header.get("ledger", ""),
                   ledger_rel=header.get("ledger_rel", ""))
    good: list[Item] = []
    for obj in objects:
        try:
            item = Item(**obj)
        except TypeError:
            continue
        if item.key.startswith(batch + ".") and not journal_problem(replace(base, items=(item,))):
            good.append(item)
    sources = {it.key: it.source for it in good}
    finished: set[str] = set()
    if good and base.phase == PHASE_DECIDED:
        write_journal(journal_path, replace(base, items=tuple(good)))  # only what is sound, as it was decided
        result.add(settle(journal_path, work_dir, inbox=inbox, output=output, ledger=ledger, digest=digest,
                          on_return=on_return, stale_after=stale_after))
        finished = set(sources)
    target = _ledger_of(base, ledger, inbox, SettleResult())
    by_size: dict[int, list[Path]] | None = None
    for entry in sorted(work_dir.iterdir()):
        key = entry.name
        if not key.startswith(batch + ".") or key in finished or key.endswith((".json", ".json.tmp")):
            continue
        st = os.lstat(entry)
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
            continue
        rel = sources.get(key, f"recovered-{key}")
        if phase != PHASE_CLAIMED and stat.S_ISREG(st.st_mode):
            if by_size is None:
                by_size = _output_by_size(output)
            copy = _finished_copy(entry, key, by_size.get(st.st_size, []), target, ledger, digest)
            if copy is not None:
                item = Item(key=key, source=rel, label=copy.parent.name, sha256=digest(copy), size=st.st_size,
                            mtime_ns=st.st_mtime_ns, dest=f"{copy.parent.name}/{copy.name}",
                            timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"))
                if not target.present([key]):
                    try:
                        target.append([row_for(item, inbox=inbox, output=output, model=base.model,
                                               worker=base.worker)])
                    except OSError as exc:
                        raise DeliveryError(exc.errno, f"cannot write the CSV log {target.path}: {exc.strerror}") from exc
                os.unlink(entry)
                fsync_dir(work_dir)
                result.delivered.append(item)
                continue
        if _return_one(entry, inbox, rel):
            item = Item(key=key, source=rel)
            result.returned.append(item)
            if on_return:
                on_return(item, "its batch journal was damaged")
    return result


def _output_by_size(output: Path) -> dict[int, list[Path]]:
    """Regular files in the output's label folders, by size: where a finished copy could be."""
    out: dict[int, list[Path]] = {}
    try:
        folders = [e for e in os.scandir(output) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return out
    for folder in folders:
        try:
            for e in os.scandir(folder.path):
                if e.is_file(follow_symlinks=False) and not e.name.startswith("."):
                    out.setdefault(e.stat(follow_symlinks=False).st_size, []).append(Path(e.path))
        except OSError:
            continue
    return out


def _finished_copy(work: Path, key: str, candidates: list[Path], target: Ledger, ours: Ledger,
                   digest: Callable[[Path], str]) -> Path | None:
    """The output file ``work`` was copied to before the crash, or None.

    A copy keeps the bytes and the mtime (:func:`bikewatch.store.delivery.copy_durably`). It is ours
    when no CSV row names it, or only the row with our own id does; a file another row names
    is another delivery of the same bytes, and ``work`` goes back to the inbox instead.
    """
    st = os.lstat(work)
    same = [p for p in candidates if _mtime_ns(p) == st.st_mtime_ns]
    if not same:
        return None
    want = digest(work)
    mine = target.row(key)
    for path in same:
        if digest(path) != want:
            continue
        if mine is not None and os.path.realpath(mine.get("destination", "")) == os.path.realpath(path):
            return path
        if not target.present([str(path)]) and not (ours.path != target.path and ours.present([str(path)])):
            return path
    return None


def _mtime_ns(path: Path) -> int:
    try:
        return os.lstat(path).st_mtime_ns
    except OSError:
        return -1


def recover_dir(
    work_dir: Path,
    *,
    inbox: Path,
    output: Path,
    ledger: Ledger,
    digest: Callable[[Path], str],
    on_return: Callable[[Item, str], None] | None = None,
    stale_after: float = STALE_SECONDS,
) -> SettleResult:
    """Settle every journal a dead worker left, return stray files to the inbox, remove the folder.

    Folders it had adopted from workers that died before it (``adopted-*``) are recovered first.
    """
    total = SettleResult()
    for sub in sorted(work_dir.iterdir()):
        if sub.name.startswith(ADOPTED_PREFIX) and not sub.is_symlink() and sub.is_dir():
            total.add(recover_dir(sub, inbox=inbox, output=output, ledger=ledger, digest=digest,
                                  on_return=on_return, stale_after=stale_after))
    for tmp in work_dir.glob("*.json.tmp"):
        if tmp.is_file():
            os.unlink(tmp)  # a journal rewrite that never completed; the previous version stands
    for journal_path in sorted(work_dir.glob("*.json")):
        total.add(settle(journal_path, work_dir, inbox=inbox, output=output, ledger=ledger, digest=digest,
                         on_return=on_return, stale_after=stale_after))
    for stray in sorted(work_dir.iterdir()):
        if stray.name == LOCK_NAME:
            continue
        if stat.S_ISDIR(os.lstat(stray).st_mode):
            continue
        # Not named by any journal: cannot happen by our protocol, but never drop bytes.
        _return_one(stray, inbox, f"recovered-{stray.name}")
        total.returned.append(Item(key=stray.name, source=f"recovered-{stray.name}"))
    lock = work_dir / LOCK_NAME
    try:
        if os.path.isdir(lock) and not os.path.islink(lock):
            os.rmdir(lock)  # damage: a folder where the lock file was
        else:
            os.unlink(lock)
    except OSError:
        pass
    try:
        os.rmdir(work_dir)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return total
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not work_dir.name.startswith(ADOPTED_PREFIX):
            raise
        # Only folders are left (no journal names them, no file is in them): not ours to judge.
        # Aside with the damaged journals, so that they are not adopted again at every rescan.
        _quarantine(work_dir, work_dir)
    return total


def journals(work_dir: Path) -> list[Path]:
    return sorted(work_dir.glob("*.json"))

