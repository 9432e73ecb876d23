"""The claim: photos renamed from the inbox into the work folder, and back when they cannot be delivered.

The rename is the claim: of several workers (on one host or many, sharing the inbox) only
one rename of a file succeeds. The journal is written first, so a crash between the two
leaves nothing that recovery cannot finish.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from bikewatch.files import fsync_dir
from bikewatch.store.delivery import numbered_name, rename_noreplace
from bikewatch.store.journal import Item, Journal, JournalDamaged, read_journal, write_journal


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


def return_to_inbox(journal_path: Path, work_dir: Path, *, inbox: Path) -> list[Item]:
    """The output is unusable: send every not-yet-placed file of the batch back to the inbox.

    Files already placed keep their place; their rows are written by the next
    :func:`finish_batch` of this journal, which the caller runs when the output is back.
    """
    try:
        journal = read_journal(journal_path)
    except JournalDamaged:
        return []  # the next finish_batch() quarantines it and saves its files
    items = list(journal.items)
    returned: list[Item] = []
    for i, item in enumerate(items):
        if item.back or not os.path.lexists(work_dir / item.key):
            continue
        items[i] = replace(item, back=item.source)
        returned.append(items[i])
    write_journal(journal_path, replace(journal, items=tuple(items)))
    for item in returned:
        return_one(work_dir / item.key, inbox, item.source)
    return returned


def return_one(work: Path, inbox: Path, rel: str) -> bool:
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
