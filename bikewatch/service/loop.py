"""``bikewatch run``: the long-running service that ties the pieces together.

One processing loop on the main thread owns every decision (which files to
claim, when to send a batch, where each file goes); decode worker processes
(:mod:`bikewatch.decode.pool`) only read and preprocess files, and the watchdog
observer only drops hints. Side
effects live here and in :mod:`bikewatch.store.journal`; the rules they follow are
pure functions in the other modules.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bikewatch.decode.prepare import Prepared, digest_file, prepare

from bikewatch.decision import LABEL_REJECTED, LABEL_UNSURE, decide

from bikewatch.inference.batch import BatchBuffer

from bikewatch.service.dispatch import should_dispatch
from bikewatch.config import ConfigError, Settings, describe, load_settings, validate
from bikewatch.decode.pool import DecodePool, Task
from bikewatch.store.failover import origin, remove_status_of, sweep_status_files
from bikewatch.store.journal import (
    ADOPTED_PREFIX, PHASE_CLAIMED, PHASE_DECIDED, DeliveryError, Item, Journal, SettleResult, WorkArea, claim,
    deliver_decided, free_name, recover_dir, journals, return_to_inbox, settle, write_journal,
)
from bikewatch.store.ledger import Ledger
from bikewatch.service.metrics import Metrics
from bikewatch.logs import configure, get_logger, native_stderr_as_debug
from bikewatch.inference.model import CLASSES, BackendChoice, Classifier, ModelError, load_classifier
from bikewatch.service.readahead import QUIET_SECONDS, ReadAhead, Usable
from bikewatch.service.signals import SignalRelay
from bikewatch.offline.status import identity
from bikewatch.service.systemd import Notifier, format_status
from bikewatch.intake.hints import Hints
from bikewatch.intake.readiness import Readiness
from bikewatch.intake.scan import Seen, is_ignored, mount_fstype, needs_polling, observe, scan
from bikewatch.intake.watcher import InboxWatcher

EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2


STATUS_IDLE_SECONDS = 5.0
"""How often STATUS, the status file and the metrics are refreshed with nothing happening."""
STATUS_BUSY_SECONDS = 1.0
"""How soon after a finished batch they show it (not after every batch: see ``_publish_status``)."""


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def configure_device(device: str) -> str:
    """CPU (LiteRT, no TensorFlow) or GPU (TensorFlow) as asked; on a GPU, memory growth so the
    service does not grab the whole card."""
    from bikewatch.inference.runtime import TensorFlowMissing, inference_threads, require_tensorflow, resolve_backend

    if resolve_backend(device) == "litert":
        if device == "cpu":  # a model only Keras can run must not find the GPU either
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return f"cpu (LiteRT, {inference_threads()} threads)"
    try:
        tf = require_tensorflow("setting 'device': 'gpu'")
    except TensorFlowMissing as exc:
        raise ConfigError(
            "setting 'device': 'gpu' needs TensorFlow with CUDA, which is not installed: pip install 'bikewatch[gpu]'"
        ) from exc

    gpus = tf.config.list_physical_devices("GPU")
    if device == "cpu":
        if gpus:
            tf.config.set_visible_devices([], "GPU")
        return "cpu"
    if device == "gpu" and not gpus:
        raise ConfigError("setting 'device': 'gpu' was asked for but TensorFlow sees no GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass
    return f"gpu x{len(gpus)} ({gpus[0].name})" if gpus else "cpu"


@dataclass
class InFlight:
    journal: Journal
    path: Path
    futures: list[Future[Prepared]]
    started: float
    claimed: Future[tuple[Journal, list[Future[Prepared]]]] | None = None  # the claim, until _finish
    early: dict[str, Usable] = field(default_factory=dict)  # read-ahead results, by inbox path


@dataclass
class Counts:
    by_label: collections.Counter[str] = field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    batches: int = 0
    last_file: str = ""
    last_error: str = ""


class Service:
    def __init__(
        self,
        settings: Settings,
        notifier: Notifier,
        *,
        oneshot: bool = False,
        on_batch: Callable[[list[Item]], None] | None = None,
    ) -> None:
        self.s = settings
        self.oneshot = oneshot  # `bikewatch sort`: drain what is there, then return
        self.on_batch = on_batch
        self.notifier = notifier
        self.log = get_logger()
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.hints = Hints()
        self.readiness = Readiness(settings.settle_seconds, settings.closed_settle_seconds)
        self.ledger = Ledger(settings.log_path)
        # Written into every journal: which CSV this worker records to, so any host can finish its batches there.
        self._origin = origin(settings.inbox, settings.log_path, socket.gethostname())
        self.counts = Counts()
        self.metrics = Metrics()
        self.inflight: collections.deque[InFlight] = collections.deque()
        self.taken: set[str] = set()  # inbox paths claimed or being claimed
        self.pending: list[Path] = []  # journals whose delivery must be retried
        self.orphans_left = False  # a dead worker's folder could not be recovered yet (output unusable)
        self._retired: set[str] = set()  # our own earlier work folders, gone with the inbox's filesystem
        self.blocked_until = 0.0
        self.backoff = 0.0
        self.inbox_ok = True
        self.watcher: InboxWatcher | None = None
        self.polling = False
        self.classifier: Classifier | None = None
        self._model_stat: tuple[int, int, int] | None = None
        self._next_model_check = 0.0
        self._last_status = 0.0
        self._status_owed = False  # a batch finished since the status was last published
        self._ready_since: dict[str, float] = {}
        self._started_at = utc_now()
        self._identity = identity()  # boot id + start time: what `status` tells this process by
        self.workers = settings.decode_workers or max(1, os.cpu_count() or 1)
        # Reads of files still settling: never more than two per decode worker queued ahead of a
        # claimed batch's reads, and a few batches' worth of arrays waiting for the model.
        self.read_ahead = ReadAhead(0 if oneshot else settings.read_ahead,
                                    reading_max=max(2 * self.workers, settings.max_batch),
                                    arrays_max=4 * settings.max_batch, wake=self.hints.wake.set)
        # A decided batch's journal write and settle (all fsyncs) run on this thread while the
        # main loop predicts the next batch; at most one at a time, joined before the next is decided.
        self._deliverer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deliver")
        # Claims get a thread of their own, so that one never waits behind a delivery's fsyncs.
        self._claimer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="claim")
        self._delivering: tuple[InFlight, Journal, int, float, Future[Any]] | None = None
        self._batch = BatchBuffer(settings.max_batch)  # the main thread's, for predict()

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

    def _load_model(self) -> Classifier:
        path = self.s.model
        started = time.monotonic()
        classifier = load_classifier(path, backend=self.backend)
        if classifier.backend == "keras" and self.backend == "auto":
            self.log.warning(
                "model has no LiteRT form: running it through TensorFlow (about 700 MiB more, slower under W^X); "
                f"`bikewatch convert {classifier.path}` adds it", model=classifier.identity,
            )
        # Size LiteRT's tensors (or trace Keras's graph) for one photo and a full batch before READY:
        # otherwise the first batch of the first dump pays for that.
        for size in sorted({1, self.s.max_batch}):
            classifier.predict(np.zeros((size, 64, 64, 3), dtype=np.float32))
        self._model_stat = self._stat_model()
        self.log.info(
            "model loaded", model=classifier.identity, path=str(classifier.path), backend=classifier.backend,
            contract=classifier.contract.to_json(), ms=round((time.monotonic() - started) * 1000),
        )
        return classifier

    def _stat_model(self) -> tuple[int, int, int] | None:
        path = self.s.model
        if path is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _maybe_reload_model(self, now: float) -> None:
        """A replaced model file or SIGHUP switches models between batches, no restart."""
        changed = False
        if self.s.watch_model and self.s.model is not None and now >= self._next_model_check:
            self._next_model_check = now + 2.0
            st = self._stat_model()
            changed = st is not None and st != self._model_stat
        if not (changed or self.reload.is_set()):
            return
        self.reload.clear()
        old = self.classifier.identity if self.classifier else ""
        self.notifier.reloading()
        try:
            new = self._load_model()
        except (ModelError, OSError) as exc:
            self._model_stat = self._stat_model()
            self.log.error("model reload failed; keeping the current model", error=str(exc), model=old)
            return
        finally:
            self.notifier.ready()
        self.classifier = new
        self.metrics.set_model(new.identity)
        self.log.info("model switched", previous=old, model=new.identity)

    def _recover(self, work: WorkArea) -> None:
        def on_return(item: Item, why: str) -> None:
            self.log.info("returned to inbox", source=item.source, reason=why)

        self.orphans_left = False
        for folder in work.orphaned_dirs(retired=self._retired):
            work.heartbeat(time.monotonic())  # a long recovery must not make us look dead to other hosts
            try:
                res = recover_dir(folder, inbox=self.s.inbox, output=self.s.output, ledger=self.ledger,
                                  digest=digest_file, on_return=on_return, stale_after=self.s.stale_worker_seconds)
            except OSError as exc:
                # The output (or the CSV) cannot take them now; crashing here would only loop.
                # The folder is ours now (adopted): send what was not placed back to the inbox;
                # placed files whose rows are owed stay journalled until a retry succeeds.
                self.orphans_left = True
                for journal_path in journals(folder):
                    try:
                        return_to_inbox(journal_path, folder, inbox=self.s.inbox)
                    except OSError:
                        pass
                first = not self.backoff
                self._block(time.monotonic())
                (self.log.error if first else self.log.debug)(
                    "output unavailable; photos stay in the inbox, retrying", error=str(exc),
                    folder=folder.name, retry_in_s=self.backoff)
                continue
            except Exception as exc:  # noqa: BLE001 - no state on disk may stop the service
                self.log.exception("cannot recover the work of a stopped worker; left for a later start",
                                   folder=folder.name, error=str(exc))
                continue
            self._log_damage(res)
            dead = folder.name.removeprefix(ADOPTED_PREFIX)
            self.log.info("recovered work of a stopped worker", folder=dead,
                          delivered=len(res.delivered), returned=len(res.returned),
                          **({"csv": sorted({c for _, c in res.elsewhere})} if res.elsewhere else {}))
            remove_status_of(self.s.state_dir, dead)
        sweep_status_files(self.s.state_dir, self.s.stale_worker_seconds)

    def _log_damage(self, res: SettleResult) -> None:
        """One error per damaged journal; one warning per batch whose worker's CSV cannot be reached."""
        for journal, moved, why in res.quarantined:
            self.log.error("damaged batch journal moved to quarantine; its photos are kept",
                           journal=journal, quarantined=moved, problem=why)
        for batch, why in res.fallback:
            self.log.warning("the dead worker's CSV cannot be reached; its batch is recorded in ours",
                             batch=batch, reason=why, log=str(self.s.log_path),
                             note="rows that worker wrote there before it died cannot be checked and may appear twice")

    def _start_watching(self) -> None:
        fstype = mount_fstype(self.s.inbox)
        self.polling = self.s.poll == "yes" or (self.s.poll == "auto" and needs_polling(fstype))
        mode = "poll" if self.polling else "inotify"
        self.log.info("watching inbox", inbox=str(self.s.inbox), fstype=fstype, mode=mode,
                      poll_interval_s=self.s.poll_interval_seconds if self.polling else None)
        if not self.polling:
            self.watcher = InboxWatcher(self.s.inbox, self.hints, self.s.state_dir)
            self.watcher.start()

    def run(self) -> int:
        relay = self._signals()
        try:
            # Started first: the workers import Pillow and numpy while the model loads.
            with DecodePool(self.workers, on_crash=self._decoder_crashed, on_restart=self._decoder_restarted,
                            previews=self.s.previews) as pool:
                return self._run(pool)
        finally:
            relay.close()

    def _decoder_crashed(self, task: Task, reason: str) -> None:
        """On a decode proxy thread: a file killed or stalled its decoder on its own; it will be rejected."""
        self.log.error("decoder crashed", file=task.key, reason=reason)

    def _decoder_restarted(self, reason: str) -> None:
        """On a decode proxy thread: a worker died (its files are tried again, one at a time)."""
        self.log.warning("decode worker replaced", reason=reason)

    def _run(self, pool: DecodePool) -> int:
        self.log.info("starting", settings=describe(self.s), pid=os.getpid())
        self.notifier.extend_timeout(120)
        with native_stderr_as_debug("tensorflow start-up"):  # absl's lines, not errors of ours
            device = configure_device(self.s.device)
        self.backend: BackendChoice = "auto" if device.startswith("cpu") else "keras"
        self.log.info("device", device=device)
        try:
            self.classifier = self._load_model()
            self.metrics.set_model(self.classifier.identity)
        except ModelError as exc:
            self.log.error("cannot load model", error=str(exc))
            return EXIT_CONFIG
        folders = [*CLASSES, LABEL_REJECTED] + ([LABEL_UNSURE] if self.s.unsure_below > 0 else [])
        for name in folders:
            (self.s.output / name).mkdir(parents=True, exist_ok=True)
        try:
            self.ledger.repair_tail()
        except OSError as exc:  # a read-only or vanished output must not stop start-up; we wait for it
            self.log.warning("cannot check the CSV log's last line", log=str(self.s.log_path), error=str(exc))
        work = WorkArea(self.s.state_dir, self.s.worker_name, self.s.stale_worker_seconds)
        work.beat_in_background()
        self.work = work
        try:
            if self.s.metrics_port:
                self.metrics.serve(self.s.metrics_port, self.s.metrics_address)
                self.log.info("metrics served", address=self.s.metrics_address, port=self.s.metrics_port)
            self._recover(work)
            if not self.oneshot:
                self._start_watching()
            self._full_scan(time.monotonic())
            self.notifier.ready(status="watching " + str(self.s.inbox))
            self.log.info("ready", inbox=str(self.s.inbox), output=str(self.s.output), log=str(self.s.log_path),
                          waiting=len(self.readiness))
            self._loop(pool)
        finally:
            self._claimer.shutdown(wait=True)
            self._deliverer.shutdown(wait=True)
            self.notifier.stopping()
            self._remove_status_file()
            self._write_metrics()
            self.metrics.close()
            if self.watcher:
                self.watcher.stop()
            self.work.close()  # may be a newer one than `work` (see _renew_work_area)
        self.log.info("stopped", **self._summary())
        return EXIT_OK

    # ----- the loop ---------------------------------------------------------------------------

    def _summary(self) -> dict[str, Any]:
        return {"sorted": dict(self.counts.by_label), "batches": self.counts.batches,
                "waiting": len(self.readiness), "read_ahead_used": self.read_ahead.used,
                "read_ahead_wasted": self.read_ahead.wasted}

    def _loop(self, pool: DecodePool) -> None:
        next_scan = time.monotonic() + (self.s.poll_interval_seconds if self.polling else self.s.rescan_seconds)
        while True:
            now = time.monotonic()
            self.notifier.maybe_ping_watchdog(now)
            self.work.heartbeat(now)
            stopping = self.stop.is_set()
            if stopping and not self.inflight:
                self._join_delivery()
                return
            if self.oneshot and not self.inflight and not len(self.readiness) and not self.pending:
                self._join_delivery()
                if not self.pending:
                    return
            paths, closed, rescan = self.hints.take()
            for rel in sorted(paths):  # in Readiness's order (same clock, then name): nothing to re-sort
                self._observe(rel, now)
            for rel in closed:
                self.readiness.mark_closed(rel)
            if self.oneshot:
                pass  # the start-up scan found the dump; nothing new is expected
            elif rescan or now >= next_scan or (self.watcher is not None and not self.watcher.alive):
                self._full_scan(now)
                if now >= next_scan and self.inbox_ok and not self.orphans_left:
                    self._recover(self.work)  # a worker that died and was never restarted
                next_scan = now + (self.s.poll_interval_seconds if self.polling else self.s.rescan_seconds)
            self._maybe_reload_model(now)
            if (self.pending or self.orphans_left) and now >= self.blocked_until:
                self._retry_pending(now)
            # Keep up to three batches in flight: the next two are claimed and decoded on other
            # threads while the model works on the first, so the cores never wait for a claim.
            # Nothing new is taken while an earlier batch still waits for the output or the CSV.
            while (len(self.inflight) < 3 and not stopping and now >= self.blocked_until and self.inbox_ok
                   and not self.pending and not self.orphans_left):
                if not self._maybe_dispatch(pool, now):
                    break
            if not stopping and self._read_ahead(pool, now):
                continue  # the model just classified a read-ahead batch: look again before sleeping
            if self.inflight:
                self._finish(self.inflight.popleft())
                continue
            self._join_delivery()
            self._publish_status(now)
            timeout = self._timeout(now, next_scan)
            self.hints.wake.wait(timeout)

    def _timeout(self, now: float, next_scan: float) -> float:
        waits = [next_scan - now]
        due = self.readiness.next_due(now)
        if due is not None:
            waits.append(due)
        if self._ready_since:
            oldest = min(self._ready_since.values())
            waits.append(oldest + self.s.max_wait_ms / 1000 - now)
        if self.pending or self.blocked_until > now:
            waits.append(self.blocked_until - now)
        if self.notifier.watchdog_interval:
            waits.append(self.notifier.watchdog_interval / 2)
        if self.s.watch_model and self.s.model is not None:
            waits.append(self._next_model_check - now)
        if self._status_owed:
            waits.append(self._last_status + STATUS_BUSY_SECONDS - now)
        read_due = self.read_ahead.next_due(now)
        if read_due is not None:
            waits.append(read_due)
        return min(max(0.005, w) for w in waits)

    def _observe(self, rel: str, now: float) -> None:
        if rel in self.taken:
            return
        seen = observe(self.s.inbox, rel)
        if seen is None:
            self.readiness.forget(rel)
            self.read_ahead.forget(rel)
            self._ready_since.pop(rel, None)
        else:
            if any(is_ignored(part, self.s.ignore) for part in rel.split(os.sep)):
                return
            if self.readiness.update(seen, now):
                self.read_ahead.noticed(rel, now)

    def _full_scan(self, now: float) -> None:
        try:
            found = list(scan(self.s.inbox, self.s.ignore, skip=[self.s.state_dir]))
        except OSError as exc:
            if self.inbox_ok:
                self.log.error("inbox unavailable; will retry, nothing is forgotten", inbox=str(self.s.inbox),
                               error=exc.strerror or str(exc))
            self.inbox_ok = False
            return
        if not self.inbox_ok:
            self.log.info("inbox available again", inbox=str(self.s.inbox))
            self.inbox_ok = True
            if self.watcher is not None and not self.polling:
                self.watcher.stop()
                self.watcher = InboxWatcher(self.s.inbox, self.hints, self.s.state_dir)
                self.watcher.start()
        if not self.work.dir.is_dir():
            self._renew_work_area()
        present = set()
        for seen in found:
            if seen.rel in self.taken:
                continue
            present.add(seen.rel)
            if self.readiness.update(seen, now):
                self.read_ahead.noticed(seen.rel, now)
            if self.oneshot and time.time() - seen.mtime_ns / 1e9 > self.s.settle_seconds:
                # A dump that has sat still for longer than the settle time is complete.
                self.readiness.mark_closed(seen.rel)
        self.readiness.retain(present)
        self.read_ahead.retain(present)

    def _renew_work_area(self) -> bool:
        """Our work folder vanished (the inbox's filesystem was unmounted or replaced): start a new one.

        Without this every claim would fail for ever once the inbox is back. Never creates a
        missing inbox (that would stop it from being moved back).
        """
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
        self._retired.add(old.name)  # if its filesystem comes back, recovery finishes what it holds
        # Batches journalled in the vanished folder went with it; waiting for them would block for ever.
        self.pending = [p for p in self.pending if p.parent != old.dir]
        self.log.error("work folder vanished with the inbox's filesystem; started a new one",
                       previous=old.name, folder=self.work.name)
        self._recover(self.work)
        return True

    def _maybe_dispatch(self, pool: DecodePool, now: float) -> bool:
        # Only the oldest max_batch matter: more waiting than that means "send now" anyway.
        limit = self.s.max_batch + len(self.taken)
        ready = [s for s in self.readiness.ready(now, limit) if s.rel not in self.taken]
        for s in ready:
            self._ready_since.setdefault(s.rel, now)
        live = {s.rel for s in ready}
        for rel in [r for r in self._ready_since if r not in live]:
            del self._ready_since[rel]
        if not ready:
            return False
        oldest_wait = now - min(self._ready_since[s.rel] for s in ready)
        # With a batch already in flight there is no reason to wait for this one to fill.
        max_wait = 0.0 if self.inflight else self.s.max_wait_ms / 1000
        if not should_dispatch(len(ready), oldest_wait, max_batch=self.s.max_batch, max_wait=max_wait,
                               stopping=self.stop.is_set()):
            return False
        chosen = ready[: self.s.max_batch]
        # Look once more before claiming: the last observation can be older than the settle
        # time (polling sees a file once per poll interval), and a slow writer may have
        # appended since. Taking it now would classify, and move, a half-written file.
        chosen = [fresh for s in chosen if (fresh := self._unchanged(s)) is not None]
        if not chosen:
            return False
        if not self.work.dir.is_dir() and not self._renew_work_area():
            self._block(now)
            return False
        batch_id = self.work.new_batch_id()
        items = tuple(Item(key=f"{batch_id}.{i:04d}", source=s.rel) for i, s in enumerate(chosen))
        assert self.classifier is not None
        journal = Journal(batch=batch_id, phase=PHASE_CLAIMED, worker=self.s.worker_name,
                          model=self.classifier.identity, items=items, **self._origin)
        path = self.work.journal_path(batch_id)
        early: dict[str, Usable] = {}
        for s in chosen:
            self.readiness.forget(s.rel)
            self._ready_since.pop(s.rel, None)
            usable = self.read_ahead.take(s, self.classifier.identity)  # s: an lstat taken just now
            if usable is not None:
                early[s.rel] = usable
        # The claim (journal, renames, fsyncs) runs on the claimer thread, which then hands the
        # files to the decode workers: the main loop goes on predicting meanwhile.
        claimed = self._claimer.submit(self._claim, pool, journal, path, self.work.dir, early)
        self.taken.update(it.source for it in journal.items)
        self.inflight.append(InFlight(journal, path, [], now, claimed, early))
        return True

    def _claim(self, pool: DecodePool, journal: Journal, path: Path, work_dir: Path,
               early: dict[str, Usable]) -> tuple[Journal, list[Future[Prepared]]]:
        """On the claimer thread: claim the batch's files, then queue the ones not read ahead for decoding."""
        journal = claim(self.s.inbox, work_dir, journal, path)
        futures: list[Future[Prepared]] = []
        work = os.fspath(work_dir)
        for it in journal.items:
            usable = early.get(it.source)
            if usable is None:
                futures.append(pool.submit(os.path.join(work, it.key), it.key, max_pixels=self.s.max_pixels))
            else:
                done: Future[Prepared] = Future()
                done.set_result(replace(usable.prepared, key=it.key))
                futures.append(done)
        return journal, futures

    def _unchanged(self, s: Seen) -> Seen | None:
        """A fresh lstat of ``s`` when it still describes the file; otherwise None, and its settle time starts again."""
        seen = observe(self.s.inbox, s.rel)
        if seen is not None and seen.signature == s.signature and seen.regular == s.regular:
            return seen
        self._ready_since.pop(s.rel, None)
        if seen is None:
            self.readiness.forget(s.rel)
        else:
            self.readiness.update(seen, time.monotonic())
        return None

    def _read_ahead(self, pool: DecodePool, now: float) -> bool:
        """Read files that are still settling, and classify what was read while the model is idle.

        True when the model classified a batch (time passed; there may be more to do at once).
        """
        ra = self.read_ahead
        if not ra.limit:
            return False
        ra.harvest()
        while self.inbox_ok and ra.room() > 0 and (rel := ra.due(now)) is not None:
            seen = self.readiness.settling(rel, now, QUIET_SECONDS)
            if seen is None or rel in self.taken or not ra.wanted(seen):
                continue  # gone, changed again (a later entry is queued), ready already, or read already
            ra.start(seen, pool.submit(self.s.inbox / rel, rel, max_pixels=self.s.max_pixels, vouch=True))
        if self.inflight or self.classifier is None:
            return False  # the model is busy with claimed batches, which come first
        entries = ra.unclassified(self.s.max_batch)
        if not entries or (len(entries) < self.s.max_batch and ra.reading()):
            return False
        ra.classified(entries, self.classifier.predict(self._batch.stack([e.array for e in entries])),  # type: ignore[misc]
                      self.classifier.identity)  # every entry still holds its array (see ReadAhead.unclassified)
        self.log.debug("read ahead", classified=len(entries), held=len(ra))
        return True

    def _finish(self, batch: InFlight) -> None:
        assert self.classifier is not None
        if batch.claimed is not None:
            try:
                journal, futures = batch.claimed.result()
            except OSError as exc:
                self.log.error("cannot claim files", error=str(exc))
                # A claim cut short (the inbox went away mid-batch) leaves a journal and maybe some
                # claimed files: the retry settles it, which puts them back in the inbox.
                self.pending.append(batch.path)
                self._block(time.monotonic())
                self.taken.difference_update(it.source for it in batch.journal.items)
                return
            won = {it.source for it in journal.items}
            self.taken.difference_update(it.source for it in batch.journal.items if it.source not in won)
            batch = replace(batch, journal=journal, futures=futures, claimed=None)
        wait(batch.futures)
        prepared = [f.result() for f in batch.futures]
        by_index: dict[int, np.ndarray] = {}
        for i, item in enumerate(batch.journal.items):
            usable = batch.early.get(item.source)
            if usable is None or prepared[i].error or prepared[i].array is not None:
                continue
            if usable.probs is not None and usable.model == self.classifier.identity:
                by_index[i] = usable.probs  # classified while it settled
            else:  # classified ahead by a model replaced since: read the claimed file again
                prepared[i] = prepare(batch.path.parent / item.key, item.key, max_pixels=self.s.max_pixels,
                                      previews=self.s.previews)
        todo = [i for i, p in enumerate(prepared) if p.array is not None and i not in by_index]
        t0 = time.monotonic()
        if todo:
            probs = self.classifier.predict(self._batch.stack([prepared[i].array for i in todo]))  # type: ignore[misc]
            by_index.update((i, probs[j]) for j, i in enumerate(todo))
        infer_ms = (time.monotonic() - t0) * 1000
        good = sorted(by_index)
        self._join_delivery()  # the previous batch's files are in place before names are chosen
        if self.pending:
            # That delivery (or another) failed: place nothing more while rows are owed. The journal
            # still says "claimed": settling it puts the files back in the inbox, as the failed
            # batch's were; if even that fails, the retry does it.
            try:
                self._log_damage(settle(batch.path, self.work.dir, inbox=self.s.inbox, output=self.s.output,
                                        ledger=self.ledger, digest=digest_file))
            except OSError:
                self.pending.append(batch.path)
            self.taken.difference_update(it.source for it in batch.journal.items)
            return
        items: list[Item] = []
        chosen: dict[str, set[str]] = collections.defaultdict(set)
        output, decided_at = os.fspath(self.s.output), utc_now()
        for i, (item, prep) in enumerate(zip(batch.journal.items, prepared)):
            if i not in by_index:
                label, pm, pr = LABEL_REJECTED, None, None
            else:
                pm, pr = float(by_index[i][0]), float(by_index[i][1])
                label = decide(pm, pr, self.s.unsure_below)
            name = free_name(os.path.join(output, label), os.path.basename(item.source), chosen[label])
            chosen[label].add(name)
            items.append(Item(
                key=item.key, source=item.source, label=label, p_mountain=pm, p_road=pr, sha256=prep.sha256,
                size=prep.size, mtime_ns=prep.mtime_ns, error=prep.error, timestamp=decided_at, dest=f"{label}/{name}",
                decoded_from=prep.decoded_from if i in by_index else "",
            ))
        journal = replace(batch.journal, phase=PHASE_DECIDED, items=tuple(items), model=self.classifier.identity)
        future = self._deliverer.submit(self._deliver, batch.path, journal, self.work.dir)
        self._delivering = (batch, journal, len(good), infer_ms, future)

    def _deliver(self, path: Path, journal: Journal, work_dir: Path) -> SettleResult:
        """On the deliverer thread: record the decision durably, then place the files and write the rows."""
        write_journal(path, journal)
        return deliver_decided(path, journal, work_dir, inbox=self.s.inbox, output=self.s.output, ledger=self.ledger,
                               digest=digest_file)

    def _join_delivery(self) -> None:
        """Wait for the batch on the deliverer thread (if any) and account for it, on the main thread."""
        if self._delivering is None:
            return
        batch, journal, good, infer_ms, future = self._delivering
        self._delivering = None
        items = journal.items
        try:
            result = future.result()
        except DeliveryError as exc:
            self._delivery_failed(batch.path, exc)
            self.taken.difference_update(it.source for it in batch.journal.items)
            return
        except OSError as exc:
            # The work area itself failed (inbox filesystem trouble): leave the journal for retry.
            self.log.error("cannot record batch; will retry", error=str(exc), batch=journal.batch)
            self.pending.append(batch.path)
            self._block(time.monotonic())
            self.taken.difference_update(it.source for it in batch.journal.items)
            return
        self.taken.difference_update(it.source for it in batch.journal.items)
        self._log_damage(result)
        if self.backoff:
            self.log.info("output available again", output=str(self.s.output))
            self.backoff = 0.0
        self.counts.batches += 1
        self.metrics.observe_batch(len(items), time.monotonic() - batch.started)
        for (label, error), n in collections.Counter((it.label, it.error) for it in result.delivered).items():
            self.metrics.count(label, error, n)
        for item in result.delivered:
            self.counts.by_label[item.label] += 1
            self.counts.last_file = item.dest
            if item.error:
                self.counts.reasons[item.error.split(":")[0]] += 1
                self.counts.last_error = f"{item.source}: {item.error}"
                self.log.warning("rejected", source=item.source, destination=item.dest, reason=item.error)
            else:
                self.log.info("sorted", source=item.source, destination=item.dest, label=item.label,
                              confidence=round(item.confidence or 0.0, 4))
        self.log.info("batch", size=len(items), classified=good, read_ahead=len(batch.early),
                      infer_ms=round(infer_ms, 1), total_ms=round((time.monotonic() - batch.started) * 1000, 1))
        self._publish_status(time.monotonic(), force=True)
        if self.on_batch:
            self.on_batch(result.delivered)

    def _block(self, now: float) -> None:
        self.backoff = min(self.s.retry_max_seconds, max(1.0, self.backoff * 2))
        self.blocked_until = now + self.backoff

    def _delivery_failed(self, journal_path: Path, exc: DeliveryError) -> None:
        try:
            returned = return_to_inbox(journal_path, self.work.dir, inbox=self.s.inbox)
        except OSError:  # the inbox (with our work folder) is away too: the retry settles the journal
            returned = []
        first = not self.backoff
        self._block(time.monotonic())
        self.pending.append(journal_path)
        msg = "output unavailable; photos stay in the inbox, retrying"
        fields = dict(error=str(exc), returned=len(returned), retry_in_s=self.backoff)
        if first:
            self.log.error(msg, **fields)
        else:
            self.log.debug(msg, **fields)

    def _retry_pending(self, now: float) -> None:
        if self.orphans_left:
            self._recover(self.work)
        still: list[Path] = []
        for path in self.pending:
            if path.parent != self.work.dir:
                # A batch of a work folder that vanished and was replaced while the batch was in
                # flight: recovery takes its journal if (when) that filesystem comes back.
                self.log.debug("retry left to recovery", journal=str(path))
                continue
            if not path.exists():
                if not path.parent.is_dir():
                    still.append(path)  # the inbox (with our work folder) is away; it may come back
                continue
            try:
                res = settle(path, self.work.dir, inbox=self.s.inbox, output=self.s.output, ledger=self.ledger,
                             digest=digest_file)
                self._log_damage(res)
                for item in res.delivered:
                    self.counts.by_label[item.label] += 1
                    self.metrics.count(item.label, item.error)
            except OSError as exc:
                still.append(path)
                self.log.debug("retry failed", error=str(exc))
        self.pending = still
        if still:
            self._block(now)

    def _publish_status(self, now: float, force: bool = False) -> None:
        """STATUS, the status file and the metrics: every 5 s, and within 1 s of a finished batch.

        Not after every batch: each publication is a JSON status file written and renamed by
        the main loop, which during a burst is better spent dispatching and predicting.
        """
        if force:
            self._status_owed = True
        if now - self._last_status < (STATUS_BUSY_SECONDS if self._status_owed else STATUS_IDLE_SECONDS):
            return
        self._last_status = now
        self._status_owed = False
        by = self.counts.by_label
        counts: dict[str, Any] = {
            "sorted": {k: by[k] for k in (*CLASSES, LABEL_UNSURE) if by[k]},
            "rejected": by[LABEL_REJECTED],
            "waiting": len(self.readiness),
        }
        self.notifier.status(format_status(counts))
        self._write_status_file()
        self.metrics.set_backlog(len(self.readiness))
        self.metrics.read_ahead_totals(self.read_ahead.used, self.read_ahead.wasted)
        self.metrics.set_blocked(self.blocked_until > time.monotonic())
        self._write_metrics()

    def _write_metrics(self) -> None:
        if self.s.metrics_textfile is None:
            return
        try:
            self.metrics.write_textfile(self.s.metrics_textfile)
        except OSError as exc:
            self.log.warning("cannot write metrics textfile", path=str(self.s.metrics_textfile), error=str(exc))

    def _write_status_file(self) -> None:
        """STATE/status/<worker>.json: what `bikewatch status` shows about this running worker."""
        if not hasattr(self, "work"):
            return
        data = {
            "worker": self.s.worker_name, "pid": os.getpid(), "host": os.uname().nodename,
            "started": self._started_at, "updated": utc_now(), **self._identity,
            "model": self.classifier.identity if self.classifier else "",
            "inbox": str(self.s.inbox), "output": str(self.s.output), "log": str(self.s.log_path),
            "counts": dict(self.counts.by_label), "reasons": dict(self.counts.reasons),
            "batches": self.counts.batches, "waiting": len(self.readiness),
            "last_file": self.counts.last_file, "last_error": self.counts.last_error,
            "output_blocked": self.blocked_until > time.monotonic(), "inbox_ok": self.inbox_ok,
        }
        folder = self.s.state_dir / "status"
        try:
            # Not parents=True: while the inbox is away that would create an empty one in its place.
            folder.mkdir(exist_ok=True)
            tmp = folder / f".{self.work.name}.json.tmp"
            tmp.write_text(json.dumps(data, indent=2))
            os.replace(tmp, folder / f"{self.work.name}.json")
        except OSError as exc:
            self.log.debug("cannot write status file", error=str(exc))

    def _remove_status_file(self) -> None:
        try:
            os.unlink(self.s.state_dir / "status" / f"{self.work.name}.json")
        except (OSError, AttributeError):
            pass


def run_service(args: argparse.Namespace) -> int:
    overrides = {"inbox": args.inbox, "output": args.output, "log": args.log, "model": args.model}
    try:
        settings = validate(load_settings(args.config, overrides=overrides))
    except ConfigError as exc:
        print(f"bikewatch: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure(settings.log_format, settings.log_level)  # W^X and TensorFlow: runtime.require_tensorflow
    notifier = Notifier.from_environ()
    try:
        return Service(settings, notifier).run()
    except ConfigError as exc:
        get_logger().error("configuration error", error=str(exc))
        return EXIT_CONFIG
