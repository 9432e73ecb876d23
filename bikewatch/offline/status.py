"""``bikewatch status``: is the service running, what is waiting, what has it done.

A running worker rewrites ``STATE_DIR/status/<worker>-<pid>-<rand>.json``
every few seconds and removes it on a clean exit (see
``Service._write_status_file``). A file whose process is gone (a crash, a
``kill -9``, a power cut) is *stale*. Counts come from the CSV log, so they
cover every worker and every run, not just the current process.

Exit status follows ``systemctl status``: 0 running, 3 not running
(2: the configuration cannot be read).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from bikewatch.clock import parse_timestamp
from bikewatch.exits import Exit
from bikewatch.labels import FOLDERS
from bikewatch.store.ledger import read_rows

REMOTE_FRESH_SECONDS = 120.0
"""A worker on another host (shared inbox) counts as running while its file is this fresh."""


# ----------------------------------------------------------------------------- workers


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists on this host and is not a zombie (killed, not yet reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else (the service user)
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: os.kill's answer is all there is
    return state not in (b"Z", b"X")


BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str | None:
    """This boot's random id: a status file written before a reboot names another one."""
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/PID/stat`` field 22).

    Together with the boot id this names one process for good: a pid is reused, a start
    time on the same boot never is. None when it cannot be read (no /proc, process gone).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            # Field 2 (comm) may hold spaces and parentheses: count from its closing one.
            rest = fh.read().rsplit(b")", 1)[1].split()
        return int(rest[19])  # fields 3.. follow comm; field 22 is the 20th of them
    except (OSError, IndexError, ValueError):
        return None


def identity(pid: int | None = None) -> dict[str, Any]:
    """What a status file records so that ``judge`` can tell this process from a later one with its pid."""
    pid = os.getpid() if pid is None else pid
    return {"boot_id": boot_id(), "start_ticks": start_ticks(pid)}


def is_bikewatch(pid: int) -> bool | None:
    """Does process ``pid``'s command line name bikewatch? None when that cannot be read.

    Only for status files written before they carried an identity: any Python started from
    a path such as ``/opt/bikewatch`` passes, so it is a hint, never proof.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except FileNotFoundError:
        return False if os.path.isdir("/proc/self") else None
    except OSError:
        return None
    return b"bikewatch" in cmdline


@dataclass(frozen=True)
class Worker:
    path: Path
    data: Mapping[str, Any]
    running: bool
    note: str  # why not running, or a caveat

    @property
    def pid(self) -> int:
        try:
            return int(self.data.get("pid", 0))
        except (TypeError, ValueError):
            return 0


def judge(
    data: Mapping[str, Any],
    *,
    hostname: str,
    now: dt.datetime,
    alive: Callable[[int], bool] = pid_alive,
    started: Callable[[int], int | None] = start_ticks,
    boot: Callable[[], str | None] = boot_id,
    ours: Callable[[int], bool | None] = is_bikewatch,
) -> tuple[bool, str]:
    """(running?, note) for one status file's contents.

    On this host a worker runs when its pid is alive *and* is still the process that wrote
    the file: same boot id, same start time. A crash leaves the file behind, and its pid is
    soon reused by another program, which may well be another Python from a ``bikewatch``
    folder, so neither the pid nor a name is an identity.
    """
    try:
        pid = int(data.get("pid", 0))
    except (TypeError, ValueError):
        return False, "status file without a pid"
    host = str(data.get("host", ""))
    if host and host != hostname:
        updated = parse_timestamp(data.get("updated"))
        age = (now - updated).total_seconds() if updated else None
        if age is not None and age <= REMOTE_FRESH_SECONDS:
            return True, f"on host {host}: its pid cannot be checked from here; status {age:.0f} s old"
        return False, f"stale status from pid {pid} on host {host}" + (f", {age:.0f} s old" if age is not None else "")
    if not alive(pid):
        return False, f"stale status from pid {pid}"
    written_boot, written_start = data.get("boot_id"), data.get("start_ticks")
    if written_boot is None and written_start is None:  # written by a version without identities
        if ours(pid) is False:
            return False, f"stale status from pid {pid}; that pid is now another program"
        return True, ""
    this_boot = boot()
    if written_boot is not None and this_boot is not None and written_boot != this_boot:
        return False, f"stale status from pid {pid}, written before the last reboot"
    now_start = started(pid)
    if written_start is not None and now_start is not None and now_start != written_start:
        return False, f"stale status from pid {pid}; that pid is now another program"
    return True, ""


def read_workers(state_dir: Path, *, hostname: str | None = None, now: dt.datetime | None = None,
                 alive: Callable[[int], bool] = pid_alive) -> list[Worker]:
    """Every ``STATE_DIR/status/*.json`` (not the ``.tmp`` being written), judged running or stale."""
    hostname = hostname or os.uname().nodename
    now = now or dt.datetime.now(dt.timezone.utc)
    folder = state_dir / "status"
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json") and not n.startswith("."))
    except OSError:
        return []
    workers = []
    for name in names:
        path = folder / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:  # removed by a clean exit while we looked
            continue
        except (OSError, ValueError) as exc:
            workers.append(Worker(path, {}, False, f"unreadable status file {name}: {exc}"))
            continue
        if not isinstance(data, dict):
            workers.append(Worker(path, {}, False, f"malformed status file {name}"))
            continue
        running, note = judge(data, hostname=hostname, now=now, alive=alive)
        workers.append(Worker(path, data, running, note))
    return workers


# ----------------------------------------------------------------------------- the log


@dataclass
class LogSummary:
    total: collections.Counter[str] = field(default_factory=collections.Counter)
    today: collections.Counter[str] = field(default_factory=collections.Counter)
    last: dict[str, str] | None = None
    last_error: dict[str, str] | None = None
    rows: int = 0


def summarize(rows: Iterable[Mapping[str, str]], today: dt.date) -> LogSummary:
    """Per-label counts today (local date) and in total, the newest row and newest error; pure."""
    s = LogSummary()
    last_when: dt.datetime | None = None
    error_when: dt.datetime | None = None
    for row in rows:
        s.rows += 1
        label = row.get("label", "") or "?"
        s.total[label] += 1
        when = parse_timestamp(row.get("timestamp", ""))
        if when is not None and when.astimezone().date() == today:
            s.today[label] += 1
        # The log is appended in order, but several workers may interleave: keep the newest.
        if last_when is None or (when is not None and when >= last_when):
            s.last, last_when = dict(row), when
        if row.get("error") and (error_when is None or (when is not None and when >= error_when)):
            s.last_error, error_when = dict(row), when
    return s


def count_waiting(inbox: Path, ignore: tuple[str, ...], state_dir: Path) -> int | None:
    """Files in the inbox that bikewatch will take (not ignored); None when it cannot be listed."""
    from bikewatch.intake.scan import scan

    try:
        return sum(1 for _ in scan(inbox, ignore, skip=[state_dir]))
    except OSError:
        return None


# ----------------------------------------------------------------------------- output


def _counts(c: Mapping[str, int]) -> str:
    parts = [f"{k} {c.get(k, 0)}" for k in FOLDERS]
    parts += [f"{k} {v}" for k, v in sorted(c.items()) if k not in FOLDERS]
    return ", ".join(parts) + f"  ({sum(c.values())} files)"


def _local(text: str) -> str:
    when = parse_timestamp(text)
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S") if when else text


def _ago(text: Any, now: dt.datetime) -> str:
    when = parse_timestamp(text)
    if when is None:
        return "?"
    secs = max(0, int((now - when).total_seconds()))
    return f"{secs} s ago" if secs < 120 else f"{secs // 60} min ago" if secs < 7200 else f"{secs // 3600} h ago"


def _short(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def describe_row(row: Mapping[str, str]) -> str:
    conf = row.get("confidence", "")
    conf_text = f" ({float(conf):.3f})" if conf else ""
    src = os.path.basename(row.get("source", ""))
    return f"{_local(row.get('timestamp', ''))}  {src} -> {_short(row.get('destination', ''))}{conf_text}"


def gather(settings: Any, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (also the ``--json`` output)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    workers = read_workers(settings.state_dir, now=now)
    running = [w for w in workers if w.running]
    log = settings.log_path
    summary = summarize(read_rows(log), now.astimezone().date())
    return {
        "running": bool(running),
        "workers": [
            {"file": str(w.path), "running": w.running, "note": w.note, **dict(w.data)} for w in workers
        ],
        "inbox": str(settings.inbox),
        "waiting": count_waiting(settings.inbox, settings.ignore, settings.state_dir),
        "output": str(settings.output),
        "log": str(log),
        "log_exists": log.is_file(),
        "today": dict(summary.today),
        "total": dict(summary.total),
        "last": summary.last,
        "last_error": summary.last_error,
        "checked": now.isoformat(timespec="seconds"),
    }


def format_text(info: Mapping[str, Any], now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    lines: list[str] = []
    live = [w for w in info["workers"] if w["running"]]
    stale = [w for w in info["workers"] if not w["running"]]
    if live:
        lines.append(f"bikewatch: running ({len(live)} worker{'s' if len(live) > 1 else ''})")
        for w in live:
            text = (f"  worker {w.get('worker', '?')}: pid {w.get('pid', '?')} on {w.get('host', '?')}, "
                    f"up since {_local(w.get('started', ''))}, status {_ago(w.get('updated'), now)}")
            lines.append(text + (f"; {w['note']}" if w["note"] else ""))
            if w.get("model"):
                lines.append(f"    model {w['model']}")
            if w.get("output_blocked"):
                lines.append("    OUTPUT BLOCKED: cannot deliver to the output folder; photos wait in the inbox")
            if w.get("inbox_ok") is False:
                lines.append("    INBOX UNAVAILABLE: the inbox cannot be listed")
    elif stale:
        lines.append(f"bikewatch: not running ({'; '.join(w['note'] for w in stale)})")
    else:
        lines.append("bikewatch: not running")
    if live and stale:
        lines.append(f"  also: {'; '.join(w['note'] for w in stale)}")
    waiting = info["waiting"]
    wait_text = "cannot be listed (missing or no permission)" if waiting is None else (
        f"{waiting} file{'' if waiting == 1 else 's'} waiting")
    lines.append(f"inbox       {info['inbox']}: {wait_text}")
    lines.append(f"output      {info['output']}")
    lines.append(f"log         {info['log']}" + ("" if info["log_exists"] else " (not written yet)"))
    lines.append(f"today       {_counts(info['today'])}")
    lines.append(f"total       {_counts(info['total'])}")
    lines.append(f"last file   {describe_row(info['last']) if info['last'] else 'none yet'}")
    err = info["last_error"]
    if err:
        lines.append(f"last error  {_local(err.get('timestamp', ''))}  "
                     f"{os.path.basename(err.get('source', ''))}: {err.get('error', '')}")
    else:
        lines.append("last error  none")
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    from bikewatch.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"bikewatch: error: {exc}", file=sys.stderr)
        return Exit.USAGE
    info = gather(settings)
    if getattr(args, "json", False):
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_text(info))
    return Exit.OK if info["running"] else Exit.NOT_RUNNING
