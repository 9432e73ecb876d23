"""Recovery in the running service: dead workers' folders finished at start-up and at rescans.

The procedure is :func:`bikewatch.store.recovery.recover_dir`; this module decides when it
runs, what happens when the output cannot take the files (they go back to the inbox; the
adopted folder waits, with :class:`~bikewatch.service.backoff.Backoff`), and hands every
delivered file to :class:`~bikewatch.service.accounting.Accounting` like any other.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from bikewatch.service.accounting import Accounting
from bikewatch.service.backoff import Backoff
from bikewatch.store.claim import return_to_inbox
from bikewatch.store.failover import remove_status_of, sweep_status_files
from bikewatch.store.journal import Item, journals
from bikewatch.store.ledger import Ledger
from bikewatch.store.recovery import recover_dir
from bikewatch.store.workarea import ADOPTED_PREFIX, WorkArea


class Recoverer:
    """Finds and finishes dead workers' work; remembers our own retired work folders."""

    def __init__(self, *, inbox: Path, output: Path, state_dir: Path, ledger: Ledger, stale_after: float,
                 accounting: Accounting, backoff: Backoff, log: Any) -> None:
        self.inbox = inbox
        self.output = output
        self.state_dir = state_dir
        self.ledger = ledger
        self.stale_after = stale_after
        self.accounting = accounting
        self.backoff = backoff
        self.log = log
        self.left = False  # a dead worker's folder could not be recovered yet (output unusable)
        self.retired: set[str] = set()  # our own earlier work folders, gone with the inbox's filesystem

    def recover(self, work: WorkArea) -> None:
        def on_return(item: Item, why: str) -> None:
            self.log.info("returned to inbox", source=item.source, reason=why)

        self.left = False
        try:
            self._recover_each(work, on_return)
        except OSError as exc:
            # Our work folder or the state folder cannot be listed: the inbox's filesystem went
            # away (or was swapped) under us, even between creating the folder and looking in
            # it. Nothing was found to be left; the next look (the periodic one, or a new work
            # folder's) finds whatever is there then. Crashing here would stop the whole service.
            self.log.warning("cannot look for stopped workers' folders now; will look again", error=str(exc))
        sweep_status_files(self.state_dir, self.stale_after)

    def _recover_each(self, work: WorkArea, on_return: Callable[[Item, str], None]) -> None:
        """Every dead worker's folder, taken over and finished; OSError only when they cannot be listed."""
        for folder in work.orphaned_dirs(retired=self.retired):
            work.heartbeat(time.monotonic())  # a long recovery must not make us look dead to other hosts
            try:
                res = recover_dir(folder, inbox=self.inbox, output=self.output, ledger=self.ledger,
                                  on_return=on_return, stale_after=self.stale_after)
            except OSError as exc:
                # The output (or the CSV) cannot take them now; crashing here would only loop.
                # The folder is ours now (adopted): send what was not placed back to the inbox;
                # placed files whose rows are owed stay journalled until a retry succeeds.
                self.left = True
                for journal_path in journals(folder):
                    try:
                        return_to_inbox(journal_path, folder, inbox=self.inbox)
                    except OSError:
                        pass
                self.backoff.fail(time.monotonic(), self.log, error=str(exc), folder=folder.name)
                continue
            except Exception as exc:  # noqa: BLE001 - no state on disk may stop the service
                self.log.exception("cannot recover the work of a stopped worker; left for a later start",
                                   folder=folder.name, error=str(exc))
                continue
            self.accounting.finished(res, "recovery")
            dead = folder.name.removeprefix(ADOPTED_PREFIX)
            self.log.info("recovered work of a stopped worker", folder=dead,
                          delivered=len(res.delivered), returned=len(res.returned),
                          **({"csv": sorted({c for _, c in res.elsewhere})} if res.elsewhere else {}))
            remove_status_of(self.state_dir, dead)
