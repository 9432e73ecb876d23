"""Batch journals put on disk by hand, for tests of the crash states recovery must finish."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from bikewatch.files import sha256_file
from bikewatch.store.journal import PHASE_DECIDED, Journal

PROBS = {"mountain": (0.9, 0.1), "road": (0.2, 0.8)}


def decided_by_hand(journal: Journal, folder: Path, label: str) -> Journal:
    """``journal`` as the service rewrites it after classification: every item decided as
    ``label``, with the digest, size and mtime of its work file in ``folder``."""
    p_mountain, p_road = PROBS[label]

    def decide(it):  # type: ignore[no-untyped-def]
        st = (folder / it.key).stat()
        return replace(it, label=label, p_mountain=p_mountain, p_road=p_road, sha256=sha256_file(folder / it.key),
                       size=st.st_size, mtime_ns=st.st_mtime_ns, timestamp="2026-01-01T00:00:00.000+00:00",
                       dest=f"{label}/{it.source}")

    return replace(journal, phase=PHASE_DECIDED, items=tuple(decide(it) for it in journal.items))
