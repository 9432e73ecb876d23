"""The deliverer: decided batches delivered on the deliver thread, failures owed and retried.

A decided batch's journal write and delivery (all fsyncs) run on the deliver thread while the
main loop predicts the next batch: at most one at a time, joined before the next batch is
decided (its names are chosen against the files this one places). A batch the output or the
CSV cannot take goes back to the inbox where its files were not placed yet, and its journal
is *owed*: retried with :class:`~bikewatch.service.backoff.Backoff` until it is finished,
while nothing new is taken. Every delivered file, however delivered, is then accounted for
by :class:`~bikewatch.service.accounting.Accounting`.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from bikewatch.service.accounting import Accounting
from bikewatch.service.backoff import Backoff
from bikewatch.service.claimer import InFlight
from bikewatch.store.claim import return_to_inbox
from bikewatch.store.deliver import BatchOutcome, DeliveryError, deliver_decided, finish_batch
from bikewatch.store.journal import Journal, write_journal
from bikewatch.store.ledger import Ledger


@dataclass
class Delivering:
    """The batch on the deliver thread."""

    batch: InFlight
    journal: Journal  # decided
    classified: int
    infer_ms: float
    future: Future[BatchOutcome]


class Deliverer:
    """Delivers decided batches (one on its thread at a time) and retries what is owed."""

    def __init__(self, *, inbox: Path, output: Path, ledger: Ledger, accounting: Accounting, backoff: Backoff,
                 log: Any, release: Callable[[Iterable[str]], None]) -> None:
        self.inbox = inbox
        self.output = output
        self.ledger = ledger
        self.accounting = accounting
        self.backoff = backoff
        self.log = log
        self.release = release  # the claimer's: these inbox paths are done with
        self.owed: list[Path] = []  # journals whose delivery must be retried (rows owed, files to return)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deliver")
        self._delivering: Delivering | None = None

    def start(self, batch: InFlight, journal: Journal, work_dir: Path, classified: int, infer_ms: float) -> None:
        """Hand a decided batch to the deliver thread (the previous one must have been joined)."""
        assert self._delivering is None, "join() the previous delivery first"
        future = self._thread.submit(self._deliver, batch.path, journal, work_dir)
        self._delivering = Delivering(batch, journal, classified, infer_ms, future)

    def _deliver(self, path: Path, journal: Journal, work_dir: Path) -> BatchOutcome:
        """On the deliver thread: record the decision durably, then place the files and write the rows."""
        write_journal(path, journal)
        return deliver_decided(path, journal, work_dir, inbox=self.inbox, output=self.output, ledger=self.ledger)

    def join(self, work_dir: Path) -> bool:
        """Wait for the batch on the deliver thread (if any) and account for it; True when one was delivered."""
        if self._delivering is None:
            return False
        d, self._delivering = self._delivering, None
        sources = [it.source for it in d.journal.items]
        try:
            result = d.future.result()
        except DeliveryError as exc:
            self._failed(d.batch.path, work_dir, exc)
            self.release(sources)
            return False
        except OSError as exc:
            # The work area itself failed (inbox filesystem trouble): leave the journal for retry.
            self.log.error("cannot record batch; will retry", error=str(exc), batch=d.journal.batch)
            self.owe(d.batch.path, time.monotonic())
            self.release(sources)
            return False
        self.release(sources)
        if self.backoff.recovered():
            self.log.info("output available again", output=str(self.output))
        self.accounting.batch(len(d.journal.items), time.monotonic() - d.batch.started)
        self.accounting.finished(result)
        self.log.info("batch", size=len(d.journal.items), classified=d.classified, read_ahead=len(d.batch.early),
                      infer_ms=round(d.infer_ms, 1), total_ms=round((time.monotonic() - d.batch.started) * 1000, 1))
        return True

    def owe(self, journal_path: Path, now: float) -> None:
        """This batch must be finished by a retry (a claim cut short, a journal that could not be written)."""
        self.owed.append(journal_path)
        self.backoff.block(now)

    def decline(self, journal_path: Path, work_dir: Path, sources: Iterable[str]) -> None:
        """A claimed batch while rows are owed: place nothing more; its files go back to the inbox.

        The journal still says "claimed": finishing it returns the files, as the failed
        batch's were; if even that fails, the retry does it.
        """
        try:
            res = finish_batch(journal_path, work_dir, inbox=self.inbox, output=self.output, ledger=self.ledger)
            self.accounting.finished(res, "retry")  # a claimed journal delivers none, but one path
        except OSError:
            self.owed.append(journal_path)
        self.release(sources)

    def _failed(self, journal_path: Path, work_dir: Path, exc: DeliveryError) -> None:
        try:
            returned = return_to_inbox(journal_path, work_dir, inbox=self.inbox)
        except OSError:  # the inbox (with our work folder) is away too: the retry finishes the journal
            returned = []
        self.owed.append(journal_path)
        self.backoff.fail(time.monotonic(), self.log, error=str(exc), returned=len(returned))

    def retry(self, now: float, work_dir: Path) -> bool:
        """Try every owed journal again; True when something was delivered."""
        still: list[Path] = []
        delivered = False
        for path in self.owed:
            if path.parent != work_dir:
                # A batch of a work folder that vanished and was replaced while the batch was in
                # flight: recovery takes its journal if (when) that filesystem comes back.
                self.log.debug("retry left to recovery", journal=str(path))
                continue
            if not path.exists():
                if not path.parent.is_dir():
                    still.append(path)  # the inbox (with our work folder) is away; it may come back
                continue
            try:
                res = finish_batch(path, work_dir, inbox=self.inbox, output=self.output, ledger=self.ledger)
            except OSError as exc:
                still.append(path)
                self.log.debug("retry failed", error=str(exc))
                continue
            self.accounting.finished(res, "retry")
            delivered = delivered or bool(res.delivered)
        self.owed = still
        if still:
            self.backoff.block(now)
        return delivered

    def forget_folder(self, old_dir: Path) -> None:
        """Batches journalled in a vanished work folder went with it; waiting for them would block for ever."""
        self.owed = [p for p in self.owed if p.parent != old_dir]

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True)
