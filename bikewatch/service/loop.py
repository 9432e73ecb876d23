"""``bikewatch run``: the loop that wires the stages together and owns the threads.

A photo goes intake -> claim -> decode -> infer -> decide -> deliver -> ledger, each stage in
a module named for it (README: Architecture):

- intake (:mod:`bikewatch.intake`): events and scans become hints, hints become
  :class:`~bikewatch.intake.readiness.Readiness` (settled files);
- claim (:mod:`bikewatch.service.claimer`, on the claim thread): the next batch's files, renamed
  into our work folder (:mod:`bikewatch.store.claim`);
- decode (:mod:`bikewatch.decode.stage`, in decode worker processes): read, hash, preprocess;
- infer (:mod:`bikewatch.inference.stage`, on this thread): probabilities;
- decide (:mod:`bikewatch.decision`, pure): labels and names;
- deliver (:mod:`bikewatch.service.deliverer`, on the deliver thread): files placed, CSV rows
  (:mod:`bikewatch.store.deliver`, :mod:`bikewatch.store.ledger`);
- accounting (:mod:`bikewatch.service.accounting`): every delivered file, however delivered.

This module decides *when*: up to three batches in flight (two claimed and decoding while
the model works on the first), delivery overlapped with the next predict, read-ahead while
the model is idle, rescans, retries and the wake-up timing.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import threading
import time
from dataclasses import replace
from typing import Any, Callable

from bikewatch.config import Settings, describe
from bikewatch.decision import decide_batch
from bikewatch.decode.pool import DecodePool, Task, default_workers
from bikewatch.decode.stage import DecodeStage
from bikewatch.clock import utc_now
from bikewatch.exits import Exit
from bikewatch.inference.device import backend_for, configure_device
from bikewatch.inference.model import ModelError
from bikewatch.inference.stage import InferenceStage
from bikewatch.intake.hints import Hints
from bikewatch.intake.stage import Intake
from bikewatch.labels import FOLDERS, Label
from bikewatch.logs import get_logger, native_stderr_as_debug
from bikewatch.service.accounting import Accounting
from bikewatch.service.backoff import Backoff
from bikewatch.service.claimer import Claimer, InFlight
from bikewatch.service.deliverer import Deliverer
from bikewatch.service.metrics import Metrics
from bikewatch.service.mode import Mode
from bikewatch.service.publish import Publisher, View
from bikewatch.service.readahead import QUIET_SECONDS, ReadAhead
from bikewatch.service.recovery import Recoverer
from bikewatch.service.signals import SignalRelay
from bikewatch.service.systemd import Notifier
from bikewatch.store.failover import origin
from bikewatch.store.journal import PHASE_DECIDED, Item
from bikewatch.store.ledger import Ledger
from bikewatch.store.workarea import WorkArea

IN_FLIGHT = 3
"""Batches in flight: the next two are claimed and decoded on other threads while the model works on the first."""


class Service:
    """The stages, wired; the main loop; start-up and shutdown."""

    def __init__(
        self,
        settings: Settings,
        notifier: Notifier,
        *,
        mode: Mode | None = None,
        on_batch: Callable[[list[Item]], None] | None = None,
    ) -> None:
        s = self.s = settings
        self.mode = mode or Mode.daemon()
        self.notifier = notifier
        self.log = get_logger()
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.hints = Hints()
        self.ledger = Ledger(s.log_path)
        self.metrics = Metrics()
        self.backoff = Backoff(s.retry_max_seconds)
        self.accounting = Accounting(self.metrics, self.log, on_batch, log_path=str(s.log_path))
        self.counts = self.accounting.counts
        self.inflight: collections.deque[InFlight] = collections.deque()
        self.work: WorkArea | None = None  # from start-up on (see _run)
        self.workers = default_workers(s.decode_workers)
        # Reads of files still settling: never more than two per decode worker queued ahead of a
        # claimed batch's reads, and a few batches' worth of arrays waiting for the model.
        self.read_ahead = ReadAhead(s.read_ahead if self.mode.read_ahead else 0,
                                    reading_max=max(2 * self.workers, s.max_batch),
                                    arrays_max=4 * s.max_batch, wake=self.hints.wake.set)
        self.intake = Intake(s.inbox, self.hints, state_dir=s.state_dir, ignore=s.ignore, settle_seconds=s.settle_seconds,
                             closed_settle_seconds=s.closed_settle_seconds, poll=s.poll,
                             poll_interval_seconds=s.poll_interval_seconds, rescan_seconds=s.rescan_seconds,
                             follower=self.read_ahead, on_gone=self._gone, log=self.log)
        self.inference = InferenceStage(s.model, max_batch=s.max_batch, watch_model=s.watch_model, log=self.log)
        self.recoverer = Recoverer(inbox=s.inbox, output=s.output, state_dir=s.state_dir, ledger=self.ledger,
                                   stale_after=s.stale_worker_seconds, accounting=self.accounting,
                                   backoff=self.backoff, log=self.log)
        self.publisher = Publisher(notifier=notifier, metrics=self.metrics, counts=self.counts, log=self.log,
                                   state_dir=s.state_dir, metrics_textfile=s.metrics_textfile,
                                   worker=s.worker_name, inbox=s.inbox, output=s.output, log_path=s.log_path)
        self.decode: DecodeStage | None = None  # with the decode pool (see run)
        self.claimer: Claimer | None = None
        self.deliverer: Deliverer | None = None

    # ----- start-up -------------------------------------------------------------------------

    def _signals(self) -> SignalRelay:
        """SIGTERM and SIGINT stop, SIGHUP reloads; handled on a relay thread (see bikewatch.service.signals)."""

        def on_stop(signum: int) -> None:
            if not self.stop.is_set():
                self.log.info("stopping", signal=signal.Signals(signum).name)
            self.stop.set()
            self.hints.wake.set()

        def on_hup(_signum: int) -> None:
            self.reload.set()
            self.hints.wake.set()

        return SignalRelay({signal.SIGTERM: on_stop, signal.SIGINT: on_stop, signal.SIGHUP: on_hup}).install()

    def _maybe_reload_model(self, now: float) -> None:
        """A replaced model file or SIGHUP switches models between batches, no restart."""
        if not (self.inference.file_changed(now) or self.reload.is_set()):
            return
        self.reload.clear()
        self.notifier.reloading()
        try:
            new = self.inference.reload()
        finally:
            self.notifier.ready()
        if new is not None:
            self.metrics.set_model(new.identity)

    def run(self) -> int:
        relay = self._signals()
        try:
            # Started first: the workers import Pillow and numpy while the model loads.
            with DecodePool(self.workers, on_crash=self._decoder_crashed, on_restart=self._decoder_restarted,
                            previews=self.s.previews) as pool:
                self.decode = DecodeStage(pool, max_pixels=self.s.max_pixels, previews=self.s.previews)
                self.claimer = Claimer(
                    self.s.inbox, self.intake.readiness, self.read_ahead, self.decode, max_batch=self.s.max_batch,
                    max_wait_ms=self.s.max_wait_ms, worker=self.s.worker_name,
                    # Written into every journal: which CSV this worker records to, so any host can finish its batches there.
                    origin=origin(self.s.inbox, self.s.log_path, socket.gethostname()))
                self.deliverer = Deliverer(inbox=self.s.inbox, output=self.s.output, ledger=self.ledger,
                                           accounting=self.accounting, backoff=self.backoff, log=self.log,
                                           release=self.claimer.release)
                return self._run()
        finally:
            relay.close()

    def _decoder_crashed(self, task: Task, reason: str) -> None:
        """On a decode proxy thread: a file killed or stalled its decoder on its own; it will be rejected."""
        self.log.error("decoder crashed", file=task.key, reason=reason)

    def _decoder_restarted(self, reason: str) -> None:
        """On a decode proxy thread: a worker died (its files are tried again, one at a time)."""
        self.log.warning("decode worker replaced", reason=reason)

    def _run(self) -> int:
        assert self.claimer is not None and self.deliverer is not None
        self.log.info("starting", settings=describe(self.s), pid=os.getpid())
        self.notifier.extend_timeout(120)
        with native_stderr_as_debug("tensorflow start-up"):  # absl's lines, not errors of ours
            device = configure_device(self.s.device)
        self.log.info("device", device=device)
        try:
            model = self.inference.start(backend_for(device))
            self.metrics.set_model(model.identity)
        except ModelError as exc:
            self.log.error("cannot load model", error=str(exc))
            return Exit.USAGE
        for name in FOLDERS:
            if name != Label.UNSURE or self.s.unsure_below > 0:
                (self.s.output / name).mkdir(parents=True, exist_ok=True)
        try:
            self.ledger.repair_tail()
        except OSError as exc:  # a read-only or vanished output must not stop start-up; we wait for it
            self.log.warning("cannot check the CSV log's last line", log=str(self.s.log_path), error=str(exc))
        work = self.work = WorkArea(self.s.state_dir, self.s.worker_name, self.s.stale_worker_seconds)
        work.beat_in_background()
        try:
            if self.s.metrics_port:
                self.metrics.serve(self.s.metrics_port, self.s.metrics_address)
                self.log.info("metrics served", address=self.s.metrics_address, port=self.s.metrics_port)
            self.recoverer.recover(work)
            if self.mode.watch:
                self.intake.start_watching()
            self._full_scan(time.monotonic())
            self.notifier.ready(status="watching " + str(self.s.inbox))
            self.log.info("ready", inbox=str(self.s.inbox), output=str(self.s.output), log=str(self.s.log_path),
                          waiting=len(self.intake.readiness))
            self._loop()
        finally:
            current = self.work  # may be a newer one than at start-up (see _renew_work_area)
            assert current is not None
            self.claimer.shutdown()
            self.deliverer.shutdown()
            self.notifier.stopping()
            self.publisher.remove_status_file(current.name)
            self.publisher.write_metrics()
            self.metrics.close()
            self.intake.stop()
            current.close()
        self.log.info("stopped", **self._summary())
        return Exit.OK

    # ----- the loop ---------------------------------------------------------------------------

    def _summary(self) -> dict[str, Any]:
        return {"sorted": dict(self.counts.by_label), "batches": self.counts.batches,
                "waiting": len(self.intake.readiness), "read_ahead_used": self.read_ahead.used,
                "read_ahead_wasted": self.read_ahead.wasted}

    def _loop(self) -> None:
        assert self.work is not None and self.deliverer is not None
        deliverer = self.deliverer
        next_scan = time.monotonic() + self.intake.scan_interval
        while True:
            now = time.monotonic()
            self.notifier.maybe_ping_watchdog(now)
            self.work.heartbeat(now)
            stopping = self.stop.is_set()
            if stopping and not self.inflight:
                self._join_delivery()
                return
            if (self.mode.stop_when_drained and not self.inflight and not len(self.intake.readiness)
                    and not deliverer.owed):
                self._join_delivery()
                if not deliverer.owed:
                    return
            assert self.claimer is not None
            rescan = self.intake.take_hints(now, self.claimer.taken)
            if self.mode.watch and (rescan or now >= next_scan or self.intake.watcher_died()):
                self._full_scan(now)
                if now >= next_scan and self.intake.ok and not self.recoverer.left:
                    self.recoverer.recover(self.work)  # a worker that died and was never restarted
                next_scan = now + self.intake.scan_interval
            self._maybe_reload_model(now)
            if (deliverer.owed or self.recoverer.left) and not self.backoff.blocked(now):
                self._retry(now)
            # Nothing new is taken while an earlier batch still waits for the output or the CSV.
            while (len(self.inflight) < IN_FLIGHT and not stopping and not self.backoff.blocked(now)
                   and self.intake.ok and not deliverer.owed and not self.recoverer.left):
                if not self._maybe_dispatch(now):
                    break
            if not stopping and self._read_ahead(now):
                continue  # the model just classified a read-ahead batch: look again before sleeping
            if self.inflight:
                self._finish(self.inflight.popleft())
                continue
            self._join_delivery()
            self._publish(now)
            self.hints.wake.wait(self._timeout(now, next_scan))

    def _timeout(self, now: float, next_scan: float) -> float:
        assert self.claimer is not None and self.deliverer is not None
        waits = [next_scan - now]
        due = self.intake.readiness.next_due(now)
        if due is not None:
            waits.append(due)
        oldest = self.claimer.oldest_ready()
        if oldest is not None:
            waits.append(oldest + self.s.max_wait_ms / 1000 - now)
        if self.deliverer.owed or self.backoff.blocked(now):
            waits.append(self.backoff.until - now)
        if self.notifier.watchdog_interval:
            waits.append(self.notifier.watchdog_interval / 2)
        if self.inference.watching():
            waits.append(self.inference.next_check - now)
        publish_due = self.publisher.next_due(now)
        if publish_due is not None:
            waits.append(publish_due)
        read_due = self.read_ahead.next_due(now)
        if read_due is not None:
            waits.append(read_due)
        return min(max(0.005, w) for w in waits)

    def _gone(self, rel: str) -> None:
        """A file went away before it was claimed: it waits for no batch any more."""
        if self.claimer is not None:
            self.claimer.forget(rel)

    def _full_scan(self, now: float) -> None:
        """Intake's scan; a work folder that went with the inbox's filesystem is started anew."""
        assert self.claimer is not None and self.work is not None
        if self.intake.full_scan(now, self.claimer.taken, complete_after=self.mode.complete_after):
            if not self.work.dir.is_dir():
                self._renew_work_area()

    def _renew_work_area(self) -> bool:
        """Our work folder vanished (the inbox's filesystem was unmounted or replaced): start a new one.

        Without this every claim would fail for ever once the inbox is back. Never creates a
        missing inbox (that would stop it from being moved back).
        """
        assert self.work is not None and self.deliverer is not None
        self._join_delivery()  # its journal is in the old folder: let it fail (or finish) first
        old = self.work
        try:
            self.s.state_dir.mkdir(exist_ok=True)
            self.work = WorkArea(self.s.state_dir, self.s.worker_name, self.s.stale_worker_seconds)
            self.work.beat_in_background()
        except OSError as exc:
            self.log.debug("cannot start a new work folder yet", error=str(exc))
            return False
        old.close()
        self.recoverer.retired.add(old.name)  # if its filesystem comes back, recovery finishes what it holds
        self.deliverer.forget_folder(old.dir)
        self.log.error("work folder vanished with the inbox's filesystem; started a new one",
                       previous=old.name, folder=self.work.name)
        self.recoverer.recover(self.work)
        return True

    def _maybe_dispatch(self, now: float) -> bool:
        assert self.claimer is not None and self.work is not None
        chosen = self.claimer.choose(now, in_flight=len(self.inflight), stopping=self.stop.is_set())
        if not chosen:
            return False
        if not self.work.dir.is_dir() and not self._renew_work_area():
            self.backoff.block(now)
            return False
        self.inflight.append(self.claimer.claim(chosen, self.work, self.inference.identity, now))
        return True

    def _read_ahead(self, now: float) -> bool:
        """Read files that are still settling, and classify what was read while the model is idle.

        True when the model classified a batch (time passed; there may be more to do at once).
        """
        assert self.claimer is not None and self.decode is not None
        ra = self.read_ahead
        if not ra.limit:
            return False
        ra.harvest()
        while self.intake.ok and ra.room() > 0 and (rel := ra.due(now)) is not None:
            seen = self.intake.readiness.settling(rel, now, QUIET_SECONDS)
            if seen is None or rel in self.claimer.taken or not ra.wanted(seen):
                continue  # gone, changed again (a later entry is queued), ready already, or read already
            ra.start(seen, self.decode.read_ahead(self.s.inbox / rel, rel))
        if self.inflight or self.inference.model is None:
            return False  # the model is busy with claimed batches, which come first
        entries = ra.unclassified(self.s.max_batch)
        if not entries or (len(entries) < self.s.max_batch and ra.reading()):
            return False
        ra.classified(entries, self.inference.predict([e.array for e in entries]),  # type: ignore[misc]
                      self.inference.identity)  # every entry still holds its array (see ReadAhead.unclassified)
        self.log.debug("read ahead", classified=len(entries), held=len(ra))
        return True

    def _finish(self, batch: InFlight) -> None:
        """Take a batch in flight through decode, inference and the decision, and hand it to the deliverer."""
        assert self.claimer is not None and self.decode is not None and self.deliverer is not None
        assert self.work is not None
        try:
            journal, futures = self.claimer.claimed(batch)
        except OSError as exc:
            self.log.error("cannot claim files", error=str(exc))
            # A claim cut short (the inbox went away mid-batch) leaves a journal and maybe some
            # claimed files: the retry finishes it, which puts them back in the inbox.
            self.deliverer.owe(batch.path, time.monotonic())
            return
        model = self.inference.identity
        prepared, probs = self.decode.gather(journal, futures, batch.path.parent, batch.early, model)
        todo = [i for i, p in enumerate(prepared) if p.array is not None and i not in probs]
        t0 = time.monotonic()
        if todo:
            got = self.inference.predict([prepared[i].array for i in todo])  # type: ignore[misc]
            probs.update((i, got[j]) for j, i in enumerate(todo))
        infer_ms = (time.monotonic() - t0) * 1000
        self._join_delivery()  # the previous batch's files are in place before names are chosen
        if self.deliverer.owed:
            # That delivery (or another) failed: place nothing more while rows are owed.
            self.deliverer.decline(batch.path, self.work.dir, [it.source for it in journal.items])
            return
        items = decide_batch(journal.items, prepared, probs, unsure_below=self.s.unsure_below,
                             output=self.s.output, decided_at=utc_now())
        decided = replace(journal, phase=PHASE_DECIDED, items=tuple(items), model=model)
        self.deliverer.start(batch, decided, self.work.dir, len(probs), infer_ms)

    def _join_delivery(self) -> None:
        """Wait for the batch on the deliver thread (if any) and account for it, on the main thread."""
        assert self.deliverer is not None and self.work is not None
        if self.deliverer.join(self.work.dir):
            self.publisher.soon()
            self._publish(time.monotonic())

    def _retry(self, now: float) -> None:
        """Dead workers' folders not recovered yet, then our own owed batches."""
        assert self.deliverer is not None and self.work is not None
        if self.recoverer.left:
            self.recoverer.recover(self.work)
        if self.deliverer.retry(now, self.work.dir):
            self.publisher.soon()

    def _publish(self, now: float) -> None:
        """STATUS, the status file and the metrics, when due (see bikewatch.service.publish)."""
        if self.work is None:
            return
        self.publisher.maybe_publish(now, View(
            waiting=len(self.intake.readiness), blocked=self.backoff.blocked(time.monotonic()), inbox_ok=self.intake.ok,
            model=self.inference.identity, read_ahead_used=self.read_ahead.used,
            read_ahead_wasted=self.read_ahead.wasted, work_name=self.work.name))
