"""Publishing what the service is doing: systemd's STATUS=, the status file, the metrics.

Every 5 s with nothing happening, and within 1 s of a finished batch; not after every
batch: each publication writes and renames a JSON status file on the main loop, which
during a burst is better spent dispatching and predicting.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bikewatch.clock import utc_now
from bikewatch.files import write_atomic
from bikewatch.labels import SORTED, Label
from bikewatch.offline.status import identity
from bikewatch.service.accounting import Counts
from bikewatch.service.metrics import Metrics
from bikewatch.service.systemd import Notifier, format_status

STATUS_IDLE_SECONDS = 5.0
"""How often STATUS, the status file and the metrics are refreshed with nothing happening."""
STATUS_BUSY_SECONDS = 1.0
"""How soon after a finished batch they show it."""


@dataclass(frozen=True)
class View:
    """The loop's state that a publication shows, taken when it is due."""

    waiting: int
    blocked: bool
    inbox_ok: bool
    model: str
    read_ahead_used: int
    read_ahead_wasted: int
    work_name: str  # our work folder's name, which names the status file


class Publisher:
    """STATUS=, ``STATE/status/<worker>.json`` (what ``bikewatch status`` reads) and the metrics textfile."""

    def __init__(self, *, notifier: Notifier, metrics: Metrics, counts: Counts, log: Any, state_dir: Path,
                 metrics_textfile: Path | None, worker: str, inbox: Path, output: Path, log_path: Path) -> None:
        self.notifier = notifier
        self.metrics = metrics
        self.counts = counts
        self.log = log
        self.state_dir = state_dir
        self.metrics_textfile = metrics_textfile
        self.fixed = {"worker": worker, "inbox": str(inbox), "output": str(output), "log": str(log_path)}
        self._started_at = utc_now()
        self._identity = identity()  # boot id + start time: what `status` tells this process by
        self._last = 0.0
        self._owed = False  # a batch finished since the status was last published

    def soon(self) -> None:
        """A batch finished: publish within :data:`STATUS_BUSY_SECONDS`."""
        self._owed = True

    def next_due(self, now: float) -> float | None:
        """Seconds until an owed publication (the loop wakes for it), or None."""
        return self._last + STATUS_BUSY_SECONDS - now if self._owed else None

    def maybe_publish(self, now: float, view: View) -> None:
        if now - self._last < (STATUS_BUSY_SECONDS if self._owed else STATUS_IDLE_SECONDS):
            return
        self._last = now
        self._owed = False
        by = self.counts.by_label
        counts: dict[str, Any] = {
            "sorted": {k: by[k] for k in SORTED if by[k]},
            Label.REJECTED.value: by[Label.REJECTED],
            "waiting": view.waiting,
        }
        self.notifier.status(format_status(counts))
        self._write_status_file(view)
        self.metrics.set_backlog(view.waiting)
        self.metrics.read_ahead_totals(view.read_ahead_used, view.read_ahead_wasted)
        self.metrics.set_blocked(view.blocked)
        self.write_metrics()

    def write_metrics(self) -> None:
        if self.metrics_textfile is None:
            return
        try:
            self.metrics.write_textfile(self.metrics_textfile)
        except OSError as exc:
            self.log.warning("cannot write metrics textfile", path=str(self.metrics_textfile), error=str(exc))

    def _write_status_file(self, view: View) -> None:
        """STATE/status/<work folder>.json: what `bikewatch status` shows about this running worker."""
        data = {
            "worker": self.fixed["worker"], "pid": os.getpid(), "host": os.uname().nodename,
            "started": self._started_at, "updated": utc_now(), **self._identity,
            "model": view.model, "inbox": self.fixed["inbox"], "output": self.fixed["output"],
            "log": self.fixed["log"],
            "counts": dict(self.counts.by_label), "reasons": dict(self.counts.reasons),
            "batches": self.counts.batches, "waiting": view.waiting,
            "last_file": self.counts.last_file, "last_error": self.counts.last_error,
            "output_blocked": view.blocked, "inbox_ok": view.inbox_ok,
        }
        folder = self.state_dir / "status"
        try:
            # Not parents=True: while the inbox is away that would create an empty one in its place.
            folder.mkdir(exist_ok=True)
            write_atomic(folder / f"{view.work_name}.json", json.dumps(data, indent=2))
        except OSError as exc:
            self.log.debug("cannot write status file", error=str(exc))

    def remove_status_file(self, work_name: str) -> None:
        try:
            os.unlink(self.state_dir / "status" / f"{work_name}.json")
        except OSError:
            pass
