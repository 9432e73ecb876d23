"""The decision: which folder a classified (or unreadable) photo goes to, and under which name.

:func:`decide` is pure. :func:`decide_batch` turns a batch's decode results and the model's
probabilities into decided journal items; the daemon and ``sort --dry-run`` both use it,
so a dry run plans exactly the names and reasons the daemon would write.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from bikewatch.decode.prepare import Prepared
from bikewatch.labels import Label
from bikewatch.store.deliver import free_name
from bikewatch.store.journal import Item


def decide(p_mountain: float, p_road: float, unsure_below: float) -> str:
    """Label from probabilities; ``unsure`` only when a threshold is set and not met."""
    label = Label.ROAD if p_road > p_mountain else Label.MOUNTAIN
    if unsure_below > 0 and max(p_mountain, p_road) < unsure_below:
        return Label.UNSURE.value
    return label.value


def decide_batch(
    items: Sequence[Item],
    prepared: Sequence[Prepared],
    probs: Mapping[int, np.ndarray],
    *,
    unsure_below: float,
    output: str | Path,
    decided_at: str,
    chosen: dict[str, set[str]] | None = None,
) -> list[Item]:
    """Each claimed item with its label, probabilities, digest and a free destination name.

    ``probs`` holds the model's (p_mountain, p_road) by index into ``items``; an item without
    them could not be decoded and goes to ``rejected/`` with its decode error. Names are
    chosen against the output folder and against each other (two ``IMG_0001.jpg`` in one
    batch get ``IMG_0001.jpg`` and ``IMG_0001 (1).jpg``); the delivery's no-clobber rename
    makes a name taken meanwhile cost a retry, never an overwrite. ``chosen`` (names by label)
    carries the names of earlier batches that are not on disk yet (a dry run's plan).
    """
    chosen = {} if chosen is None else chosen
    out = os.fspath(output)
    decided: list[Item] = []
    for i, (item, prep) in enumerate(zip(items, prepared)):
        pm: float | None
        pr: float | None
        if i in probs:
            pm, pr = float(probs[i][0]), float(probs[i][1])
            label = decide(pm, pr, unsure_below)
        else:
            label, pm, pr = Label.REJECTED.value, None, None
        taken = chosen.setdefault(label, set())
        name = free_name(os.path.join(out, label), os.path.basename(item.source), taken)
        taken.add(name)
        decided.append(Item(
            key=item.key, source=item.source, label=label, p_mountain=pm, p_road=pr, sha256=prep.sha256,
            size=prep.size, mtime_ns=prep.mtime_ns, error=prep.error, timestamp=decided_at, dest=f"{label}/{name}",
            decoded_from=prep.decoded_from if i in probs else "",
        ))
    return decided
