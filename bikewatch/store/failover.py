"""Another host finishes a dead worker's batch: whose CSV, and what a damaged journal still says.

Two questions recovery asks when the journal it finishes was written elsewhere:

* **Which CSV?** Each journal names the CSV its writer appends to, as the writer saw it, and,
  when other hosts can reach that CSV through the shared inbox, the same path relative to the
  inbox. Recovery writes the batch's rows into *that* CSV, checking the ids there, so a file
  has exactly one row in exactly one CSV whichever host recovers it. A CSV that only the dead
  host could see (its local disk) cannot be checked: the rows go to the recovering worker's
  own CSV, and the reason is returned for a log line.
* **What is left of a damaged journal?** A journal cut off mid-write (a full disk, a share that
  does not honour ``fsync``) still holds its first items whole; :func:`salvage` reads back what
  it can, so their files go back under their own names, or are finished as decided.

Status files go with their workers: :func:`remove_status_of` when a dead worker's folder is
recovered, :func:`sweep_status_files` for any left without a folder.

:func:`salvage` and :func:`safe_rel` are pure; the others look at (or change) the disk.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from bikewatch.intake.scan import mount_fstype, needs_polling


def _shared_with_inbox(path: Path, inbox: Path) -> bool:
    """Can another host that mounts the inbox reach ``path`` the same way? (Same filesystem, or a network one.)"""
    probe = path if path.exists() else path.parent
    try:
        if os.stat(probe).st_dev == os.stat(inbox).st_dev:
            return True
    except OSError:
        return False
    return needs_polling(mount_fstype(probe))


def origin(inbox: Path, ledger: Path, host: str) -> dict[str, str]:
    """The journal fields that say where its batch is recorded (see :class:`bikewatch.store.journal.Journal`)."""
    inbox, ledger = Path(os.path.abspath(inbox)), Path(os.path.abspath(ledger))
    rel = os.path.relpath(ledger, inbox) if _shared_with_inbox(ledger, inbox) else ""
    return {"host": host, "inbox": str(inbox), "ledger": str(ledger), "ledger_rel": rel}


def locate_ledger(*, host: str, ledger: str, ledger_rel: str, our_host: str, our_inbox: Path,
                  our_ledger: Path) -> tuple[Path, str]:
    """The CSV a journal's batch belongs in, as seen from here, and why it is ours when it should not be.

    Returns ``(path, "")`` when the writer's CSV is reachable (or is ours anyway), and
    ``(our_ledger, reason)`` when it is not: then rows the dead worker had written there
    cannot be checked, and the reason says so.
    """
    if not ledger:
        return our_ledger, ""  # a journal from before journals named their CSV
    if host == our_host:
        return Path(ledger), ""  # this machine: the path means what it meant to the writer
    if not ledger_rel:
        return our_ledger, f"the CSV {ledger} is on a disk of host {host} that is not shared with the inbox"
    candidate = Path(os.path.normpath(our_inbox / ledger_rel))
    if candidate == our_ledger:
        return our_ledger, ""
    # Not yet there is fine (the worker died before its first row): its folder is, on the share.
    if (candidate.is_file() or (not os.path.lexists(candidate) and candidate.parent.is_dir())) \
            and _shared_with_inbox(candidate, our_inbox):
        return candidate, ""
    return our_ledger, f"the CSV {ledger} of host {host} is not at {candidate} from here"


# ----------------------------------------------------------------------------- damaged journals

_FIELD = re.compile(r'"(batch|phase|worker|model|host|inbox|ledger|ledger_rel)":("(?:[^"\\]|\\.)*")')
_ITEM_START = re.compile(r'\{"key":')


def safe_rel(path: Any) -> bool:
    """A relative path that stays inside the folder it is joined to; pure."""
    if not isinstance(path, str) or not path or "\0" in path or os.path.isabs(path):
        return False
    parts = path.split("/")
    return all(p not in ("", ".", "..") for p in parts)


def salvage(text: str) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The header fields and the complete item objects still readable in a damaged journal; pure.

    The header comes before the items when written (see ``Journal.to_json``), so a journal cut
    off anywhere in its items keeps it; each item is a flat JSON object read on its own.
    """
    header: dict[str, str] = {}
    items_at = text.find('"items":')
    head = text if items_at < 0 else text[:items_at]
    for m in _FIELD.finditer(head):
        try:
            value = json.loads(m.group(2))
        except ValueError:
            continue
        if isinstance(value, str):
            header.setdefault(m.group(1), value)
    items: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    for m in _ITEM_START.finditer(text):
        try:
            obj, _end = decoder.raw_decode(text, m.start())
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("key"), str):
            items.append(obj)
    return header, items


# ----------------------------------------------------------------------------- status files


def remove_status_of(state_dir: Path, name: str) -> None:
    """A dead worker's status file (named like its work folder, see ``Service._write_status_file``) goes with it."""
    folder = state_dir / "status"
    for path in (folder / f"{name}.json", *folder.glob(f".{glob.escape(name)}.json.tmp*")):
        try:
            os.unlink(path)
        except OSError:
            pass


def _worker_of(status_name: str) -> str:
    """The work folder a status file (or its temporary, ``.NAME.json.tmp-PID``) belongs to; pure."""
    return re.sub(r"\.json(\.tmp(-\d+)?)?$", "", status_name.removeprefix("."))


def sweep_status_files(state_dir: Path, stale_after: float) -> None:
    """Status files, damaged ones too, whose worker has no work folder and that nobody updated for ``stale_after``.

    A live worker always has its work folder, and rewrites its status file every few seconds.
    """
    folder = state_dir / "status"
    try:
        names = os.listdir(folder)
        live = set(os.listdir(state_dir / "work"))
    except OSError:
        return
    now = time.time()
    for name in names:
        if _worker_of(name) in live:
            continue
        path = folder / name
        try:
            if now - os.lstat(path).st_mtime > stale_after:
                os.unlink(path)
        except OSError:
            pass
