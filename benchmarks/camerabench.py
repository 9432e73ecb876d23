"""``./dev bench --camera``: a camera dump, sorted from embedded previews, against the full-image decode limit.

A real dump comes off a phone or a camera: 4000x3000 JPEGs of 2 to 6 MB, each with a
160x120 DCF preview in its EXIF block. On the same freshly made files, in one run:

1. **full decode limit**: the daemon's decode worker processes with ``previews = false``
   (read, sha256, decode at 1/8 DCT scale, 64x64): no sorting can go faster than this
   without the previews;
2. **preview decode**: the same workers with previews on (the head of each file only);
3. **hash cost**: sha256 of the whole files on as many threads, what keeping a full
   digest per row would add to each preview decode;
4. **labels**: the embedded model on the preview input and on the full-image input of
   every photo: how often they agree;
5. **end to end**: a real ``bikewatch run`` with its defaults (previews on), all photos
   renamed into its inbox at once, first rename to last CSV row, the best of ``--runs``;
   and one run with ``previews = false`` for comparison.

The photos are made with Pillow from the source photos (``--photos-from``, default the
shared bike photos; synthetic ones otherwise): scaled to 4000x3000, a random crop, flip
and brightness each, sensor-like grain, a fifth of them stored turned with EXIF
orientation 6, saved at quality 92 with their preview (:mod:`bikewatch.testing.camera`).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.bench import (
    Daemon, RowCounter, best_of, log, measure_end_to_end, publish, source_photos, tree_status_kib, wx_available,
)

SIZE = (4000, 3000)
TARGET_VS_FULL_DECODE = 3.0
TARGET_AGREEMENT = 0.99
TURNED_EVERY = 5  # every fifth photo is stored turned, with EXIF orientation 6


_PAD = 256
_GRAIN: list[Any] = []


def _grain() -> Any:
    """One field of noise per pool process, a random window of it per photo: random numbers are the slow part."""
    import numpy as np

    if not _GRAIN:
        side = max(SIZE) + _PAD
        _GRAIN.append(np.random.default_rng(0).integers(-10, 11, (side, side, 3), dtype=np.int16))
    return _GRAIN[0]


def make_photo(job: tuple[str, str, int]) -> tuple[str, int]:
    """One camera photo from a source photo; runs in a pool process."""
    import numpy as np
    from PIL import Image, ImageEnhance

    from bikewatch.testing.camera import as_stored, camera_jpeg

    src, dst, seed = job
    rng = np.random.default_rng(seed)
    with Image.open(src) as im:
        img = im.convert("RGB")
    w, h = img.size
    cut = rng.uniform(0.0, 0.08, 4)  # up to 8 % off each side
    img = img.crop((int(w * cut[0]), int(h * cut[1]), int(w * (1 - cut[2])), int(h * (1 - cut[3]))))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.85, 1.15)))
    turned = seed % TURNED_EVERY == 0
    size = (SIZE[1], SIZE[0]) if turned else SIZE  # a turned camera sees a portrait scene
    big = np.asarray(img.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    dy, dx = (int(v) for v in rng.integers(0, _PAD, 2))
    big += _grain()[dy:dy + size[1], dx:dx + size[0]]  # sensor grain: camera-sized files
    scene = Image.fromarray(np.clip(big, 0, 255, out=big).astype(np.uint8))
    orientation = 6 if turned else 1
    data = camera_jpeg(as_stored(scene, orientation), orientation=orientation, quality=92)
    Path(dst).write_bytes(data)
    return dst, len(data)


def make_photos(sources: list[Path], folder: Path, count: int, workers: int) -> tuple[list[Path], list[int]]:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(sources[i % len(sources)]), str(folder / f"IMG_{i:04d}.JPG"), i) for i in range(count)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        made = pool.map(make_photo, jobs, chunksize=4)
    return [Path(p) for p, _ in made], [n for _, n in made]


def measure_pool(photos: list[Path], workers: int, previews: bool, min_seconds: float,
                 max_pixels: int) -> tuple[dict[str, Any], list[Any]]:
    """Decode-only in the daemon's worker processes; also every photo's Prepared, from the warm-up."""
    from bikewatch.decode.pool import DecodePool

    with DecodePool(workers, previews=previews) as pool:
        pool.wait_ready(60)
        prepared = [f.result() for f in [pool.submit(p, p.name, max_pixels=max_pixels) for p in photos]]

        def round_() -> int:
            for f in [pool.submit(p, p.name, max_pixels=max_pixels) for p in photos]:
                f.result()
            return len(photos)

        result = best_of(round_, len(photos), min_seconds)
    sources: dict[str, int] = {}
    for p in prepared:
        sources[p.decoded_from or "error"] = sources.get(p.decoded_from or "error", 0) + 1
    return {**result, "workers": workers, "previews": previews, "decoded_from": sources}, prepared


def measure_hash(photos: list[Path], workers: int, min_seconds: float) -> dict[str, Any]:
    from bikewatch.files import sha256_file

    with ThreadPoolExecutor(workers) as pool:  # hashlib lets go of the GIL: threads hash in parallel
        def round_() -> int:
            for _ in pool.map(sha256_file, photos):
                pass
            return len(photos)

        return {**best_of(round_, len(photos), min_seconds), "workers": workers}


def agreement(classifier: Any, quick: list[Any], full: list[Any]) -> dict[str, Any]:
    import numpy as np

    pairs = [(q.array, f.array) for q, f in zip(quick, full) if q.array is not None and f.array is not None]
    a = classifier.predict(np.stack([q for q, _ in pairs])) if pairs else np.zeros((0, 2))
    b = classifier.predict(np.stack([f for _, f in pairs])) if pairs else np.zeros((0, 2))
    same = int((a.argmax(axis=1) == b.argmax(axis=1)).sum())
    return {"photos": len(pairs), "same": same, "fraction": same / max(1, len(pairs)),
            "max_abs_p_diff": float(np.abs(a - b).max()) if pairs else 0.0,
            "mean_abs_p_diff": float(np.abs(a - b).mean()) if pairs else 0.0}


def end_to_end(work: Path, settings: dict[str, Any], photos: list[Path], runs: int, name: str) -> dict[str, Any]:
    """``runs`` dumps of ``photos`` into a fresh daemon; the photos are moved back after each run."""
    from bikewatch.store.ledger import read_rows

    root = work / name
    inbox, output = root / "inbox", root / "sorted"
    inbox.mkdir(parents=True)
    why_not = wx_available()  # as deployed: under W^X where the kernel can impose it
    daemon = Daemon(root, {**settings, "inbox": str(inbox), "output": str(output)}, wx=why_not is None)
    try:
        log(f"{name}: starting the daemon" + (" under W^X (PR_SET_MDWE)" if why_not is None else f"; no W^X: {why_not}"))
        daemon.start()
        counter = RowCounter(output / "classifications.csv")
        time.sleep(1.0)
        results = []
        for r in range(runs):
            log(f"{name}: {len(photos)} photos at once (run {r + 1} of {runs})")
            results.append(measure_end_to_end(daemon, counter, photos, inbox))
            time.sleep(0.5)
            for label in ("mountain", "road", "unsure", "rejected"):
                for f in (output / label).glob("*") if (output / label).is_dir() else ():
                    os.rename(f, photos[0].parent / f.name)  # back to where they came from, for the next run
        best = max(results, key=lambda x: x["rate"])
        best["runs"] = [x["rate"] for x in results]
        best["hwm_kib"] = tree_status_kib(daemon.pid, "VmHWM")
        rows = list(read_rows(output / "classifications.csv"))
        best["decoded_from"] = {k: sum(1 for x in rows if x.get("decoded_from") == k) for k in ("preview", "full", "")}
        best["labels"] = {k: sum(1 for x in rows if x.get("label") == k) for k in ("mountain", "road", "rejected")}
        best["rows"] = len(rows)
        if len(rows) != runs * len(photos):
            raise RuntimeError(f"{name}: expected {runs * len(photos)} CSV rows, found {len(rows)}")
        return best
    finally:
        daemon.stop()


def run_camera(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bikewatch.config import Settings

    count = int(args.camera)
    if count < 1 or args.runs < 1:
        print("bikewatch: error: --camera and --runs must be positive", file=sys.stderr)
        return 2
    defaults = Settings()
    cores = os.cpu_count() or 1
    workers = defaults.decode_workers or cores
    batch = args.batch or defaults.max_batch
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bwc-", dir=parent))
    try:
        sources, origin = source_photos(args, work)
        log(f"making {count} camera photos of {SIZE[0]}x{SIZE[1]} from {len(sources)} photos ({origin})")
        t0 = time.monotonic()
        photos, sizes = make_photos(sources, work / "dump", count, cores)
        made_s = time.monotonic() - t0
        os.sync()
        r: dict[str, Any] = {
            "machine": {"cores": cores, "loadavg_start": os.getloadavg()[0]},
            "photos": count, "photos_from": origin, "made_s": made_s,
            "mean_mb": sum(sizes) / len(sizes) / 1e6, "min_mb": min(sizes) / 1e6, "max_mb": max(sizes) / 1e6,
        }
        from bikewatch.inference.model import load_classifier

        classifier = load_classifier(args.model)
        r["model"] = classifier.identity
        log(f"full decode limit ({workers} worker processes, previews off)")
        r["full_decode"], full = measure_pool(photos, workers, False, args.min_seconds, defaults.max_pixels)
        log(f"preview decode ({workers} worker processes)")
        r["preview_decode"], quick = measure_pool(photos, workers, True, args.min_seconds, defaults.max_pixels)
        log(f"sha256 of the whole files ({workers} threads)")
        r["hash"] = measure_hash(photos, workers, args.min_seconds)
        r["preview_plus_hash"] = 1 / (1 / r["preview_decode"]["rate"] + 1 / r["hash"]["rate"])
        r["agreement"] = agreement(classifier, quick, full)
        del classifier, full, quick
        settings: dict[str, Any] = {"log_format": "json", "worker_name": "bench", "max_batch": batch}
        if args.model is not None:
            settings["model"] = str(args.model.resolve())
        r["end_to_end"] = end_to_end(work, settings, photos, args.runs, "previews-on")
        r["end_to_end_full"] = end_to_end(work, {**settings, "previews": False}, photos, 1, "previews-off")
        r["machine"]["loadavg_end"] = os.getloadavg()[0]
        e2e, limit = r["end_to_end"]["rate"], r["full_decode"]["rate"]
        r["vs_full_decode"] = e2e / limit
        r["targets"] = {"vs_full_decode": r["vs_full_decode"] >= TARGET_VS_FULL_DECODE,
                        "agreement": r["agreement"]["fraction"] >= TARGET_AGREEMENT}
        return publish(render(r, batch), r, args.json)
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        print(f"bikewatch: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _cpu(m: dict[str, Any]) -> str:
    return f"other procs {m['cpu']['other_cores']:.2f} cores"


def render(r: dict[str, Any], batch: int) -> str:
    full, quick, h, e2e, off = r["full_decode"], r["preview_decode"], r["hash"], r["end_to_end"], r["end_to_end_full"]
    ag = r["agreement"]

    def row(name: str, value: str, note: str) -> str:
        return f"{name:<34}{value:>20}  {note}"

    lines = [
        f"bikewatch bench --camera: {r['machine']['cores']} cores, {r['photos']} photos of {SIZE[0]}x{SIZE[1]} "
        f"({r['mean_mb']:.1f} MB mean, {r['min_mb']:.1f}-{r['max_mb']:.1f}) made from {r['photos_from']} "
        f"in {r['made_s']:.0f} s, batch {batch}, model {r['model']}",
        row("measurement", "value", "notes"),
        row("-" * 32, "-" * 20, "-----"),
        row("1 full decode limit", f"{full['rate']:.1f} photos/s",
            f"read+sha256+decode at 1/8 scale, {full['workers']} worker processes, best of 3 rounds; {_cpu(full)}"),
        row("2 preview decode", f"{quick['rate']:.1f} photos/s",
            f"head only, same workers; sources {quick['decoded_from']}; {_cpu(quick)}"),
        row("3 sha256 of whole files", f"{h['rate']:.1f} photos/s",
            f"{1000 / h['rate'] * h['workers']:.2f} ms per photo per core; preview + full hash would be "
            f"{r['preview_plus_hash']:.1f} photos/s"),
        row("4 same label, preview vs full", f"{ag['same']}/{ag['photos']}",
            f"{100 * ag['fraction']:.2f} %; |p diff| mean {ag['mean_abs_p_diff']:.4f}, max {ag['max_abs_p_diff']:.4f}"),
        row(f"5 end to end ({e2e['photos']} photos)", f"{e2e['rate']:.1f} photos/s",
            f"{e2e['seconds']:.2f} s first rename -> last CSV row, best of {len(e2e['runs'])} runs ("
            + ", ".join(f"{x:.0f}" for x in e2e["runs"]) + f"/s); daemon {e2e['daemon_cores']:.2f} cores; "
            f"rows {e2e['decoded_from']}; {_cpu(e2e)}"),
        row("  end to end, previews off", f"{off['rate']:.1f} photos/s",
            f"{off['seconds']:.2f} s, one run; daemon {off['daemon_cores']:.2f} cores; {_cpu(off)}"),
        row("  memory under load", f"{e2e['hwm_kib'] / 1024:.0f} MiB", "VmHWM, the daemon and its decode workers"),
        "",
        f"end-to-end / full decode limit  {r['vs_full_decode']:.1f}x   target >= {TARGET_VS_FULL_DECODE:g}x",
        f"  [{'met   ' if r['targets']['vs_full_decode'] else 'NOT met'}] end to end >= "
        f"{TARGET_VS_FULL_DECODE:g}x the full-image decode limit",
        f"  [{'met   ' if r['targets']['agreement'] else 'NOT met'}] same label from preview and full image for "
        f">= {100 * TARGET_AGREEMENT:g} % of the photos",
    ]
    return "\n".join(lines)

