"""The claimer: which ready files make the next batch, and their claim on the claim thread.

Files are chosen on the main thread (from :class:`~bikewatch.intake.readiness.Readiness`,
with :func:`~bikewatch.service.dispatch.should_dispatch` saying when a batch is worth
sending); the claim itself (journal, renames, fsyncs) runs on a thread of its own, which
then hands the claimed files to the decode stage, so the main loop goes on predicting
meanwhile and a claim never waits behind a delivery's fsyncs.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from bikewatch.decode.prepare import Prepared
from bikewatch.decode.stage import DecodeStage
from bikewatch.intake.readiness import Readiness
from bikewatch.intake.scan import Seen, observe
from bikewatch.service.dispatch import should_dispatch
from bikewatch.service.readahead import ReadAhead, Usable
from bikewatch.store.claim import claim
from bikewatch.store.journal import PHASE_CLAIMED, Item, Journal
from bikewatch.store.workarea import WorkArea

Claim = tuple[Journal, list[Future[Prepared]]]
"""What the claim thread hands back: the journal of the files actually won, and their reads."""


@dataclass
class InFlight:
    """A batch from its claim until it is decided: the claim (a future until it is taken) and its reads."""

    journal: Journal  # as planned; the claim may win fewer files
    path: Path  # the journal, in the work folder of the claim
    started: float
    claimed: Future[Claim]
    early: dict[str, Usable] = field(default_factory=dict)  # read-ahead results, by inbox path


class Claimer:
    """Chooses and claims batches; remembers which inbox paths are taken until their batch is done."""

    def __init__(self, inbox: Path, readiness: Readiness, read_ahead: ReadAhead, decode: DecodeStage, *,
                 max_batch: int, max_wait_ms: float, worker: str, origin: dict[str, str]) -> None:
        self.inbox = inbox
        self.readiness = readiness
        self.read_ahead = read_ahead
        self.decode = decode
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.worker = worker
        self.origin = origin  # written into every journal (see bikewatch.store.failover.origin)
        self.taken: set[str] = set()  # inbox paths claimed or being claimed
        self._ready_since: dict[str, float] = {}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="claim")

    def oldest_ready(self) -> float | None:
        """When the longest-waiting ready file became ready (the loop wakes for its max_wait)."""
        return min(self._ready_since.values()) if self._ready_since else None

    def choose(self, now: float, *, in_flight: int, stopping: bool) -> list[Seen]:
        """The next batch's files, looked at once more just now; empty when no batch is due yet."""
        # Only the oldest max_batch matter: more waiting than that means "send now" anyway.
        limit = self.max_batch + len(self.taken)
        ready = [s for s in self.readiness.ready(now, limit) if s.rel not in self.taken]
        for s in ready:
            self._ready_since.setdefault(s.rel, now)
        live = {s.rel for s in ready}
        for rel in [r for r in self._ready_since if r not in live]:
            del self._ready_since[rel]
        if not ready:
            return []
        oldest_wait = now - min(self._ready_since[s.rel] for s in ready)
        # With a batch already in flight there is no reason to wait for this one to fill.
        max_wait = 0.0 if in_flight else self.max_wait
        if not should_dispatch(len(ready), oldest_wait, max_batch=self.max_batch, max_wait=max_wait,
                               stopping=stopping):
            return []
        # Look once more before claiming: the last observation can be older than the settle
        # time (polling sees a file once per poll interval), and a slow writer may have
        # appended since. Taking it now would classify, and move, a half-written file.
        return [fresh for s in ready[: self.max_batch] if (fresh := self._unchanged(s)) is not None]

    def _unchanged(self, s: Seen) -> Seen | None:
        """A fresh lstat of ``s`` when it still describes the file; otherwise None, and its settle time starts again."""
        seen = observe(self.inbox, s.rel)
        if seen is not None and seen.signature == s.signature and seen.regular == s.regular:
            return seen
        self._ready_since.pop(s.rel, None)
        if seen is None:
            self.readiness.forget(s.rel)
        else:
            self.readiness.update(seen, time.monotonic())
        return None

    def claim(self, chosen: list[Seen], work: WorkArea, model: str, now: float) -> InFlight:
        """Start the claim of ``chosen`` on the claim thread; the batch is in flight from now on."""
        batch_id = work.new_batch_id()
        items = tuple(Item(key=f"{batch_id}.{i:04d}", source=s.rel) for i, s in enumerate(chosen))
        journal = Journal(batch=batch_id, phase=PHASE_CLAIMED, worker=self.worker, model=model, items=items,
                          **self.origin)
        path = work.journal_path(batch_id)
        early: dict[str, Usable] = {}
        for s in chosen:
            self.readiness.forget(s.rel)
            self._ready_since.pop(s.rel, None)
            usable = self.read_ahead.take(s, model)  # s: an lstat taken just now
            if usable is not None:
                early[s.rel] = usable
        claimed = self._thread.submit(self._claim, journal, path, work.dir, early)
        self.taken.update(it.source for it in journal.items)
        return InFlight(journal, path, now, claimed, early)

    def _claim(self, journal: Journal, path: Path, work_dir: Path, early: dict[str, Usable]) -> Claim:
        """On the claim thread: claim the batch's files, then queue the ones not read ahead for decoding."""
        journal = claim(self.inbox, work_dir, journal, path)
        return journal, self.decode.start(journal, work_dir, early)

    def claimed(self, batch: InFlight) -> Claim:
        """On the main thread: the claim's result (raises its OSError); files it did not win are free again."""
        try:
            journal, futures = batch.claimed.result()
        except OSError:
            self.release(it.source for it in batch.journal.items)
            raise
        won = {it.source for it in journal.items}
        self.release(it.source for it in batch.journal.items if it.source not in won)
        return journal, futures

    def forget(self, rel: str) -> None:
        """A file that left the inbox is not waiting any more."""
        self._ready_since.pop(rel, None)

    def release(self, sources: Iterable[str]) -> None:
        """These inbox paths are no longer ours to take care of (delivered, returned, or lost to another)."""
        self.taken.difference_update(sources)

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True)

