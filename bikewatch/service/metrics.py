"""Prometheus metrics for the service: a textfile for node_exporter, or opt-in HTTP.

Everything lives in this object's own :class:`CollectorRegistry` (never the
process-global one), so several services or tests in one process do not
collide, and the exposition contains only bikewatch's series.

Label values stay low-cardinality: ``label`` is one of the output folders and
``reason`` is the rejection reason cut to its fixed part (see
:func:`reason_label`), never a file name or a number.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server, write_to_textfile

from bikewatch.labels import FOLDERS, Label

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MAX_REASON = 40

_DIGITS = re.compile(r"\S*\d\S*")
_SPACES = re.compile(r"\s+")


def reason_label(error: str) -> str:
    """The fixed part of a rejection reason: before the first ':' or '(', without words
    holding digits, at most 40 characters; pure.

    ``"truncated image: image file is truncated (65 bytes not processed)"`` -> ``"truncated image"``,
    ``"file too large (600000000 bytes)"`` -> ``"file too large"``,
    ``"invalid image size 0x0"`` -> ``"invalid image size"``.
    """
    text = re.split(r"[:(]", error or "", maxsplit=1)[0]
    text = _SPACES.sub(" ", _DIGITS.sub("", text)).strip(" .,;-")
    return text[:MAX_REASON].rstrip() or "unknown"


class Metrics:
    """The service's counters, histograms and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.photos = Counter("bikewatch_photos_total", "Files delivered, by output folder.", ["label"], registry=r)
        self.rejected = Counter("bikewatch_rejected_total", "Files delivered to rejected/, by reason.", ["reason"],
                                registry=r)
        self.batch_size = Histogram("bikewatch_batch_size", "Files per batch sent to the model.",
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_seconds = Histogram("bikewatch_batch_seconds", "Seconds from claiming a batch to its delivery.",
                                       buckets=BATCH_SECONDS_BUCKETS, registry=r)
        self.backlog = Gauge("bikewatch_inbox_backlog", "Files seen in the inbox and not yet claimed.", registry=r)
        self.model = Info("bikewatch_model", "The model in use (identity: name@digest).", registry=r)
        self.blocked = Gauge("bikewatch_output_blocked",
                             "1 while the output folder or CSV log cannot take files (photos wait in the inbox).",
                             registry=r)
        self.read_ahead = Counter(
            "bikewatch_read_ahead_total",
            "Files read and classified while they settled: used at the claim, or discarded (changed, gone, "
            "or read too soon after a change to vouch for).", ["outcome"], registry=r)
        for label in FOLDERS:  # present from the start at 0, so rate() works from the first scrape
            self.photos.labels(label=label)
        for outcome in ("used", "discarded"):
            self.read_ahead.labels(outcome=outcome)
        self._read_ahead_seen = {"used": 0, "discarded": 0}
        self._server: Any = None

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(max(0.0, seconds))

    def count(self, label: str, reason: str = "", n: int = 1) -> None:
        """``n`` delivered files; ``reason`` is their error text (rejected files)."""
        self.photos.labels(label=label).inc(n)
        if label == Label.REJECTED or reason:
            self.rejected.labels(reason=reason_label(reason)).inc(n)

    def read_ahead_totals(self, used: int, discarded: int) -> None:
        """Bring the read-ahead counters up to the service's running totals."""
        for outcome, total in (("used", used), ("discarded", discarded)):
            delta = total - self._read_ahead_seen[outcome]
            if delta > 0:
                self.read_ahead.labels(outcome=outcome).inc(delta)
                self._read_ahead_seen[outcome] = total

    def set_backlog(self, n: int) -> None:
        self.backlog.set(n)

    def set_model(self, identity: str) -> None:
        self.model.info({"model": identity})  # replaces the previous model's series

    def set_blocked(self, blocked: bool) -> None:
        self.blocked.set(1 if blocked else 0)

    def write_textfile(self, path: str | os.PathLike[str]) -> None:
        """Write the exposition for node_exporter's textfile collector (temp file + rename: atomic)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), self.registry)

    def serve(self, port: int, addr: str = "127.0.0.1") -> Any:
        """Serve /metrics over HTTP from a daemon thread (opt-in; loopback unless told otherwise).

        Returns the server; ``port=0`` picks a free port (``server.server_port``).
        """
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return server

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
