"""Delivery: decided files placed in their label folders, one CSV row each, the journal gone.

:func:`deliver_decided` is the normal path for a batch this process has just decided;
:func:`finish_batch` finishes a batch from whatever state a crash or an outage left it in
(idempotent: a work file that is gone was placed; rows the CSV holds are not written again),
which makes it the retry and the recovery procedure as well. Both end in :func:`record_batch`.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Collection

from bikewatch.files import fsync_dir, sha256_file
from bikewatch.store.claim import return_one
from bikewatch.store.delivery import numbered_name, place, rename_noreplace
from bikewatch.store.failover import locate_ledger
from bikewatch.store.journal import (
    PHASE_CLAIMED, PHASE_DECIDED, Item, Journal, JournalDamaged, read_journal, remove_journal, write_journal,
)
from bikewatch.store.ledger import Ledger, Row, probability_field
from bikewatch.store.workarea import STALE_SECONDS


@dataclass
class BatchOutcome:
    """What finishing one batch (or recovering a folder of them) did, for the caller's accounting and log."""

    delivered: list[Item] = field(default_factory=list)
    returned: list[Item] = field(default_factory=list)
    quarantined: list[tuple[str, str, str]] = field(default_factory=list)  # (journal, moved to, why)
    elsewhere: list[tuple[str, str]] = field(default_factory=list)  # (batch, CSV): rows in another worker's CSV
    fallback: list[tuple[str, str]] = field(default_factory=list)  # (batch, why its worker's CSV was not used)

    def add(self, other: "BatchOutcome") -> None:
        for name in ("delivered", "returned", "quarantined", "elsewhere", "fallback"):
            getattr(self, name).extend(getattr(other, name))


class DeliveryError(OSError):
    """The output (or the CSV log) cannot take files right now: full, read-only, gone."""


def row_for(item: Item, *, inbox: Path, output: Path, model: str, worker: str) -> Row:
    return Row(
        timestamp=item.timestamp, source=os.path.join(inbox, item.source), destination=os.path.join(output, item.dest),
        label=item.label, confidence=probability_field(item.confidence), p_mountain=probability_field(item.p_mountain),
        p_road=probability_field(item.p_road), sha256=item.sha256, model=model, error=item.error,
        size_bytes=str(item.size), id=item.key, worker=worker, decoded_from=item.decoded_from,
    )


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


def partial_name(item: Item) -> str:
    return f".bikewatch-{item.key}.partial"


def finish_batch(
    journal_path: Path,
    work_dir: Path,
    *,
    inbox: Path,
    output: Path,
    ledger: Ledger,
    fresh: bool = False,
    digest: Callable[[Path], str] = sha256_file,
    on_return: Callable[[Item, str], None] | None = None,
    stale_after: float = STALE_SECONDS,
) -> BatchOutcome:
    """Finish a batch from whatever state it is in; idempotent; deletes the journal at the end.

    ``fresh`` says the CSV cannot hold rows of this batch yet (the normal
    path), which saves reading the CSV. Raises :class:`DeliveryError` when the
    output cannot take the files: the journal then stays, and the caller
    returns the batch to the inbox with :func:`return_to_inbox` or retries.

    The rows go to the CSV the journal names (another worker's, perhaps on another host:
    see :func:`bikewatch.store.failover.locate_ledger`), and ids are checked there. A damaged
    journal is moved to the quarantine folder and its files are saved as far as they can be
    (:func:`finish_damaged`); ``result.quarantined`` says so, for the caller's log.
    """
    try:
        journal = read_journal(journal_path)
    except JournalDamaged as exc:
        from bikewatch.store.recovery import finish_damaged  # recovery builds on this module

        return finish_damaged(journal_path, work_dir, str(exc), inbox=inbox, output=output, ledger=ledger,
                              digest=digest, on_return=on_return, stale_after=stale_after)
    result = BatchOutcome()
    if journal.phase == PHASE_CLAIMED:
        for item in journal.items:
            if return_one(work_dir / item.key, inbox, item.source):
                result.returned.append(item)
                if on_return:
                    on_return(item, "not classified before the worker stopped")
        remove_journal(journal_path)
        return result

    items = list(journal.items)
    placed: list[Item] = []
    touched: set[Path] = set()
    for i, item in enumerate(items):
        work = work_dir / item.key
        if item.back:
            # Decided to return it; finish that if it had not happened.
            if os.path.lexists(work):
                return_one(work, inbox, item.back)
            result.returned.append(item)
            continue
        if not os.path.lexists(work):
            placed.append(item)  # a work file that is gone was placed
            continue
        dest = output / item.dest
        partial = dest.with_name(partial_name(item))
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
                place(work, dest, tmp_name=partial_name(item))
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
    target = ledger if fresh else ledger_of(journal, ledger, inbox, result)
    record_batch(journal_path, journal, placed, touched, inbox=inbox, output=output, ledger=target, fresh=fresh,
                 repair=target.path != ledger.path and _quiet_for(target.path, stale_after))
    result.delivered = placed
    return result


def ledger_of(journal: Journal, ours: Ledger, inbox: Path, result: BatchOutcome) -> Ledger:
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


def record_batch(
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
    remove_journal(journal_path)


def deliver_decided(
    journal_path: Path,
    journal: Journal,
    work_dir: Path,
    *,
    inbox: Path,
    output: Path,
    ledger: Ledger,
    digest: Callable[[Path], str] = sha256_file,
) -> BatchOutcome:
    """:func:`finish_batch` for a batch this process has just decided and journalled: the normal path.

    Nothing of the batch can have been placed yet, so the checks that make :func:`finish_batch`
    idempotent (a partial copy or a finished destination left by an earlier attempt, rows
    already in the CSV) are skipped, each label folder is made once per batch rather than
    once per file, and ``journal`` is not read back. They cost about as much CPU as the
    renames themselves. Anything unexpected (a name taken since it was chosen, a work file
    gone, an output error) hands the batch to :func:`finish_batch`, which finishes it from the
    journal on disk exactly as recovery would.
    """
    if journal.phase != PHASE_DECIDED or any(it.back for it in journal.items):
        return finish_batch(journal_path, work_dir, inbox=inbox, output=output, ledger=ledger, fresh=True, digest=digest)
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
                place(Path(src), Path(dest), tmp_name=partial_name(item))  # across filesystems: a durable copy
    except OSError:
        return finish_batch(journal_path, work_dir, inbox=inbox, output=output, ledger=ledger, fresh=True, digest=digest)
    placed = list(journal.items)
    record_batch(journal_path, journal, placed, folders, inbox=inbox, output=output, ledger=ledger, fresh=True)
    return BatchOutcome(delivered=placed)
