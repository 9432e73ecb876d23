"""Recovery: finishing the work of a dead worker, and saving the files of a damaged journal.

A worker at start-up (and at each rescan) adopts every dead worker's folder
(:meth:`bikewatch.store.workarea.WorkArea.orphaned_dirs`) and :func:`recover_dir` finishes
every journal in it into the CSV that journal names (:func:`bikewatch.store.deliver.finish_batch`),
returns stray files to the inbox, and removes the folder. A journal that cannot be read is
moved to ``STATE/quarantine/`` and its files are saved from what is on disk.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Callable

from bikewatch.clock import utc_now
from bikewatch.files import fsync_dir, sha256_file
from bikewatch.store.claim import return_one
from bikewatch.store.deliver import BatchOutcome, DeliveryError, finish_batch, ledger_of, row_for
from bikewatch.store.delivery import rename_noreplace
from bikewatch.store.failover import salvage
from bikewatch.store.journal import (
    PHASE_CLAIMED, PHASE_DECIDED, Item, Journal, journal_problem, remove_journal_tmps, write_journal,
)
from bikewatch.store.ledger import Ledger
from bikewatch.store.workarea import ADOPTED_PREFIX, LOCK_NAME, STALE_SECONDS

QUARANTINE = "quarantine"
"""STATE/quarantine/: damaged journals, moved aside (never deleted) for a person to look at."""


def quarantine_dir(work_dir: Path) -> Path:
    """STATE/quarantine for a work folder STATE/work/<name> (or a folder adopted inside one)."""
    p = work_dir
    while p.name != "work" and p.parent != p:
        p = p.parent
    return (p.parent if p.name == "work" else work_dir.parent) / QUARANTINE


def quarantine(journal_path: Path, work_dir: Path) -> Path:
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


def finish_damaged(
    journal_path: Path,
    work_dir: Path,
    why: str,
    *,
    inbox: Path,
    output: Path,
    ledger: Ledger,
    digest: Callable[[Path], str] = sha256_file,
    on_return: Callable[[Item, str], None] | None,
    stale_after: float,
) -> BatchOutcome:
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
    moved = quarantine(journal_path, work_dir)
    shown = journal_path  # named where its worker left it, not where recovery adopted it
    if work_dir.name.startswith(ADOPTED_PREFIX):
        shown = work_dir.parent.parent / work_dir.name.removeprefix(ADOPTED_PREFIX) / journal_path.name
    result = BatchOutcome(quarantined=[(str(shown), str(moved), why)])
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
        result.add(finish_batch(journal_path, work_dir, inbox=inbox, output=output, ledger=ledger, digest=digest,
                          on_return=on_return, stale_after=stale_after))
        finished = set(sources)
    target = ledger_of(base, ledger, inbox, BatchOutcome())
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
                            timestamp=utc_now())
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
        if return_one(entry, inbox, rel):
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
                   digest: Callable[[Path], str] = sha256_file) -> Path | None:
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
    digest: Callable[[Path], str] = sha256_file,
    on_return: Callable[[Item, str], None] | None = None,
    stale_after: float = STALE_SECONDS,
) -> BatchOutcome:
    """Settle every journal a dead worker left, return stray files to the inbox, remove the folder.

    Folders it had adopted from workers that died before it (``adopted-*``) are recovered first.
    """
    total = BatchOutcome()
    for sub in sorted(work_dir.iterdir()):
        if sub.name.startswith(ADOPTED_PREFIX) and not sub.is_symlink() and sub.is_dir():
            total.add(recover_dir(sub, inbox=inbox, output=output, ledger=ledger, digest=digest,
                                  on_return=on_return, stale_after=stale_after))
    remove_journal_tmps(work_dir)  # journal rewrites that never completed; the previous versions stand
    for journal_path in sorted(work_dir.glob("*.json")):
        total.add(finish_batch(journal_path, work_dir, inbox=inbox, output=output, ledger=ledger, digest=digest,
                         on_return=on_return, stale_after=stale_after))
    for stray in sorted(work_dir.iterdir()):
        if stray.name == LOCK_NAME:
            continue
        if stat.S_ISDIR(os.lstat(stray).st_mode):
            continue
        # Not named by any journal: cannot happen by our protocol, but never drop bytes.
        return_one(stray, inbox, f"recovered-{stray.name}")
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
        quarantine(work_dir, work_dir)
    return total
