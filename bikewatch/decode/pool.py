"""Decoding in worker processes: read, hash and preprocess photos outside the service's process.

Why processes: decoding is mostly C, but Pillow's header parsing, EXIF handling and the
glue around them are Python. In threads they hold the one GIL that the main loop, the
claims, the deliveries and watchdog's threads also need; on a 2-core machine that left
about a quarter of a core idle (see ``benchmarks/README.md``). A decoder that crashes
(a codec bug met by a hostile file) also takes only its worker down, not the service.

How: one *proxy thread* per worker process takes queued files, up to :data:`CHUNK` at a
time but no more than its share of the queue, sends their paths over a pipe and waits
for the results (waiting on a pipe releases the GIL). :meth:`DecodePool.submit` returns
a :class:`concurrent.futures.Future`, like a ``ThreadPoolExecutor``, so a read that is
still queued can be cancelled.

A worker that dies, or takes longer than :data:`TIMEOUT_SECONDS` per file, is replaced.
Each file it held is tried again, alone, in a fresh worker; a file that kills or stalls
a fresh worker on its own gets a :class:`Prepared` with the reason (the service rejects
it), instead of a crash loop or a stuck service. Workers ignore SIGINT, SIGTERM
and SIGHUP: systemd signals the whole control group, and the service decides when its
work is done. They exit when their pipe closes, which also happens when the service
is killed.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bikewatch.decode.prepare import Prepared, prepare
from bikewatch.decode.preprocess import SIZE

CHUNK = 16
"""Files sent to a worker in one message at most (and no more than its fair share of the queue).

Every message costs the proxy thread a pickle, a send, a receive and its turns at the
GIL, while the service's other threads want it too. On 2 cores, 16 sorted 5 % more
photos per second end to end than 4, and 2 % more than 8 or 32 (interleaved rounds;
see ``benchmarks/README.md``). The fair share (:func:`take_size`) keeps a batch spread
over all the workers when there are many.
"""


def default_workers(configured: int) -> int:
    """Decode workers: as configured (``decode_workers``), or one per core."""
    return configured or max(1, os.cpu_count() or 1)


def take_size(queued: int, workers: int) -> int:
    """How many files a free proxy takes, ``queued`` being the files waiting, its first one included. Pure."""
    return max(1, min(CHUNK, -(-queued // max(1, workers))))


@dataclass(frozen=True)
class Task:
    """One file for a worker: what :func:`bikewatch.decode.prepare.prepare` needs."""

    path: str  # not a Path: a str pickles and unpickles in a fraction of the time
    key: str
    max_pixels: int
    vouch: bool
    previews: bool = False  # classify camera JPEGs from their embedded preview (see bikewatch.decode.previews)


Packed = tuple[Any, ...]
"""A Prepared as plain values (see :func:`pack`)."""


def pack(p: Prepared) -> Packed:
    """A Prepared as plain values with the array as 12 KiB of uint8: quick to pickle and to send.

    The preprocessor's output holds whole numbers 0..255 (an 8-bit RGB image, resized),
    so uint8 carries it exactly.
    """
    pixels = None if p.array is None else p.array.astype(np.uint8).tobytes()
    return (p.key, pixels, p.sha256, p.size, p.mtime_ns, p.error, p.signature, p.decoded_from)


def unpack(packed: Packed) -> Prepared:
    key, pixels, sha256, size, mtime_ns, error, signature, *rest = packed
    decoded_from = rest[0] if rest else ""  # a job of the older, shorter shape says nothing of it
    array = None if pixels is None else np.frombuffer(pixels, np.uint8).reshape(SIZE, SIZE, 3).astype(np.float32)
    return Prepared(key, array, sha256, size, mtime_ns, error, signature, decoded_from)


def prepare_task(task: Task) -> Packed:
    """What a worker does with one file (the default job)."""
    return pack(prepare(task.path, task.key, max_pixels=task.max_pixels, vouch=task.vouch, previews=task.previews))


Job = Callable[[Task], Packed]

_HELLO = "ready"

NICENESS = 10
"""Workers run this much nicer than the service: the model's threads come first, decoders fill the gaps.

The model is the pipeline's critical path (every batch waits for it), and its intra-op
threads meet at barriers, so a model thread that a decoder preempts stalls the others.
Interleaved A/B, 14 rounds each: 82.2 % of the roofline against 79.5 %, with 1.87 cores
used against 1.83 (benchmarks/README.md). It also leaves other services on the machine
ahead of a big dump's decoding."""

TIMEOUT_SECONDS = 120.0
"""A file still decoding after this long (a codec stuck in a loop) is given up: its worker is killed.

Pillow needs a few seconds at most for the largest image allowed (``max_pixels``)."""


def _serve(conn: multiprocessing.connection.Connection, job: Job) -> None:
    """A worker's whole life: run ``job`` on what arrives, until the pipe closes."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        os.nice(NICENESS)
    except OSError:
        pass  # not allowed here: decoding at the same priority works, only a little slower
    try:
        conn.send(_HELLO)  # up and deaf to stop signals
    except OSError:
        return
    while True:
        try:
            tasks: list[Task] = conn.recv()
        except (EOFError, OSError):
            return
        out: list[tuple[bool, Any]] = []
        for task in tasks:
            try:
                out.append((True, job(task)))
            except Exception as exc:  # noqa: BLE001 - raised again from the caller's future
                out.append((False, exc))
        try:
            conn.send(out)
        except OSError:
            return
        except Exception:  # noqa: BLE001 - an exception that cannot be pickled: send its text
            conn.send([(ok, value if ok else RuntimeError(repr(value))) for ok, value in out])


class WorkerDied(Exception):
    """The worker process ended (or was ended) while it held files.

    ``what`` happened and its ``detail``, kept apart so that the reason can name the file
    when one is blamed, and leave it out when the worker is only replaced.
    """

    def __init__(self, what: str, detail: str = "") -> None:
        super().__init__(what, detail)
        self.what = what
        self.detail = detail

    def reason(self, *, on_file: bool) -> str:
        """E.g. "the decoder crashed on this file (SIGSEGV)", or "the decoder crashed (SIGSEGV)"."""
        return " ".join(filter(None, ("the decoder", self.what, "on this file" if on_file else "", self.detail)))

    @classmethod
    def of_exit(cls, code: int | None) -> WorkerDied:
        if code is None:
            return cls("stopped answering")
        if code < 0:
            try:
                return cls("crashed", f"({signal.Signals(-code).name})")
            except ValueError:
                return cls("crashed", f"(signal {-code})")
        return cls("exited", f"(exit code {code})")


class _Worker:
    """One worker process and the service's end of its pipe."""

    def __init__(self, ctx: Any, name: str, job: Job) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, job), name=name, daemon=True)
        self.process.start()
        child.close()
        self.greeted = False

    def greet(self) -> None:
        """Wait until the worker is up (its imports done, its signals ignored)."""
        if not self.greeted:
            try:
                self.conn.recv()
            except (EOFError, OSError) as exc:
                raise self._died() from exc
            self.greeted = True

    def run(self, tasks: list[Task], timeout: float) -> list[tuple[bool, Any]]:
        """Results for ``tasks``; :class:`WorkerDied` when the worker dies or takes over ``timeout`` per task."""
        self.greet()
        try:
            self.conn.send(tasks)
            if not self.conn.poll(timeout * len(tasks)):
                self.process.kill()
                self.process.join()
                raise WorkerDied(f"took longer than {timeout:g} s", "and was stopped")
            return self.conn.recv()
        except (EOFError, OSError) as exc:
            raise self._died() from exc

    def _died(self) -> WorkerDied:
        """Why the pipe broke: the worker's exit, once it is reaped."""
        self.process.join(timeout=5)
        return WorkerDied.of_exit(self.process.exitcode)

    def close(self) -> None:
        self.conn.close()  # the worker sees EOF and exits
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


_STOP = object()


class DecodePool:
    """``workers`` decode processes behind :meth:`submit`, which returns a future of a :class:`Prepared`."""

    def __init__(self, workers: int, *, job: Job = prepare_task, name: str = "decode",
                 timeout: float = TIMEOUT_SECONDS,
                 on_crash: Callable[[Task, str], None] = lambda task, reason: None,
                 on_restart: Callable[[str], None] = lambda reason: None, previews: bool = False) -> None:
        # Never fork: the service runs TensorFlow's threads. Spawned workers import only
        # bikewatch's light modules (TensorFlow is imported lazily, by the model).
        self._ctx = multiprocessing.get_context("spawn")
        self._job = job
        self._name = name
        self._on_crash = on_crash  # a file was blamed (it will be rejected)
        self._on_restart = on_restart  # a worker was replaced
        self._timeout = timeout
        self._previews = previews  # every file's Task says so (see bikewatch.decode.previews)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.restarts = 0
        self._threads: list[threading.Thread] = []
        self._workers: list[_Worker] = []
        self._up = threading.Semaphore(0)
        for i in range(max(1, workers)):
            self._workers.append(self._spawn(i))
            t = threading.Thread(target=self._proxy, args=(i,), name=f"{name}_{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def wait_ready(self, timeout: float) -> bool:
        """True once every worker has started (or died trying: it is replaced when work comes)."""
        deadline = time.monotonic() + timeout
        for _ in self._threads:
            if not self._up.acquire(timeout=max(0.0, deadline - time.monotonic())):
                return False
        for _ in self._threads:
            self._up.release()  # later calls return at once
        return True

    def pids(self) -> list[int]:
        """The worker processes' ids now (they change when a worker is replaced)."""
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def submit(self, path: str | Path, key: str, *, max_pixels: int, vouch: bool = False) -> Future[Prepared]:
        future: Future[Prepared] = Future()
        self._queue.put((future, Task(os.fspath(path), key, max_pixels, vouch, self._previews)))
        return future

    def shutdown(self) -> None:
        """Finish what is queued, then stop the workers."""
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            t.join()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _spawn(self, index: int) -> _Worker:
        return _Worker(self._ctx, f"bikewatch-{self._name}-{index}", self._job)

    def _proxy(self, index: int) -> None:
        try:
            try:
                self._workers[index].greet()
            except WorkerDied:
                pass  # the first run finds it dead and replaces it
            finally:
                self._up.release()
            while True:
                items = [self._queue.get()]
                limit = take_size(self._queue.qsize() + 1, len(self._threads))
                while len(items) < limit and items[-1] is not _STOP:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = items[-1] is _STOP  # the sentinels come after all work (submits have ended)
                live = [(f, t) for f, t in (items[:-1] if stop else items) if f.set_running_or_notify_cancel()]
                if live:
                    self._run(index, live, retry=True)
                if stop:
                    return
        finally:
            self._workers[index].close()

    def _run(self, index: int, live: list[tuple[Future[Prepared], Task]], *, retry: bool) -> None:
        try:
            results = self._workers[index].run([t for _, t in live], self._timeout)
        except WorkerDied as died:
            self._workers[index].close()
            self._workers[index] = self._spawn(index)
            self.restarts += 1
            self._on_restart(died.reason(on_file=False))
            if retry:  # which file did it? Each alone, in a fresh worker
                for one in live:
                    self._run(index, [one], retry=False)
                return
            future, task = live[0]
            reason = died.reason(on_file=True)
            self._on_crash(task, reason)
            future.set_result(Prepared(task.key, None, "", 0, 0, reason))
            return
        for (future, _), (ok, value) in zip(live, results):
            if ok:
                future.set_result(unpack(value))
            else:
                future.set_exception(value)
