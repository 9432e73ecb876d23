"""Accounting: the one path every delivered file takes, however it was delivered.

A file can reach its folder in three ways: in its own batch (the normal path), by a retry
of a batch whose output or CSV failed (its rows were owed), or by start-up recovery of a
dead worker's batch. Each must count the same: the counts and reasons that ``status`` and
``STATUS=`` show, the metrics, one log line per file, and ``on_batch`` (``bikewatch
sort``'s progress bar and summary). Before this module the retry and recovery paths each
counted differently, or not at all, and ``sort`` undercounted after an outage.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

from bikewatch.service.metrics import Metrics
from bikewatch.store.deliver import BatchOutcome
from bikewatch.store.journal import Item

How = Literal["batch", "retry", "recovery"]
"""How a file was delivered: ``batch`` is the normal path; the others are logged as such."""


@dataclass
class Counts:
    """What this process has delivered so far (``status``, ``STATUS=``, the stop line)."""

    by_label: collections.Counter[str] = field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    batches: int = 0
    last_file: str = ""
    last_error: str = ""


class Accounting:
    """Counts, reasons, metrics, per-file log lines and ``on_batch`` for every delivered file.

    Runs on the main thread only (the deliverer thread hands its results back first), so
    nothing here needs a lock.
    """

    def __init__(self, metrics: Metrics, log: Any, on_batch: Callable[[list[Item]], None] | None = None,
                 *, log_path: str = "") -> None:
        self.metrics = metrics
        self.log = log
        self.log_path = log_path  # our CSV, named in the warning about a dead worker's unreachable one
        self.on_batch = on_batch
        self.counts = Counts()

    def batch(self, size: int, seconds: float) -> None:
        """A batch of this process finished (claimed, classified and delivered here): its size and time."""
        self.counts.batches += 1
        self.metrics.observe_batch(size, seconds)

    def delivered(self, items: Iterable[Item], how: How = "batch") -> None:
        """Files now in their folders with their CSV rows: count each, log each, tell ``on_batch``."""
        items = list(items)
        if not items:
            return
        for (label, error), n in collections.Counter((it.label, it.error) for it in items).items():
            self.metrics.count(label, error, n)
        extra = {} if how == "batch" else {"delivered_by": how}
        for item in items:
            self.counts.by_label[item.label] += 1
            self.counts.last_file = item.dest
            if item.error:
                self.counts.reasons[item.error.split(":")[0]] += 1
                self.counts.last_error = f"{item.source}: {item.error}"
                self.log.warning("rejected", source=item.source, destination=item.dest, reason=item.error, **extra)
            else:
                self.log.info("sorted", source=item.source, destination=item.dest, label=item.label,
                              confidence=round(item.confidence or 0.0, 4), **extra)
        if self.on_batch:
            self.on_batch(items)

    def finished(self, res: BatchOutcome, how: How = "batch") -> None:
        """A batch (or a dead worker's folder) finished: its damage reported, its delivered files counted."""
        self.damage(res)
        self.delivered(res.delivered, how)

    def damage(self, res: BatchOutcome) -> None:
        """One error per damaged journal; one warning per batch whose worker's CSV cannot be reached."""
        for journal, moved, why in res.quarantined:
            self.log.error("damaged batch journal moved to quarantine; its photos are kept",
                           journal=journal, quarantined=moved, problem=why)
        for batch, why in res.fallback:
            self.log.warning("the dead worker's CSV cannot be reached; its batch is recorded in ours",
                             batch=batch, reason=why, log=self.log_path,
                             note="rows that worker wrote there before it died cannot be checked and may appear twice")
