"""Deciding when a candidate file is complete: pure bookkeeping fed with observations and a clock.

A file is *ready* once its size, mtime and ctime have stayed unchanged for the settle time.
A writer's "done" signal shortens it: a close-after-write, or a rename into the inbox (the
upload contract: write under a temporary name, then rename). Any write after that signal
restarts the full settle time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bikewatch.intake.scan import Seen


@dataclass
class _Track:
    seen: Seen
    stable_since: float
    closed: bool = False


def _order_key(track: _Track) -> tuple[float, str]:
    return (track.stable_since, track.seen.rel)


class Readiness:
    """Pure bookkeeping of candidates; feed it observations and a clock."""

    def __init__(self, settle: float, closed_settle: float) -> None:
        self.settle = settle
        self.closed_settle = min(closed_settle, settle)
        self._tracks: dict[str, _Track] = {}
        # Tracks oldest first, kept between calls so that taking a batch from 10,000 waiting
        # files does not sort them all again; entries no longer in _tracks are skipped.
        self._order: list[_Track] = []
        self._sorted = True
        # No candidate can be ready before this (a lower bound: it may be early, never late), so
        # that the loop's frequent "anything ready?" costs nothing while a big dump settles.
        self._due_at = math.inf

    def __len__(self) -> int:
        return len(self._tracks)

    def update(self, seen: Seen, now: float) -> bool:
        """Record an observation; True when it is new or the file changed (its settle time starts now)."""
        track = self._tracks.get(seen.rel)
        if track is None or track.seen.signature != seen.signature:
            new = _Track(seen, now, closed=False)
            self._tracks[seen.rel] = new
            if self._sorted and self._order and _order_key(new) < _order_key(self._order[-1]):
                self._sorted = False  # out of order: sorted once, by the next ready(), not here
            self._order.append(new)
            if self._bloated():
                self._compact()  # a busy writer's superseded tracks pile up between ready() calls
            self._due_at = min(self._due_at, now + self._needed(new))
            return True
        return False

    def _bloated(self) -> bool:
        """Mostly entries that were superseded or forgotten."""
        return len(self._order) > 2 * len(self._tracks) + 64

    def _compact(self) -> None:
        """Sort the order list when it is out of order or mostly entries that were superseded."""
        if not self._sorted or self._bloated():
            self._order = sorted(self._tracks.values(), key=_order_key)
            self._sorted = True

    def mark_closed(self, rel: str) -> None:
        """The writer is done (a close-after-write, or a rename into the inbox): a short settle suffices.

        Only the current observation is marked: a write after it is a new observation,
        which needs the full settle time again until the next such signal."""
        track = self._tracks.get(rel)
        if track is not None:
            track.closed = True
            self._due_at = min(self._due_at, track.stable_since + self.closed_settle)

    def forget(self, rel: str) -> None:
        self._tracks.pop(rel, None)

    def retain(self, present: set[str]) -> None:
        """After a full scan: drop tracks of files that are gone."""
        for rel in [r for r in self._tracks if r not in present]:
            del self._tracks[rel]

    def _needed(self, track: _Track) -> float:
        if not track.seen.regular:
            return 0.0  # links and special files never change by being written
        return self.closed_settle if track.closed else self.settle

    def ready(self, now: float, limit: int | None = None) -> list[Seen]:
        """Candidates unchanged for long enough, oldest first; the first ``limit`` of them when given."""
        if now < self._due_at:
            return []
        self._compact()
        out: list[Seen] = []
        lead, counting = 0, True  # entries forgotten or replaced before the first live one: dropped below
        due_at = math.inf
        for track in self._order:
            if self._tracks.get(track.seen.rel) is not track:
                lead += counting
                continue
            counting = False
            due = track.stable_since + self._needed(track)
            due_at = min(due_at, due)  # ready ones included: a caller may leave them for later
            if now >= due:
                out.append(track.seen)
                if limit is not None and len(out) >= limit:
                    break  # not all seen, but due_at <= now: the next call looks again
        self._due_at = due_at
        if lead:
            del self._order[:lead]
        return out

    def settling(self, rel: str, now: float, quiet: float) -> Seen | None:
        """``rel`` if it is a regular file unchanged for ``quiet`` seconds and not ready yet: worth reading ahead."""
        track = self._tracks.get(rel)
        if track is None or not track.seen.regular:
            return None
        age = now - track.stable_since
        return track.seen if quiet <= age < self._needed(track) else None

    def next_due(self, now: float) -> float | None:
        """Seconds until the next candidate could become ready (None when there is none)."""
        if not self._tracks:
            return None
        if self._due_at > now:
            return self._due_at - now  # maybe early (a file since forgotten), never late
        waits = [t.stable_since + self._needed(t) - now for t in self._tracks.values()]
        return max(0.0, min(waits))
