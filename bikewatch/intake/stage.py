"""Intake as one stage: the inbox's hints and scans become files that stopped changing.

The loop asks it three things: apply the hints that arrived (:meth:`Intake.take_hints`),
look at the whole inbox (:meth:`Intake.full_scan`), and which files are ready
(:attr:`Intake.readiness`, read by the claimer). It tells read-ahead what it sees through
the :class:`Follower` it is given, so the two never disagree about which files exist.
Events are hints, the scan is the truth: a dead watcher or a lost event costs a rescan,
never a file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Container
from pathlib import Path
from typing import Any, Protocol

from bikewatch.intake.hints import Hints
from bikewatch.intake.readiness import Readiness
from bikewatch.intake.scan import is_ignored, mount_fstype, needs_polling, observe, scan
from bikewatch.intake.watcher import InboxWatcher


class Follower(Protocol):
    """What intake tells about the files it sees (read-ahead follows them)."""

    def noticed(self, rel: str, now: float) -> None: ...
    def forget(self, rel: str) -> None: ...
    def retain(self, present: set[str]) -> None: ...


class Intake:
    """The inbox watcher (or polling), the scans, and the readiness of every file not yet claimed."""

    def __init__(self, inbox: Path, hints: Hints, *, state_dir: Path, ignore: tuple[str, ...], settle_seconds: float,
                 closed_settle_seconds: float, poll: str, poll_interval_seconds: float, rescan_seconds: float,
                 follower: Follower, on_gone: Callable[[str], None], log: Any) -> None:
        self.inbox = inbox
        self.state_dir = state_dir
        self.ignore = ignore
        self.hints = hints  # the watcher's hand-over; its wake event is what the loop sleeps on
        self.readiness = Readiness(settle_seconds, closed_settle_seconds)
        self.follower = follower
        self.on_gone = on_gone  # a file that went away before it was claimed
        self.log = log
        self._poll = poll
        self._poll_interval = poll_interval_seconds
        self._rescan_interval = rescan_seconds
        self.watcher: InboxWatcher | None = None
        self.polling = False
        self.ok = True  # the last scan could list the inbox

    @property
    def scan_interval(self) -> float:
        """Seconds between full scans: the poll interval when polling, else the safety-net rescan."""
        return self._poll_interval if self.polling else self._rescan_interval

    def start_watching(self) -> None:
        """inotify where it works; polling on network filesystems (or as configured)."""
        fstype = mount_fstype(self.inbox)
        self.polling = self._poll == "yes" or (self._poll == "auto" and needs_polling(fstype))
        self.log.info("watching inbox", inbox=str(self.inbox), fstype=fstype, mode="poll" if self.polling else "inotify",
                      poll_interval_s=self._poll_interval if self.polling else None)
        if not self.polling:
            self._start_watcher()

    def _start_watcher(self) -> None:
        self.watcher = InboxWatcher(self.inbox, self.hints, self.state_dir)
        self.watcher.start()

    def watcher_died(self) -> bool:
        return self.watcher is not None and not self.watcher.alive

    def take_hints(self, now: float, taken: Container[str]) -> bool:
        """Look at every path the watcher hinted at; True when it asked for a full scan."""
        paths, closed, rescan = self.hints.take()
        for rel in sorted(paths):  # in Readiness's order (same clock, then name): nothing to re-sort
            self._observe(rel, now, taken)
        for rel in closed:
            self.readiness.mark_closed(rel)
        return rescan

    def _observe(self, rel: str, now: float, taken: Container[str]) -> None:
        if rel in taken:
            return
        seen = observe(self.inbox, rel)
        if seen is None:
            self.readiness.forget(rel)
            self.follower.forget(rel)
            self.on_gone(rel)
        elif not any(is_ignored(part, self.ignore) for part in rel.split(os.sep)):
            if self.readiness.update(seen, now):
                self.follower.noticed(rel, now)

    def full_scan(self, now: float, taken: Container[str], *, complete_after: float | None = None) -> bool:
        """List the whole inbox; False when it cannot be listed (nothing is forgotten then).

        ``complete_after``: a file that has sat still for longer than this is complete at once
        (``bikewatch sort`` on a dump).
        """
        try:
            found = list(scan(self.inbox, self.ignore, skip=[self.state_dir]))
        except OSError as exc:
            if self.ok:
                self.log.error("inbox unavailable; will retry, nothing is forgotten", inbox=str(self.inbox),
                               error=exc.strerror or str(exc))
            self.ok = False
            return False
        if not self.ok:
            self.log.info("inbox available again", inbox=str(self.inbox))
            self.ok = True
            if self.watcher is not None:  # its watches were on the folders that went away
                self.watcher.stop()
                self._start_watcher()
        present = set()
        for seen in found:
            if seen.rel in taken:
                continue
            present.add(seen.rel)
            if self.readiness.update(seen, now):
                self.follower.noticed(seen.rel, now)
            if complete_after is not None and time.time() - seen.mtime_ns / 1e9 > complete_after:
                self.readiness.mark_closed(seen.rel)
        self.readiness.retain(present)
        self.follower.retain(present)
        return True

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
