"""``bikewatch sort DIR --output OUT``: one dump, sorted exactly as the daemon would.

The same :class:`~bikewatch.service.loop.Service` runs in drain mode (same
batching, claims, delivery, CSV and guarantees), without watching, and
returns when DIR is drained. ``--dry-run`` decodes, classifies and decides the same way
(:func:`plan`) and prints the plan, moving nothing.
"""

from __future__ import annotations

import collections
import sys
from typing import Any

from bikewatch.clock import utc_now
from bikewatch.config import Settings
from bikewatch.decision import decide_batch
from bikewatch.decode.pool import DecodePool, default_workers
from bikewatch.logs import get_logger
from bikewatch.store.journal import Item
from bikewatch.intake.scan import scan


def plan(settings: Settings) -> list[Item]:
    """Every file as the daemon would decide it (label, name, reason), changing nothing.

    The daemon's decode path and limits (:class:`~bikewatch.decode.pool.DecodePool`, ``max_pixels``,
    :data:`~bikewatch.decode.prepare.MAX_FILE_BYTES`, ``previews``), its device and model loading,
    and its decision (:func:`~bikewatch.decision.decide_batch`), batch by batch; only the claim
    and the delivery are left out.
    """
    from bikewatch.inference.device import backend_for, configure_device
    from bikewatch.inference.stage import InferenceStage

    found = [s.rel for s in scan(settings.inbox, settings.ignore, skip=[settings.state_dir])]
    inference = InferenceStage(settings.model, max_batch=settings.max_batch, watch_model=False, log=get_logger())
    inference.start(backend_for(configure_device(settings.device)))
    chosen: dict[str, set[str]] = {}
    out: list[Item] = []
    with DecodePool(default_workers(settings.decode_workers), previews=settings.previews) as pool:
        for start in range(0, len(found), settings.max_batch):
            rels = found[start:start + settings.max_batch]
            futures = [pool.submit(settings.inbox / rel, rel, max_pixels=settings.max_pixels) for rel in rels]
            prepared = [f.result() for f in futures]
            good = [i for i, p in enumerate(prepared) if p.array is not None]
            probs = {}
            if good:
                got = inference.predict([prepared[i].array for i in good])  # type: ignore[misc]
                probs = {i: got[j] for j, i in enumerate(good)}
            items = [Item(key=rel, source=rel) for rel in rels]
            out += decide_batch(items, prepared, probs, unsure_below=settings.unsure_below, output=settings.output,
                                decided_at=utc_now(), chosen=chosen)
    return out


def run_sort(settings: Settings, *, dry_run: bool, progress: bool) -> int:
    if dry_run:
        rows = plan(settings)
        for item in rows:
            tail = f"({item.confidence:.3f})" if item.confidence is not None else f"(rejected: {item.error})"
            print(f"{settings.inbox / item.source} -> {settings.output / item.dest} {tail}")
        counts = collections.Counter(item.label for item in rows)
        print(f"dry run: {len(rows)} files would be moved: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        return 0

    from bikewatch.service.loop import Service
    from bikewatch.service.mode import Mode
    from bikewatch.service.systemd import Notifier

    total = sum(1 for _ in scan(settings.inbox, settings.ignore, skip=[settings.state_dir]))
    bar: Any = None
    if progress and total:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="photo", file=sys.stderr, dynamic_ncols=True)
    delivered: list[Item] = []

    def on_batch(items: list[Item]) -> None:
        delivered.extend(items)
        if bar is not None:
            bar.update(len(items))

    service = Service(settings, Notifier(None), mode=Mode.drain(settings.settle_seconds), on_batch=on_batch)
    code = service.run()
    for leftover in (settings.state_dir / "work", settings.state_dir / "status", settings.state_dir):
        try:
            leftover.rmdir()  # only when empty: a dump folder keeps no trace of us
        except OSError:
            pass
    if bar is not None:
        bar.close()
    counts = collections.Counter(i.label for i in delivered)
    reasons = collections.Counter(i.error for i in delivered if i.error)
    print(f"sorted {len(delivered)} files into {settings.output}: "
          + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing to do"))
    for reason, n in reasons.most_common():
        print(f"  rejected {n}: {reason}")
    left = sum(1 for _ in scan(settings.inbox, settings.ignore, skip=[settings.state_dir]))
    if left:
        print(f"{left} files left in {settings.inbox} (see the log above)", file=sys.stderr)
        return 1
    print(f"CSV log: {settings.log_path}")
    return code
