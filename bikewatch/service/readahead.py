"""Reading ahead: read and classify files while they settle, so the settle time is not idle time.

A file with no "done" signal from its writer (found by a scan: at start-up, in a folder
moved in, or on a polled network share) must sit still for ``settle_seconds`` before
bikewatch takes it, and in a big dump the cores would idle all that while. (A file
closed after writing or renamed into the inbox needs only ``closed_settle_seconds``,
too short to read ahead.) Reading a file
changes nothing, so the service reads, decodes and classifies files that are still
settling, and keeps each result with the signature the read vouched for (size,
mtime, ctime, inode: :data:`bikewatch.intake.scan.Signature`; see
:func:`bikewatch.decode.prepare.signature_of`).

When the file is claimed, a result is used only if the lstat taken just before the
claim shows that very signature; otherwise the claimed file is read again as if
nothing had been read ahead. Nothing is moved or recorded early, and a file that
changed after one read-ahead is not read ahead again (a slow writer would make every
read wasted work).

This module is bookkeeping only: the service owns the threads and the model.
"""

from __future__ import annotations

import collections
import functools
import itertools
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from bikewatch.decode.prepare import Prepared
from bikewatch.intake.scan import Seen

QUIET_SECONDS = 0.1
"""A file is read ahead once it has been unchanged this long (a copy in progress changes every few ms)."""


@dataclass
class Early:
    """One file read ahead: in flight, then its result (array until classified, then probabilities)."""

    seen: Seen
    future: Future[Prepared] | None
    result: Prepared | None = None  # without its array
    array: np.ndarray | None = None  # until classified
    probs: np.ndarray | None = None  # (2,), mountain then road
    model: str = ""


@dataclass(frozen=True)
class Usable:
    """A read-ahead result handed to a claim: the file's Prepared, and probabilities when known."""

    prepared: Prepared
    probs: np.ndarray | None
    model: str


class ReadAhead:
    """Files read ahead, by path relative to the inbox.

    Used from the service's main thread, except :meth:`_finished`, which a decode proxy thread
    calls; every step costs the same however many files wait (no scans of them all).
    """

    def __init__(self, limit: int, reading_max: int, arrays_max: int, wake: Callable[[], None] = lambda: None) -> None:
        self.limit = limit
        self.reading_max = reading_max
        self.arrays_max = arrays_max
        self._wake = wake
        self._entries: dict[str, Early] = {}
        self._queue: collections.deque[tuple[float, str]] = collections.deque()  # (when quiet enough, path)
        self._reading: set[str] = set()
        self._done: collections.deque[tuple[str, Future[Prepared]]] = collections.deque()
        self._unclassified: dict[str, Early] = {}  # insertion order: oldest first
        self._changed: set[str] = set()  # changed after a read-ahead: read at the claim only
        self.used = 0
        self.wasted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def noticed(self, rel: str, now: float) -> None:
        """A file appeared or changed at ``now``: a candidate once it has been quiet for QUIET_SECONDS."""
        if self.limit > 0 and rel not in self._changed:
            self._queue.append((now + QUIET_SECONDS, rel))

    def room(self) -> int:
        """How many more reads may start now."""
        if self.limit <= 0:
            return 0
        reading = len(self._reading)
        return max(0, min(self.limit - len(self._entries), self.reading_max - reading,
                          self.arrays_max - len(self._unclassified) - reading))

    def due(self, now: float) -> str | None:
        """The next path quiet for long enough, taken off the queue; None when there is none yet."""
        if self._queue and self._queue[0][0] <= now:
            return self._queue.popleft()[1]
        return None

    def next_due(self, now: float) -> float | None:
        """Seconds until the next candidate is quiet enough, when a read could start (None: nothing to wait for)."""
        if not self._queue or self.room() <= 0:
            return None
        return max(0.0, self._queue[0][0] - now)

    def wanted(self, seen: Seen) -> bool:
        """Should ``seen`` be read ahead? Not twice for one signature, and never for a slow writer."""
        if seen.rel in self._changed:
            return False
        entry = self._entries.get(seen.rel)
        if entry is None:
            return True
        if entry.seen.signature == seen.signature:
            return False
        # Changed since it was read ahead: drop the result; it will be read at the claim.
        self._drop(seen.rel)
        self._changed.add(seen.rel)
        return False

    def start(self, seen: Seen, future: Future[Prepared]) -> None:
        self._drop(seen.rel)
        self._entries[seen.rel] = Early(seen, future)
        self._reading.add(seen.rel)
        future.add_done_callback(functools.partial(self._finished, seen.rel))

    def _finished(self, rel: str, future: Future[Prepared]) -> None:
        self._done.append((rel, future))  # deque.append is atomic: safe from a decode proxy thread
        self._wake()

    def harvest(self) -> None:
        """Collect finished reads; a read that cannot vouch for its file is dropped."""
        while self._done:
            rel, future = self._done.popleft()
            entry = self._entries.get(rel)
            if entry is None or entry.future is not future:
                continue  # dropped meanwhile
            entry.future = None
            self._reading.discard(rel)
            try:
                prepared = None if future.cancelled() else future.result()
            except Exception:  # noqa: BLE001 - the claim reads the file again and reports it
                prepared = None
            if prepared is None or prepared.signature is None or prepared.signature != entry.seen.signature:
                self._drop(rel)
                continue
            entry.result = replace(prepared, array=None)
            if prepared.array is not None:
                entry.array = prepared.array
                self._unclassified[rel] = entry

    def reading(self) -> int:
        return len(self._reading)

    def unclassified(self, limit: int) -> list[Early]:
        """Up to ``limit`` read-ahead arrays still waiting for the model, oldest first."""
        return list(itertools.islice(self._unclassified.values(), limit))

    def classified(self, entries: list[Early], probs: np.ndarray, model: str) -> None:
        """Record the model's answers and let the arrays go (memory stays small however many wait)."""
        for entry, p in zip(entries, probs):
            entry.probs = np.asarray(p, dtype=np.float32)
            entry.model = model
            entry.array = None
            self._unclassified.pop(entry.seen.rel, None)

    def take(self, fresh: Seen, model: str) -> Usable | None:
        """The result for a file about to be claimed, if it still describes the file (``fresh``: an lstat now).

        A result classified by another ``model`` than the current one, with its array gone, is no use.
        """
        self._changed.discard(fresh.rel)
        entry = self._entries.get(fresh.rel)
        if entry is None:
            return None
        self._drop(fresh.rel, wasted=False)
        if entry.result is None or entry.result.signature != fresh.signature:
            self.wasted += 1
            return None
        if entry.result.error == "" and entry.array is None and (entry.probs is None or entry.model != model):
            self.wasted += 1
            return None
        self.used += 1
        prepared = entry.result if entry.array is None else replace(entry.result, array=entry.array)
        return Usable(prepared, entry.probs, entry.model)

    def forget(self, rel: str) -> None:
        self._drop(rel)
        self._changed.discard(rel)

    def retain(self, present: set[str]) -> None:
        """After a full scan: drop files that are gone."""
        for rel in [r for r in self._entries if r not in present]:
            self._drop(rel)
        self._changed &= present

    def _drop(self, rel: str, *, wasted: bool = True) -> None:
        entry = self._entries.pop(rel, None)
        if entry is None:
            return
        self.wasted += wasted
        self._reading.discard(rel)
        self._unclassified.pop(rel, None)
        if entry.future is not None:
            entry.future.cancel()  # a read still queued need not run
