"""``./dev bench``: how fast bikewatch sorts, against the seed notebook, in one run.

On the same photos and the same machine it measures:

1. **naive**: the seed notebook as a loop, one photo at a time: full decode
   (no reduced JPEG decoding), resize to 64x64, ``model.predict`` on a batch
   of one, ``shutil.move``, and a CSV row appended with open/append/close;
2. **decode**: the daemon's per-file work (read, sha256, :mod:`bikewatch.decode.preprocess`)
   on worker threads, one per core, and in the daemon's decode worker processes;
   the roofline uses the faster of the two;
3. **inference**: :meth:`Classifier.predict` on ready arrays at the batch size,
   through LiteRT as the service runs it;
4. **roofline**: what 2 and 3 allow when they share the cores,
   ``1 / (1/decode + 1/inference)``; the faster decode row alone is the
   **decode limit**, what no model could beat;
5. **end to end**: a real ``bikewatch run`` child: N photos renamed into its
   inbox at once, timed from the first rename to the last CSV row; the best of
   ``--runs`` such runs (default 3), as 2 and 3 are the best of three rounds.
   The child runs as deployed, under W^X: ``prctl(PR_SET_MDWE,
   PR_MDWE_REFUSE_EXEC_GAIN)`` before exec, which is what systemd >= 254 does
   for ``MemoryDenyWriteExecute=yes`` (Linux >= 6.3; the table says when the
   kernel cannot). A second, unrestricted daemon gives the figures beside it;
6. **latency**: single photos dropped into a quiet inbox, from the rename to
   the CSV row, raw and minus the settle time the daemon waits by design
   (a rename into the inbox says "complete", so ``closed_settle_seconds`` applies);
7. **idle cost**: CPU the daemon uses with an empty inbox, its memory idle and
   under load (peak RSS of the daemon and its decode workers), and its
   start-up time to ``READY=1``;
8. **install size**: the runtime packages (bikewatch's dependencies without
   extras, from their installed RECORDs): what ``pip install bikewatch`` adds.

Photos come from ``--photos-from`` (default ``../shared/data/bikes`` beside
the repository) or, when that is absent, synthetic 1000x600 JPEGs. Other
processes on the machine distort every figure here: the table reports how
much CPU they used during each measurement.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmarks import ceiling
from bikewatch.testing.notify import NotifyListener

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "bikes"
TICK = os.sysconf("SC_CLK_TCK")

TARGET_VS_NAIVE = 35.0
TARGET_VS_DECODE = 0.55
TARGET_VS_ROOFLINE = 0.77
AIM_VS_ROOFLINE = 0.85
TARGET_READY_S = 1.5
TARGET_PEAK_RSS_MIB = 250.0
TARGET_INSTALL_MB = 300.0
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
TARGET_LATENCY_OVER_SETTLE_S = 0.300
TARGET_IDLE_CPU_PCT = 1.0


# ----- arguments --------------------------------------------------------------------------------


def add_photo_arguments(p: argparse.ArgumentParser) -> None:
    """Where the photos come from (see :func:`source_photos`); every benchmark here takes these."""
    p.add_argument("--photos-from", type=Path, default=None, metavar="DIR",
                   help=f"source photos, searched recursively (default {DEFAULT_PHOTOS} when present, "
                        "else synthetic 1000x600 JPEGs)")
    p.add_argument("--synthetic", action="store_true", help="use synthetic JPEGs even when shared photos exist")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--photos", type=int, default=2000, metavar="N",
                   help="photos for the end-to-end run (copies of the source photos; default 2000)")
    p.add_argument("--batch", type=int, default=None, metavar="B",
                   help="batch size for inference and the daemon's max_batch (default: the daemon's default)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write every figure as JSON")
    add_photo_arguments(p)
    p.add_argument("--runs", type=int, default=3, metavar="K",
                   help="end-to-end runs of N photos each; the best is compared with the roofline, as decode "
                        "and inference are best of 3 rounds too (default 3)")
    p.add_argument("--naive", type=int, default=200, metavar="N", help="photos for the naive baseline (default 200)")
    p.add_argument("--latency-drops", type=int, default=20, metavar="N",
                   help="single photos dropped into the quiet inbox (default 20)")
    p.add_argument("--idle-seconds", type=float, default=10.0, metavar="S",
                   help="window for the idle CPU measurement (default 10)")
    p.add_argument("--min-seconds", type=float, default=2.0, metavar="S",
                   help="minimum duration of the decode-only and inference-only measurements (default 2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a daemon setting for the end-to-end run (TOML value), e.g. --set decode_workers=2")
    p.add_argument("--model", type=Path, default=None, help="model file (default: the embedded model)")
    p.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                   help="where the temporary inbox/output go (default: the system temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (the daemon's log is in it)")
    p.add_argument("--wx", choices=("both", "on", "off"), default="both",
                   help="daemon memory policy: 'on' W^X as deployed (MemoryDenyWriteExecute=yes), 'off' "
                        "unrestricted, 'both' (default) W^X with the unrestricted end-to-end figures beside it")
    p.add_argument("--camera", type=int, nargs="?", const=300, default=None, metavar="N",
                   help="instead: a camera dump of N 4000x3000 JPEGs with embedded previews (default 300), "
                        "end to end against the full-image decode limit (benchmarks.camerabench)")


# ----- small helpers -------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def publish(table: str, result: dict[str, Any], json_path: Path | None) -> int:
    """Print a bench's table and, when asked, write its figures as JSON; the command's exit status."""
    print(table)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {json_path}")
    return 0


def proc_cpu_seconds(pid: int | str = "self", tid: int | None = None) -> float:
    """utime + stime of a whole process (all threads), from /proc/PID/stat; of one thread with ``tid``."""
    with open(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait)."""
    with open("/proc/stat") as fh:
        parts = [int(x) for x in fh.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return (sum(parts[:8]) - idle) / TICK


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants now (the daemon's decode workers are its children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except OSError:
            continue  # gone meanwhile
    return out


def cpu_by_pid(pids: Sequence[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            out[pid] = proc_cpu_seconds(pid)
        except OSError:
            pass
    return out


def tree_status_kib(pid: int, key: str) -> int:
    """A /proc status figure summed over ``pid`` and its descendants (shared pages count once per process)."""
    total = 0
    for p in process_tree(pid):
        try:
            total += proc_status_kib(p, key)
        except OSError:
            pass
    return total


def tree_pss_kib(pid: int) -> int:
    """Proportional set size of ``pid`` and its descendants: shared pages split, as the cgroup counts them once."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                total += next((int(line.split()[1]) for line in fh if line.startswith("Pss:")), 0)
        except OSError:
            pass
    return total


class CpuMeter:
    """CPU used during a span: by us, by the daemon (and its workers), and by everything else on the machine."""

    def __init__(self, daemon_pid: int | None = None) -> None:
        self.daemon_pid = daemon_pid
        self.t0 = time.monotonic()
        self.busy0 = machine_busy_seconds()
        self.cpu0 = cpu_by_pid(process_tree(os.getpid()))

    def stop(self) -> dict[str, float]:
        wall = max(1e-9, time.monotonic() - self.t0)
        busy = machine_busy_seconds() - self.busy0
        delta = {p: c - self.cpu0.get(p, 0.0) for p, c in cpu_by_pid(process_tree(os.getpid())).items()}
        in_daemon = set(process_tree(self.daemon_pid)) if self.daemon_pid else set()
        daemon = sum(v for p, v in delta.items() if p in in_daemon)
        mine = sum(v for p, v in delta.items() if p not in in_daemon)
        other = max(0.0, busy - mine - daemon)
        return {"wall_s": wall, "bench_cpu_s": mine, "daemon_cpu_s": daemon, "other_cpu_s": other,
                "other_cores": other / wall}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); with 20 samples p99 is the maximum."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


class RowCounter:
    """Counts CSV rows as they are appended, reading only the new bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines = 0

    def rows(self) -> int:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return 0
        self.offset += len(data)
        self.lines += data.count(b"\n")
        return max(0, self.lines - 1)  # the header


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.005) -> float:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# ----- photos ---------------------------------------------------------------------------------------


def source_photos(args: argparse.Namespace, work: Path) -> tuple[list[Path], str]:
    from bikewatch.decode.preprocess import is_image_name

    folder = args.photos_from if args.photos_from is not None else DEFAULT_PHOTOS
    if not args.synthetic and folder.is_dir():
        photos = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_name(p.name))
        if photos:
            return photos, str(folder)
    if args.photos_from is not None and not args.synthetic:
        raise FileNotFoundError(f"no photos found under {args.photos_from}")
    return synthetic_photos(work / "synthetic", 48), "synthetic 1000x600 JPEGs"


def synthetic_photos(folder: Path, count: int) -> list[Path]:
    """Product-photo-like JPEGs: a light background, shapes, a little noise; ~100-200 KB each."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1337)
    out = []
    for i in range(count):
        w, h = 1000, 600
        base = rng.integers(200, 256, size=3)
        grad = np.linspace(0, 40, w, dtype=np.float32)[None, :, None]
        pixels = np.clip(base[None, None, :] - grad + rng.normal(0, 6, size=(h, w, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(3):  # wheels and a frame
            r = int(rng.integers(90, 170))
            cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=tuple(int(v) for v in rng.integers(0, 120, 3)),
                         width=int(rng.integers(6, 20)))
        for _ in range(6):
            pts = [tuple(int(v) for v in rng.integers(0, (w, h))) for _ in range(2)]
            draw.line(pts, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(4, 16)))
        path = folder / f"synthetic_{i:03d}.jpg"
        image.save(path, "JPEG", quality=90)
        out.append(path)
    return out


def stage_copies(photos: list[Path], folder: Path, count: int, prefix: str) -> list[Path]:
    """``count`` copies of the photos (cycled) under distinct names, made durable."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        src = photos[i % len(photos)]
        dst = folder / f"{prefix}-{i:06d}-{src.name}"
        shutil.copyfile(src, dst)
        out.append(dst)
    return out


# ----- 1. naive ---------------------------------------------------------------------------------------


def measure_naive(classifier: Any, photos: list[Path], work: Path) -> dict[str, Any]:
    """The seed notebook as a service: everything per photo, nothing shared."""
    import numpy as np
    from PIL import Image

    from bikewatch.inference.model import CLASSES

    inbox, out, log_path = work / "naive-in", work / "naive-out", work / "naive.csv"
    for label in CLASSES:
        (out / label).mkdir(parents=True, exist_ok=True)
    staged = stage_copies(photos, inbox, len(photos), "naive")
    if classifier.keras_model is not None:  # the notebook: Keras model.predict on a batch of one
        keras_model = classifier.keras_model

        def predict(x: Any) -> Any:
            return keras_model.predict(x, verbose=0)
    else:  # no TensorFlow here: LiteRT on a batch of one (faster than the notebook; a harder baseline)
        def predict(x: Any) -> Any:
            return classifier._call(x)
    # One untimed call: the notebook's model was built and used before its loop, too.
    predict(classifier.contract.adapt(np.zeros((1, 64, 64, 3), np.float32)))
    os.sync()
    meter = CpuMeter()
    t0 = time.perf_counter()
    for path in staged:
        with Image.open(path) as im:  # full-size decode, like cv2.imread
            rgb = im.convert("RGB")
        x = np.asarray(rgb.resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32)
        probs = np.asarray(predict(classifier.contract.adapt(x[None])))[0]
        probs = probs[[classifier.contract.classes.index(c) for c in CLASSES]]
        label = CLASSES[int(np.argmax(probs))]
        dest = out / label / path.name
        shutil.move(str(path), str(dest))
        with open(log_path, "a", newline="") as fh:
            csv.writer(fh).writerow([time.time(), str(path), str(dest), label, f"{float(np.max(probs)):.6f}"])
    elapsed = time.perf_counter() - t0
    cpu = meter.stop()
    return {"photos": len(staged), "seconds": elapsed, "rate": len(staged) / elapsed, "cpu": cpu,
            "runtime": "keras" if classifier.keras_model is not None else "litert"}


# ----- 2. decode only ---------------------------------------------------------------------------------


def measure_decode(photos: list[Path], workers: int, min_photos: int, min_seconds: float,
                   max_pixels: int) -> tuple[dict[str, Any], list[Any]]:
    """The daemon's worker-thread stage (read, hash, preprocess) on ``workers`` threads."""
    from concurrent.futures import ThreadPoolExecutor

    from bikewatch.decode.prepare import prepare

    def one(path: Path) -> Any:
        return prepare(path, path.name, max_pixels=max_pixels)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-decode") as pool:
        arrays = [p.array for p in pool.map(one, photos) if p.array is not None]  # warm the page cache

        def round_() -> int:
            for _ in pool.map(one, photos):
                pass
            return len(photos)

        result = best_of(round_, min_photos, min_seconds)
    return {**result, "workers": workers}, arrays


def measure_decode_processes(photos: list[Path], workers: int, min_photos: int, min_seconds: float,
                             max_pixels: int) -> dict[str, Any]:
    """The same stage the way the daemon runs it: in ``workers`` decode processes (bikewatch.decode.pool)."""
    from bikewatch.decode.pool import DecodePool

    with DecodePool(workers) as pool:
        pool.wait_ready(60)

        def round_() -> int:
            for f in [pool.submit(p, p.name, max_pixels=max_pixels) for p in photos]:
                f.result()
            return len(photos)

        round_()  # warm
        result = best_of(round_, min_photos, min_seconds)
    return {**result, "workers": workers}


ROUNDS = 3


def best_of(step: Callable[[], int], min_photos: int, min_seconds: float) -> dict[str, Any]:
    """Repeat ``step`` (which returns photos done) in ROUNDS rounds; the rate is the best round's.

    A capability measure: a round slowed by a neighbour's burst of work says nothing about
    what the code can do, and the best round makes the roofline harder, not easier, to reach.
    """
    meter = CpuMeter()
    rates, done, t_all = [], 0, time.perf_counter()
    for _ in range(ROUNDS):
        n, t0 = 0, time.perf_counter()
        while n < min_photos / ROUNDS or time.perf_counter() - t0 < min_seconds / ROUNDS:
            n += step()
        rates.append(n / (time.perf_counter() - t0))
        done += n
    return {"photos": done, "seconds": time.perf_counter() - t_all, "rate": max(rates), "rounds": rates,
            "cpu": meter.stop()}


# ----- 3. inference only ------------------------------------------------------------------------------


def measure_inference(classifier: Any, arrays: list[Any], batch: int, min_photos: int,
                      min_seconds: float) -> dict[str, Any]:
    import numpy as np

    pool = np.stack([arrays[i % len(arrays)] for i in range(max(batch, len(arrays)))])
    batches = [pool[i: i + batch] for i in range(0, len(pool) - batch + 1, batch)]
    classifier.predict(batches[0])  # trace

    def round_() -> int:
        for b in batches:
            classifier.predict(b)
        return sum(len(b) for b in batches)

    return {**best_of(round_, min_photos, min_seconds), "batch": batch}


# ----- 5-7. the daemon ----------------------------------------------------------------------------------


class Daemon:
    """A ``bikewatch run`` child on a temporary config; READY=1 comes over a real NOTIFY_SOCKET."""

    def __init__(self, work: Path, settings: dict[str, Any], *, wx: bool = False,
                 env: dict[str, str] | None = None) -> None:
        self.work = work
        self.wx = wx  # W^X as MemoryDenyWriteExecute=yes imposes it, set in the child before exec
        self.extra_env = env or {}  # on top of this process's environment
        self.config = work / "bench.toml"
        self.config.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items()))
        self.log_file = work / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.listener: NotifyListener | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 180.0) -> float:
        """Start the child; seconds until it sent READY=1."""
        self.listener = NotifyListener(self.work / "notify.sock")
        env = {**os.environ, **self.extra_env, **self.listener.env(), "TF_CPP_MIN_LOG_LEVEL": "3"}
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        t0 = time.monotonic()
        with open(self.log_file, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "bikewatch", "run", "--config", str(self.config)],
                                         cwd=self.work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=deny_write_execute if self.wx else None)
        self.listener.start(self.alive)
        deadline = t0 + timeout
        while not self.listener.ready.wait(0.05):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode} before READY=1:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no READY=1 from the daemon after {timeout:.0f}s:\n{self.tail()}")
        assert self.listener.ready_at is not None
        return self.listener.ready_at - t0

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.listener is not None:
            self.listener.close()
        return self.proc.returncode


def deny_write_execute() -> None:
    """In the child, before exec: no memory may become writable and executable, as under systemd."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE) failed")


def wx_available() -> str | None:
    """None when a child can run under PR_SET_MDWE and it is in force there; else why not."""
    probe = "from bikewatch.service.systemd import write_execute_denied; print(write_execute_denied())"
    try:
        done = subprocess.run([sys.executable, "-c", probe], preexec_fn=deny_write_execute, capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"this kernel has no PR_SET_MDWE (Linux >= 6.3): {exc}"
    if done.stdout.strip() != "True":
        return f"PR_SET_MDWE did not deny W+X memory in a child ({done.stdout.strip() or done.stderr.strip()})"
    return None


def runtime_install_bytes() -> dict[str, Any]:
    """Bytes of bikewatch and its runtime dependencies (no extras), as installed: what ``pip install`` adds."""
    import re
    from importlib import metadata

    seen: dict[str, int] = {}
    todo = ["bikewatch"]
    while todo:
        name = re.split(r"[\s\[<>=!~;(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[name] = sum((f.size or 0) for f in (dist.files or []))
        for req in dist.requires or []:
            if "extra ==" not in req:  # only what is installed counts, so other markers need no check
                todo.append(req)
    return {"bytes": sum(seen.values()), "packages": dict(sorted(seen.items(), key=lambda kv: -kv[1]))}


def measure_idle(daemon: Daemon, seconds: float) -> dict[str, Any]:
    meter = CpuMeter(daemon.pid)
    time.sleep(seconds)
    cpu = meter.stop()
    return {"seconds": cpu["wall_s"], "cpu_s": cpu["daemon_cpu_s"],
            "pct_of_core": 100 * cpu["daemon_cpu_s"] / cpu["wall_s"], "cpu": cpu}


def measure_latency(daemon: Daemon, counter: RowCounter, staged: list[Path], inbox: Path) -> dict[str, Any]:
    samples = []
    for path in staged:
        before = counter.rows()
        time.sleep(0.3)  # a quiet inbox: nothing else arriving
        if counter.rows() != before:
            raise RuntimeError("rows appeared in a quiet inbox")
        t0 = time.monotonic()
        os.rename(path, inbox / path.name)
        t1 = wait_for(lambda: counter.rows() > before or not daemon.alive(), 60, f"{path.name} to be sorted",  # noqa: B023
                      interval=0.002)
        if not daemon.alive():
            raise RuntimeError(f"the daemon died:\n{daemon.tail()}")
        samples.append(t1 - t0)
    return {"drops": len(samples), "samples_s": samples,
            "p50_s": percentile(samples, 50), "p99_s": percentile(samples, 99)}


def measure_end_to_end(daemon: Daemon, counter: RowCounter, staged: list[Path], inbox: Path) -> dict[str, Any]:
    base = counter.rows()
    n = len(staged)
    meter = CpuMeter(daemon.pid)
    t0 = time.monotonic()
    for path in staged:
        os.rename(path, inbox / path.name)
    renamed = time.monotonic() - t0
    first: float | None = None
    first_rows = 0
    hwm_deadline = time.monotonic() + 120 + n / 5

    def done() -> bool:
        nonlocal first, first_rows
        rows = counter.rows() - base
        if rows and first is None:
            first, first_rows = time.monotonic(), rows
        if not daemon.alive():
            raise RuntimeError(f"the daemon died:\n{daemon.tail()}")
        return rows >= n

    t_last = wait_for(done, hwm_deadline - time.monotonic(), f"{n} CSV rows", interval=0.01)
    cpu = meter.stop()
    wall = t_last - t0
    assert first is not None
    steady = (n - first_rows) / (t_last - first) if t_last > first else float("nan")
    return {"photos": n, "seconds": wall, "rate": n / wall, "rename_s": renamed, "first_row_s": first - t0,
            "rate_steady": steady, "cpu": cpu, "daemon_cores": cpu["daemon_cpu_s"] / wall}


def count_outputs(output: Path) -> dict[str, int]:
    return {d.name: sum(1 for _ in d.iterdir()) for d in sorted(output.iterdir()) if d.is_dir()}


# ----- the run --------------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    what: str
    value: str
    notes: str


def run_bench(args: argparse.Namespace) -> int:
    if getattr(args, "camera", None) is not None:
        from benchmarks.camerabench import run_camera

        return run_camera(args)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bikewatch.config import ConfigError, Settings, coerce

    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            print(f"bikewatch: error: --set wants KEY=VALUE, not {item!r}", file=sys.stderr)
            return 2
        try:
            import tomllib

            value = tomllib.loads(f"v = {raw}")["v"]
        except ValueError:
            value = raw
        try:
            overrides[key.strip()] = coerce(key.strip(), value, "--set")
        except ConfigError as exc:
            print(f"bikewatch: error: {exc}", file=sys.stderr)
            return 2
    defaults = Settings()
    batch = args.batch or int(overrides.get("max_batch", defaults.max_batch))
    settle_s = float(overrides.get("settle_seconds", defaults.settle_seconds))
    closed_settle_s = float(overrides.get("closed_settle_seconds", defaults.closed_settle_seconds))
    # Every photo here arrives by rename, the upload contract's "complete" signal: the short settle applies.
    rename_settle_s = min(closed_settle_s, settle_s)
    workers = int(overrides.get("decode_workers", defaults.decode_workers)) or (os.cpu_count() or 1)
    max_pixels = int(overrides.get("max_pixels", defaults.max_pixels))
    for name in ("photos", "runs", "naive", "latency_drops"):
        if getattr(args, name) < 0 or (name in ("photos", "runs") and getattr(args, name) < 1):
            print(f"bikewatch: error: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2

    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bwb-", dir=parent))
    daemon: Daemon | None = None
    try:
        photos, origin = source_photos(args, work)
        log(f"{len(photos)} source photos from {origin}; work folder {work}")
        result: dict[str, Any] = {
            "machine": {"cores": os.cpu_count(), "loadavg_start": os.getloadavg()[0]},
            "photos_from": origin, "distinct_photos": len(photos), "batch": batch,
            "settle_seconds": settle_s, "closed_settle_seconds": closed_settle_s,
            "rename_settle_seconds": rename_settle_s,
        }

        import numpy as np  # noqa: F401  (after the env var above)

        from bikewatch.inference.model import load_classifier
        from bikewatch.inference.runtime import inference_threads, tensorflow_installed

        classifier = load_classifier(args.model)  # LiteRT, as the service runs it
        result["model"] = classifier.identity
        result["inference_runtime"] = f"{classifier.backend}, {inference_threads()} threads"
        result["install"] = runtime_install_bytes()

        # 1. naive: the seed notebook ran Keras; without TensorFlow here, LiteRT stands in
        naive_photos = [photos[i % len(photos)] for i in range(args.naive)]
        if naive_photos:
            log(f"naive baseline on {len(naive_photos)} photos")
            naive_model = load_classifier(args.model, backend="keras") if tensorflow_installed() else classifier
            result["naive"] = measure_naive(naive_model, naive_photos, work)
            del naive_model

        modes = {"both": ["wx", "open"], "on": ["wx"], "off": ["open"]}[args.wx]
        if "wx" in modes and (why := wx_available()) is not None:
            log(f"W^X cannot be imposed here: {why}; measuring the unrestricted daemon only")
            result["wx_unavailable"] = why
            modes = ["open"]
        result["modes"] = modes
        expected_total = 0
        for m, mode in enumerate(modes):
            first = m == 0
            where = work / mode
            inbox, output = where / "inbox", where / "sorted"
            inbox.mkdir(parents=True)
            settings: dict[str, Any] = {"inbox": str(inbox), "output": str(output), "log_format": "json",
                                        "worker_name": f"bench-{mode}", "max_batch": batch}
            if args.model is not None:
                settings["model"] = str(args.model.resolve())
            settings.update({k: (str(v) if isinstance(v, Path) else v) for k, v in overrides.items()})
            settings["max_batch"] = batch
            log(f"[{mode}] staging {args.runs} x {args.photos}" + (f" + {args.latency_drops} copies" if first else ""))
            staged = [stage_copies(photos, where / f"stage{r}", args.photos, f"bench{r}") for r in range(args.runs)]
            drops = stage_copies(photos, where / "stage-latency", args.latency_drops, "latency") if first else []
            os.sync()  # no dirty pages of ours for the daemon's fsyncs to wait for

            daemon = Daemon(where, settings, wx=mode == "wx")
            log(f"[{mode}] starting the daemon" + (" under W^X (PR_SET_MDWE)" if mode == "wx" else ", unrestricted"))
            startup = daemon.start()
            counter = RowCounter(output / "classifications.csv")
            part: dict[str, Any] = {"startup_s": startup}
            time.sleep(1.0)
            if first:
                log(f"idle for {args.idle_seconds:g}s")
                idle = measure_idle(daemon, args.idle_seconds)
                idle["rss_kib"] = tree_status_kib(daemon.pid, "VmRSS")
                part["idle"] = idle
                if drops:
                    log(f"latency: {len(drops)} single drops")
                    lat = measure_latency(daemon, counter, drops, inbox)
                    lat["p50_minus_settle_s"] = lat["p50_s"] - rename_settle_s
                    lat["p99_minus_settle_s"] = lat["p99_s"] - rename_settle_s
                    part["latency"] = lat
                # 2. decode only, 3. inference only, 4. roofline: right before the end-to-end run, which
                # they are compared with (this machine's speed drifts by 10% over minutes; the daemon idles).
                log(f"decode only ({workers} threads)")
                result["decode"], arrays = measure_decode(photos, workers, min(args.photos, 2000),
                                                          args.min_seconds, max_pixels)
                log(f"inference only (batch {batch}, {result['inference_runtime']})")
                result["inference"] = measure_inference(classifier, arrays, batch, min(args.photos, 2000),
                                                         args.min_seconds)
                log(f"decode only ({workers} worker processes, as the daemon decodes)")
                result["decode_processes"] = measure_decode_processes(photos, workers, min(args.photos, 2000),
                                                                      args.min_seconds, max_pixels)
                # The roofline takes the faster way to decode: the harder target.
                d = max(result["decode"]["rate"], result["decode_processes"]["rate"])
                i = result["inference"]["rate"]
                result["decode_limit"] = {"rate": d}
                result["roofline"] = {"rate": ceiling.roofline(d, i)}
                del arrays
            runs = []
            for r, batch_of_copies in enumerate(staged):
                log(f"[{mode}] end to end: {args.photos} photos (run {r + 1} of {args.runs})")
                if r:
                    time.sleep(1.0)  # the previous run's last deliveries are done; the daemon idles
                runs.append(measure_end_to_end(daemon, counter, batch_of_copies, inbox))
            e2e = max(runs, key=lambda run: run["rate"])
            e2e["runs"] = [run["rate"] for run in runs]
            e2e["seconds_minus_settle"] = e2e["seconds"] - rename_settle_s
            e2e["rate_minus_settle"] = e2e["photos"] / e2e["seconds_minus_settle"]
            e2e["hwm_kib"] = tree_status_kib(daemon.pid, "VmHWM")
            e2e["rss_kib"] = tree_status_kib(daemon.pid, "VmRSS")
            e2e["pss_kib"] = tree_pss_kib(daemon.pid)
            e2e["processes"] = len(process_tree(daemon.pid))
            part["end_to_end"] = e2e
            if first:
                time.sleep(1.0)
                log(f"idle again for {args.idle_seconds:g}s")
                part["idle_after_load"] = measure_idle(daemon, args.idle_seconds)
            part["outputs"] = count_outputs(output)
            part["daemon_exit"] = daemon.stop()
            expected = args.runs * args.photos + len(drops)
            sorted_total = sum(v for k, v in part["outputs"].items())
            if sorted_total != expected or counter.rows() != expected:
                raise RuntimeError(f"[{mode}] expected {expected} sorted photos and CSV rows, found {sorted_total} "
                                   f"files and {counter.rows()} rows")
            expected_total += expected
            if first:
                result.update(part)  # the deployed daemon's figures are the main ones
                result["mode"] = mode
            else:
                result["unrestricted"] = part
            daemon = None
            shutil.rmtree(where, ignore_errors=True)  # the copies: a second set would double the disk used
        result["machine"]["loadavg_end"] = os.getloadavg()[0]  # before the matmul below loads the cores
        # Last, with every daemon stopped: the model's FLOPs and numpy's float32 matmul, for scale.
        # (The BLAS's threads may spin a while after a product: nothing is timed after this.)
        log("the model's FLOPs per photo and numpy's float32 matmul on all cores")
        try:
            result["machine_ceiling"] = ceiling.measure(classifier.path)
        except ValueError as exc:  # a .h5 or a .keras without its LiteRT entry: no operators to count
            log(f"no machine ceiling: {exc}")
        del classifier
        evaluate_targets(result)
        return publish(render_table(result, args), result, args.json)
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        print(f"bikewatch: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if daemon is not None:
            daemon.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def evaluate_targets(r: dict[str, Any]) -> None:
    e2e = r["end_to_end"]
    t: dict[str, Any] = {}
    # The targets are judged on the raw end-to-end figure, settle time included, as the issue
    # defines them; minus-settle and steady-state figures are reported beside them.
    rate = e2e["rate_minus_settle"]
    if "naive" in r:
        e2e["vs_naive"] = e2e["rate"] / r["naive"]["rate"]
        e2e["vs_naive_minus_settle"] = rate / r["naive"]["rate"]
        t["vs_naive"] = {"target": TARGET_VS_NAIVE, "value": e2e["vs_naive"], "met": e2e["vs_naive"] >= TARGET_VS_NAIVE}
    for part in [e2e] + ([r["unrestricted"]["end_to_end"]] if "unrestricted" in r else []):
        part["vs_decode_limit"] = part["rate"] / r["decode_limit"]["rate"]
        part["vs_roofline"] = part["rate"] / r["roofline"]["rate"]
        part["vs_roofline_minus_settle"] = part["rate_minus_settle"] / r["roofline"]["rate"]
        part["vs_roofline_steady"] = part["rate_steady"] / r["roofline"]["rate"]
    t["vs_decode_limit"] = {"target": TARGET_VS_DECODE, "value": e2e["vs_decode_limit"],
                            "met": e2e["vs_decode_limit"] >= TARGET_VS_DECODE}
    t["vs_roofline"] = {"target": TARGET_VS_ROOFLINE, "value": e2e["vs_roofline"],
                        "met": e2e["vs_roofline"] >= TARGET_VS_ROOFLINE}
    if "latency" in r:
        limit = r.get("rename_settle_seconds", r["settle_seconds"]) + TARGET_LATENCY_OVER_SETTLE_S
        t["latency_p99"] = {"target": limit, "value": r["latency"]["p99_s"], "met": r["latency"]["p99_s"] <= limit}
    t["idle_cpu"] = {"target": TARGET_IDLE_CPU_PCT, "value": r["idle"]["pct_of_core"],
                     "met": r["idle"]["pct_of_core"] < TARGET_IDLE_CPU_PCT}
    t["ready"] = {"target": TARGET_READY_S, "value": r["startup_s"], "met": r["startup_s"] <= TARGET_READY_S}
    peak = e2e["hwm_kib"] / 1024
    t["peak_rss"] = {"target": TARGET_PEAK_RSS_MIB, "value": peak, "met": peak <= TARGET_PEAK_RSS_MIB}
    if "machine_ceiling" in r:  # what no service could beat here: see benchmarks/ceiling.py
        mc = r["machine_ceiling"]
        r["ceilings"] = ceiling.ceilings(flops=mc["flops_per_photo"], matmul_gflops=mc["matmul"]["gflops"],
                                         decode=r["decode_limit"]["rate"], inference=r["inference"]["rate"],
                                         naive=r["naive"]["rate"] if "naive" in r else None)
        for key in ("vs_naive", "vs_decode_limit"):
            if key in t and key in r["ceilings"]:
                t[key]["ceiling"] = r["ceilings"][key]
    mb = r["install"]["bytes"] / 1e6
    t["install"] = {"target": TARGET_INSTALL_MB, "value": mb, "met": mb <= TARGET_INSTALL_MB}
    r["targets"] = t


def _other(cpu: dict[str, float]) -> str:
    return f"other procs {cpu['other_cores']:.2f} cores"


MODE_NAMES = {"wx": "W^X", "open": "unrestricted"}


def render_table(r: dict[str, Any], args: argparse.Namespace) -> str:
    rows: list[Row] = []
    mib = 1024.0
    mode = MODE_NAMES[r["mode"]]
    if "naive" in r:
        n = r["naive"]
        rows.append(Row("naive", f"1 naive baseline ({n['photos']} photos)", f"{n['rate']:8.1f} photos/s",
                        f"full decode + predict(1) ({'Keras' if n.get('runtime') == 'keras' else 'LiteRT'}) + move "
                        f"+ CSV each; {_other(n['cpu'])}"))
    d = r["decode"]
    rows.append(Row("decode", f"2 decode only ({d['workers']} threads)", f"{d['rate']:8.1f} photos/s",
                    f"read+sha256+preprocess, best of {len(d['rounds'])} rounds; {_other(d['cpu'])}"))
    if "decode_processes" in r:
        dp = r["decode_processes"]
        rows.append(Row("decode_processes", f"  decode only ({dp['workers']} processes)",
                        f"{dp['rate']:8.1f} photos/s",
                        f"the same in the daemon's decode worker processes; {_other(dp['cpu'])}"))
    rows.append(Row("decode_limit", "  decode limit", f"{r['decode_limit']['rate']:8.1f} photos/s",
                    "the faster decode row: no model, all cores"))
    i = r["inference"]
    rows.append(Row("inference", f"3 inference only (batch {i['batch']})", f"{i['rate']:8.1f} photos/s",
                    f"Classifier.predict ({r.get('inference_runtime', '?')}), best of {len(i['rounds'])} rounds; "
                    f"{_other(i['cpu'])}"))
    rows.append(Row("roofline", "4 roofline (2 and 3 share cores)", f"{r['roofline']['rate']:8.1f} photos/s",
                    "1/(1/decode limit + 1/inference)"))
    if "ceilings" in r:
        c = r["ceilings"]
        mm = r["machine_ceiling"]["matmul"]
        rows.append(Row("float32_matmul", "  float32 matmul", f"{c['matmul_gflops']:8.1f} GFLOP/s",
                        f"numpy {mm['size']}x{mm['size']} float32 matmul on all cores, best of {len(mm['rounds'])}: "
                        "the machine's best-tuned float32 kernel, for scale"))
        rows.append(Row("inference_gflops", "  inference arithmetic", f"{c['inference_gflops']:8.1f} GFLOP/s",
                        f"row 3 x {c['flops_per_photo'] / 1e6:.1f} MFLOP per photo: {c['inference_vs_matmul'] * 100:.0f}% "
                        "of the matmul's rate"))
    e = r["end_to_end"]
    runs = e.get("runs", [e["rate"]])
    rows.append(Row("end_to_end", f"5 end to end, {mode} ({e['photos']} photos)", f"{e['rate']:8.1f} photos/s",
                    f"{e['seconds']:.2f} s first rename -> last CSV row, best of {len(runs)} runs "
                    f"({', '.join(f'{x:.0f}' for x in runs)}/s); daemon {e['daemon_cores']:.2f} cores; "
                    f"{_other(e['cpu'])}"))
    rows.append(Row("end_to_end_minus_settle", "  end to end minus settle", f"{e['rate_minus_settle']:8.1f} photos/s",
                    f"{e['seconds_minus_settle']:.2f} s (settle after a rename {r['rename_settle_seconds']:g} s: "
                    "no file may be moved sooner)"))
    rows.append(Row("end_to_end_steady", "  end to end, steady state", f"{e['rate_steady']:8.1f} photos/s",
                    f"first CSV row ({e['first_row_s']:.2f} s) -> last"))
    if "unrestricted" in r:
        u = r["unrestricted"]
        ue = u["end_to_end"]
        rows.append(Row("end_to_end_unrestricted", f"  end to end, unrestricted ({ue['photos']} photos)",
                        f"{ue['rate']:8.1f} photos/s",
                        f"W+X allowed; best of {len(ue['runs'])} ({', '.join(f'{x:.0f}' for x in ue['runs'])}/s), "
                        f"{ue['vs_decode_limit'] * 100:.1f}% of the decode limit; READY {u['startup_s']:.2f} s, "
                        f"peak {ue['hwm_kib'] / mib:.0f} MiB; {_other(ue['cpu'])}"))
    if "latency" in r:
        lat = r["latency"]
        rows.append(Row("latency", f"6 latency p50 / p99 ({lat['drops']} drops)",
                        f"{lat['p50_s'] * 1000:6.0f} / {lat['p99_s'] * 1000:.0f} ms",
                        "rename into inbox -> CSV row"))
        rows.append(Row("latency_minus_settle", "  latency minus settle p50 / p99",
                        f"{lat['p50_minus_settle_s'] * 1000:6.0f} / {lat['p99_minus_settle_s'] * 1000:.0f} ms",
                        f"closed_settle_seconds {r['rename_settle_seconds']:g} (a rename into the inbox says "
                        f"\"complete\"; settle_seconds {r['settle_seconds']:g} s is for files with no such signal)"))
    idle = r["idle"]
    rows.append(Row("idle_cpu", f"7 idle CPU ({idle['seconds']:.0f} s, empty inbox)",
                    f"{idle['pct_of_core']:8.2f} % of a core",
                    f"{idle['cpu_s']:.2f} CPU s; after load {r['idle_after_load']['pct_of_core']:.2f} %"))
    rows.append(Row("memory", "  memory idle / peak", f"{idle['rss_kib'] / mib:5.0f} / {e['hwm_kib'] / mib:.0f} MiB",
                    f"VmRSS idle / VmHWM after the runs (then VmRSS {e['rss_kib'] / mib:.0f}, PSS "
                    f"{e.get('pss_kib', 0) / mib:.0f} MiB); the daemon and its {e.get('processes', 1) - 1} child "
                    "processes (decode workers, resource tracker), summed"))
    rows.append(Row("startup", "  start-up to READY=1", f"{r['startup_s']:8.2f} s",
                    f"spawn -> READY=1 on NOTIFY_SOCKET ({mode})"))
    dec_ms = 1000 * d["cpu"]["bench_cpu_s"] / d["photos"]
    inf_ms = 1000 * i["cpu"]["bench_cpu_s"] / i["photos"]
    e2e_ms = 1000 * e["cpu"]["daemon_cpu_s"] / e["photos"]
    r["cpu_per_photo_ms"] = {"decode": dec_ms, "inference": inf_ms, "end_to_end": e2e_ms}
    rows.append(Row("cpu_per_photo", "  CPU per photo", f"{e2e_ms:8.2f} ms",
                    f"the daemon and its workers in row 5; decode {dec_ms:.2f} + inference {inf_ms:.2f} ms (rows 2, "
                    f"3): {e2e_ms - dec_ms - inf_ms:.2f} ms of the service's own work (less skewed by other procs "
                    "than the rates)"))
    inst = r["install"]
    top = ", ".join(f"{k} {v / 1e6:.0f}" for k, v in list(inst["packages"].items())[:4])
    rows.append(Row("install", "8 runtime install", f"{inst['bytes'] / 1e6:8.1f} MB",
                    f"bikewatch + runtime deps as installed ({len(inst['packages'])} packages; {top} MB)"))

    width = max(len(x.what) for x in rows)
    vwidth = max(len(x.value) for x in rows)
    lines = [f"bikewatch bench: {r['machine']['cores']} cores, {r['distinct_photos']} photos from "
             f"{r['photos_from']}, batch {r['batch']}, model {r['model']}, daemon {mode}"]
    if "wx_unavailable" in r:
        lines.append(f"note: W^X could not be imposed ({r['wx_unavailable']}); all daemon figures are unrestricted")
    lines += [f"{'measurement':{width}}  {'value':{vwidth}}  notes",
              f"{'-' * width}  {'-' * vwidth}  -----"]
    lines += [f"{x.what:{width}}  {x.value:{vwidth}}  {x.notes}" for x in rows]
    lines.append("")
    if "naive" in r:
        lines.append(f"end-to-end / naive         {e['vs_naive']:6.1f}x   (minus settle "
                     f"{e['vs_naive_minus_settle']:.1f}x)   target >= {TARGET_VS_NAIVE:g}x")
    lines.append(f"end-to-end / decode limit  {e['vs_decode_limit'] * 100:6.1f}%   target >= {TARGET_VS_DECODE * 100:g}%")
    lines.append(f"end-to-end / roofline      {e['vs_roofline'] * 100:6.1f}%   (minus settle "
                 f"{e['vs_roofline_minus_settle'] * 100:.1f}%, steady state {e['vs_roofline_steady'] * 100:.1f}%)"
                 f"   target >= {TARGET_VS_ROOFLINE * 100:g}%, aim {AIM_VS_ROOFLINE * 100:g}%")
    names = {"vs_naive": f"end-to-end >= {TARGET_VS_NAIVE:g}x naive",
             "vs_decode_limit": f"end-to-end >= {TARGET_VS_DECODE * 100:g}% of the decode limit",
             "vs_roofline": f"end-to-end >= {TARGET_VS_ROOFLINE * 100:g}% of roofline",
             "latency_p99": f"latency p99 <= settle + {TARGET_LATENCY_OVER_SETTLE_S * 1000:.0f} ms",
             "idle_cpu": f"idle CPU < {TARGET_IDLE_CPU_PCT:g}% of a core",
             "ready": f"READY=1 within {TARGET_READY_S:g} s of spawn",
             "peak_rss": f"peak RSS of daemon + workers <= {TARGET_PEAK_RSS_MIB:g} MiB",
             "install": f"runtime install <= {TARGET_INSTALL_MB:g} MB"}
    for key, t in r["targets"].items():
        bound = ""
        if "ceiling" in t:  # the ratio that even a service costing nothing would reach here
            value = f"{t['ceiling']:.1f}x" if key == "vs_naive" else f"{t['ceiling'] * 100:.1f}%"
            above = "; the target is above it" if t["target"] > t["ceiling"] else ""
            bound = f"   (ceiling here: {value} at the roofline{above})"
        lines.append(f"  [{'met' if t['met'] else 'MISSED':6}] {names[key]}{bound}")
    busy = [x for x in ("naive", "decode", "decode_processes", "inference", "end_to_end") if x in r
            and r[x]["cpu"]["other_cores"] > 0.1]
    if busy:
        lines.append(f"warning: other processes used CPU during {', '.join(busy)}; those figures are low")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``./dev bench`` (``python -m benchmarks.bench``): a development tool, kept out of the runtime package."""
    parser = argparse.ArgumentParser(
        prog="bench", description="benchmark: naive loop vs decode/inference roofline vs a real daemon",
        epilog="example: ./dev bench --photos 2000 --json bench.json")
    add_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
