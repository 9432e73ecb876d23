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
worker at start-up settles every journal in every work folder whose lock is
free (a dead worker's), then removes the folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
import stat
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Collection, Iterator

from bikewatch.delivery import fsync_dir, numbered_name, place, rename_noreplace
from bikewatch.ledger import Ledger, Row

PHASE_CLAIMED = "claimed"
PHASE_DECIDED = "decided"
LOCK_NAME = "lock"


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
    decoded_from: str = ""  # "preview" or "full" (bikewatch.batching.Prepared.decoded_from)

    @property
    def confidence(self) -> float | None:
        if self.p_mountain is None or self.p_road is None:
            return None
        return max(self.p_mountain, self.p_road)


@dataclass(frozen=True)
class Journal:
    batch: str
    phase: str
    worker: str
    model: str = ""
    items: tuple[Item, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        # Shallow on purpose: every value is a str, a number or None. dataclasses.asdict()
        # deep-copied each one (the items twice): 1.6 ms for a 40-item journal, now 0.2 ms.
        data = {name: getattr(self, name) for name in _JOURNAL_FIELDS}
        data["items"] = [{name: getattr(i, name) for name in _ITEM_FIELDS} for i in self.items]
        return json.dumps(data, ensure_ascii=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Journal":
        data = json.loads(text)
        items = tuple(Item(**i) for i in data.pop("items"))
        return cls(items=items, **data)


_ITEM_FIELDS = tuple(f.name for f in fields(Item))
_JOURNAL_FIELDS = tuple(f.name for f in fields(Journal))


@dataclass
class SettleResult:
    delivered: list[Item] = field(default_factory=list)
    returned: list[Item] = field(default_factory=list)
    missing: list[Item] = field(default_factory=list)


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
"""How often a live worker touches its lock file (see :meth:`WorkArea.orphaned_dirs`)."""


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

    def __init__(self, state_dir: Path, worker: str) -> None:
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
        fsync_dir(self.root)

    def heartbeat(self, now: float) -> None:
        """Touch the lock file so workers on other machines can tell we are alive."""
        if now - self._beat >= HEARTBEAT_SECONDS:
            self._beat = now
            try:
                os.utime(self._lock_fd)
            except OSError:
                pass

    def new_batch_id(self) -> str:
        self._seq += 1
        return f"{self.name}.{self._seq:08d}"

    def journal_path(self, batch: str) -> Path:
        return self.dir / f"{batch}.json"

    def close(self) -> None:
        """Remove our folder when nothing is left in it; release the lock."""
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

    def orphaned_dirs(self, stale_after: float = 120.0, retired: Collection[str] = ()) -> Iterator[Path]:
        """Work folders of dead workers, each yielded while we hold its lock.

        ``retired`` names folders this very process used before (its inbox's filesystem
        went away and it started a new one): their lock names a live pid, ours, yet
        nobody works in them any more.
        """
        host, now = socket.gethostname(), time.time()
        for entry in sorted(self.root.iterdir()):
            if entry == self.dir or entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                fd = os.open(entry / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # alive
            try:
                owner = os.pread(fd, 256, 0).decode("utf-8", "replace")
                if entry.name in retired or lock_is_stale(owner, os.fstat(fd).st_mtime, host=host, now=now,
                                                          stale_after=stale_after):
                    yield entry
            finally:
                os.close(fd)


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
    return Journal.from_json(path.read_text(encoding="ascii"))


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
) -> SettleResult:
    """Finish a batch from whatever state it is in; idempotent; deletes the journal at the end.

    ``fresh`` says the CSV cannot hold rows of this batch yet (the normal
    path), which saves reading the CSV. Raises :class:`DeliveryError` when the
    output cannot take the files: the journal then stays, and the caller
    returns the batch to the inbox with :func:`return_to_inbox` or retries.
    """
    journal = read_journal(journal_path)
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
    _record(journal_path, journal, placed, touched, inbox=inbox, output=output, ledger=ledger, fresh=fresh)
    result.delivered = placed
    return result


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
) -> None:
    """The end of every delivery: the new names durable, one CSV row per placed file, the journal gone.

    Unless ``fresh``, rows the CSV already holds (a restart after the append) are not written again.
    """
    try:
        for folder in folders:
            fsync_dir(folder)
        existing = set() if fresh else ledger.ids()
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
    journal = read_journal(journal_path)
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


def recover_dir(
    work_dir: Path,
    *,
    inbox: Path,
    output: Path,
    ledger: Ledger,
    digest: Callable[[Path], str],
    on_return: Callable[[Item, str], None] | None = None,
) -> SettleResult:
    """Settle every journal a dead worker left, return stray files to the inbox, remove the folder."""
    total = SettleResult()
    for tmp in work_dir.glob("*.json.tmp"):
        os.unlink(tmp)  # a journal rewrite that never completed; the previous version stands
    for journal_path in sorted(work_dir.glob("*.json")):
        res = settle(journal_path, work_dir, inbox=inbox, output=output, ledger=ledger, digest=digest,
                     on_return=on_return)
        total.delivered += res.delivered
        total.returned += res.returned
    for stray in sorted(work_dir.iterdir()):
        if stray.name == LOCK_NAME:
            continue
        if stat.S_ISDIR(os.lstat(stray).st_mode):
            continue
        # Not named by any journal: cannot happen by our protocol, but never drop bytes.
        _return_one(stray, inbox, f"recovered-{stray.name}")
        total.returned.append(Item(key=stray.name, source=f"recovered-{stray.name}"))
    try:
        os.unlink(work_dir / LOCK_NAME)
        os.rmdir(work_dir)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY):
            raise
    return total


def journals(work_dir: Path) -> list[Path]:
    return sorted(work_dir.glob("*.json"))

