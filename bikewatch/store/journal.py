"""The batch journal: what a worker has claimed and decided, durable before anything moves.

Claim-then-deliver, in the spirit of Maildir, is what makes a crash harmless. Each
worker owns a work folder (:mod:`bikewatch.store.workarea`) on the inbox's filesystem. A
batch goes through these steps, each durable before the next begins:

1. **claimed** (:mod:`bikewatch.store.claim`): the journal ``<batch>.json`` lists each
   item's key and inbox path; then each photo is renamed into the work folder as ``<key>``.
   The rename is the claim: of several workers only one rename succeeds.
2. **decided**: after classification the journal is rewritten with each item's label,
   probabilities, digest and chosen destination (:func:`bikewatch.decision.decide_batch`).
3. **delivered** (:mod:`bikewatch.store.deliver`): each file is placed with a no-clobber
   rename, the CSV rows of the batch are appended in one write, fsynced, and the journal
   is deleted.

:func:`bikewatch.store.deliver.finish_batch` finishes a batch from whatever state it is in,
so it is also the recovery procedure (:mod:`bikewatch.store.recovery`), which takes over
dead workers' folders. This module is the journal itself: its records, how it is
written and read back, and what makes one damaged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from bikewatch.files import fsync_dir, replacing
from bikewatch.store.failover import safe_rel

PHASE_CLAIMED = "claimed"
PHASE_DECIDED = "decided"
JOURNAL_TMP_GLOBS = (".*.json.tmp-*", "*.json.tmp")
"""Journal rewrites that never completed (:func:`write_journal`'s temporary, and the name before it):
the previous version stands, so recovery and a closing work area delete them."""


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


def write_journal(path: Path, journal: Journal) -> None:
    """Atomic and durable: a temporary beside it, fsync, rename, fsync the folder."""
    with replacing(path, durable=True) as tmp:
        tmp.write_text(journal.to_json(), encoding="ascii")


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


def remove_journal(path: Path) -> None:
    """The last step of a batch: its journal gone, durably."""
    os.unlink(path)
    fsync_dir(path.parent)


def journals(work_dir: Path) -> list[Path]:
    """The journals in a work folder, oldest batch first."""
    return sorted(work_dir.glob("*.json"))


def remove_journal_tmps(work_dir: Path) -> None:
    """Delete journal rewrites that never completed (see :data:`JOURNAL_TMP_GLOBS`)."""
    for pattern in JOURNAL_TMP_GLOBS:
        for tmp in work_dir.glob(pattern):
            if tmp.is_file() and not tmp.is_symlink():
                os.unlink(tmp)
