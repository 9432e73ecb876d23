"""``python -m benchmarks.servicecost``: what the service costs beside a bare decode-and-classify loop.

The roofline (``./dev bench``, row 4) assumes decoding and inference share the cores with
nothing else to do. This measures how close a loop with nothing else to do really gets,
and how far the daemon is from that loop, on the same photos at the same moment:

- **bare**: the daemon's own :class:`bikewatch.decode.pool.DecodePool` (worker processes,
  read + sha256 + preprocess) feeding :meth:`Classifier.predict` in batches of
  ``max_batch``, every file submitted at once (so decoding runs ahead of inference as in
  the daemon). No claims, journals, moves, CSV, logs or watcher;
- **daemon**: a real ``bikewatch run`` under W^X (as ``./dev bench`` runs it) sorting the
  same number of photos renamed into its inbox, from the first rename to the last CSV row.

The two alternate, ``--rounds`` times each, because this machine's speed drifts by about
10 % over minutes: a ratio of neighbours is steadier than either rate. The difference is
the price of everything the service does beyond decoding and inference (the settle time
included: no photo may be moved sooner).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.bench import (
    Daemon, RowCounter, add_photo_arguments, log, measure_end_to_end, source_photos, stage_copies, wx_available,
)


def bare_rate(pool: Any, classifier: Any, files: list[Path], batch: int, max_pixels: int) -> float:
    """Photos per second of the bare loop over ``files``."""
    import numpy as np

    t0 = time.perf_counter()
    futures = [pool.submit(f, f.name, max_pixels=max_pixels) for f in files]
    for start in range(0, len(futures), batch):
        arrays = [a for a in (f.result().array for f in futures[start:start + batch]) if a is not None]
        if arrays:
            classifier.predict(np.stack(arrays))
    return len(files) / (time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="servicecost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=2000, help="photos per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each, alternating (default 3)")
    add_photo_arguments(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from bikewatch.config import Settings
    from bikewatch.decode.pool import DecodePool, default_workers
    from bikewatch.inference.model import load_classifier

    defaults = Settings()
    batch, max_pixels = defaults.max_batch, defaults.max_pixels
    work = Path(tempfile.mkdtemp(prefix="bwcost-"))
    daemon: Daemon | None = None
    try:
        photos, origin = source_photos(args, work)
        inbox, output = work / "inbox", work / "sorted"
        inbox.mkdir()
        wx = wx_available() is None
        log(f"{len(photos)} photos from {origin}; {args.rounds} rounds of {args.photos}; daemon "
            f"{'under W^X' if wx else 'unrestricted (no PR_SET_MDWE here)'}")
        bare_files = stage_copies(photos, work / "bare", args.photos, "bare")
        staged = [stage_copies(photos, work / f"stage{r}", args.photos, f"r{r}") for r in range(args.rounds)]
        os.sync()
        daemon = Daemon(work, {"inbox": str(inbox), "output": str(output), "log_format": "json",
                               "worker_name": "servicecost", "max_batch": batch}, wx=wx)
        daemon.start()
        counter = RowCounter(output / "classifications.csv")
        classifier = load_classifier(None)
        bare: list[float] = []
        served: list[float] = []
        with DecodePool(default_workers(defaults.decode_workers)) as pool:
            pool.wait_ready(60)
            bare_rate(pool, classifier, bare_files[: batch * 4], batch, max_pixels)  # warm the workers
            for r in range(args.rounds):
                time.sleep(1.0)  # the previous round's last deliveries are done
                bare.append(bare_rate(pool, classifier, bare_files, batch, max_pixels))
                time.sleep(1.0)
                served.append(measure_end_to_end(daemon, counter, staged[r], inbox)["rate"])
                log(f"round {r + 1}: bare {bare[-1]:.0f}/s, daemon {served[-1]:.0f}/s "
                    f"({served[-1] / bare[-1] * 100:.1f}%)")
        ratios = [s / b for s, b in zip(served, bare)]
        print(f"servicecost: {args.rounds} x {args.photos} photos, batch {batch}, daemon {'W^X' if wx else 'open'}")
        print(f"  bare loop  {', '.join(f'{x:.0f}' for x in bare)} photos/s")
        print(f"  daemon     {', '.join(f'{x:.0f}' for x in served)} photos/s")
        print(f"  daemon / bare, round by round: {', '.join(f'{x * 100:.1f}%' for x in ratios)}; "
              f"median {statistics.median(ratios) * 100:.1f}%")
        return 0
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
