"""``bikewatch sort DIR --output OUT``: one dump, sorted exactly as the daemon would.

The same :class:`~bikewatch.service.loop.Service` runs in one-shot mode (same
batching, claims, delivery, CSV and guarantees), without watching, and
returns when DIR is drained. ``--dry-run`` only classifies and prints the plan.
"""

from __future__ import annotations

import collections
import os
import sys
from typing import Any

from bikewatch.decision import LABEL_REJECTED, decide
from bikewatch.config import Settings
from bikewatch.store.journal import Item, free_name
from bikewatch.intake.scan import scan


def plan(settings: Settings) -> list[tuple[str, str, str, float | None]]:
    """(source, destination, label, confidence) for every file, changing nothing."""
    from bikewatch.offline.classify import classify_paths
    from bikewatch.inference.model import load_classifier

    found = [s for s in scan(settings.inbox, settings.ignore, skip=[settings.state_dir])]
    classifier = load_classifier(settings.model)
    regular = [settings.inbox / s.rel for s in found if s.regular]
    results = {r.path: r for r in classify_paths(classifier, regular, batch_size=settings.max_batch)}
    taken: dict[str, set[str]] = collections.defaultdict(set)
    out = []
    for s in found:
        r = results.get(str(settings.inbox / s.rel))
        if r is None or r.error:
            label, conf = LABEL_REJECTED, None
        else:
            label = decide(r.p_mountain or 0.0, r.p_road or 0.0, settings.unsure_below)
            conf = r.confidence
        name = free_name(settings.output / label, os.path.basename(s.rel), taken[label])
        taken[label].add(name)
        out.append((s.rel, f"{label}/{name}", label, conf))
    return out


def run_sort(settings: Settings, *, dry_run: bool, progress: bool) -> int:
    if dry_run:
        rows = plan(settings)
        for source, dest, _label, conf in rows:
            tail = f"({conf:.3f})" if conf is not None else "(rejected: cannot be classified)"
            print(f"{settings.inbox / source} -> {settings.output / dest} {tail}")
        counts = collections.Counter(label for _, _, label, _ in rows)
        print(f"dry run: {len(rows)} files would be moved: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        return 0

    from bikewatch.service.loop import Service
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

    service = Service(settings, Notifier(None), oneshot=True, on_batch=on_batch)
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
