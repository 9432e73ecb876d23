"""The decode stage: a claimed batch's files handed to the decode workers, their results gathered.

Claimed files are read in :class:`~bikewatch.decode.pool.DecodePool`'s worker processes while
the model works on the previous batch. A file read ahead while it settled
(:mod:`bikewatch.service.readahead`) is not read again when the claim shows it unchanged;
if it was classified by a model replaced since, only its array is missing, and the claimed
file is read again here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, wait
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np

from bikewatch.decode.pool import DecodePool
from bikewatch.decode.prepare import Prepared, prepare
from bikewatch.store.journal import Journal


class ReadEarly(Protocol):
    """A file read ahead of its claim (``bikewatch.service.readahead.Usable``)."""

    @property
    def prepared(self) -> Prepared: ...
    @property
    def probs(self) -> np.ndarray | None: ...
    @property
    def model(self) -> str: ...


class DecodeStage:
    """Claimed files -> :class:`Prepared` records (and probabilities already known from a read-ahead)."""

    def __init__(self, pool: DecodePool, *, max_pixels: int, previews: bool) -> None:
        self.pool = pool
        self.max_pixels = max_pixels
        self.previews = previews

    def start(self, journal: Journal, work_dir: Path, early: Mapping[str, ReadEarly]) -> list[Future[Prepared]]:
        """On the claim thread, once the files are claimed: queue the ones not read ahead for decoding."""
        futures: list[Future[Prepared]] = []
        work = os.fspath(work_dir)
        for it in journal.items:
            usable = early.get(it.source)
            if usable is None:
                futures.append(self.pool.submit(os.path.join(work, it.key), it.key, max_pixels=self.max_pixels))
            else:
                done: Future[Prepared] = Future()
                done.set_result(replace(usable.prepared, key=it.key))
                futures.append(done)
        return futures

    def read_ahead(self, path: Path, rel: str) -> Future[Prepared]:
        """A file still settling, read with the signature the read vouches for (never moved)."""
        return self.pool.submit(path, rel, max_pixels=self.max_pixels, vouch=True)

    def gather(self, journal: Journal, futures: Sequence[Future[Prepared]], work_dir: Path,
               early: Mapping[str, ReadEarly], model: str) -> tuple[list[Prepared], dict[int, np.ndarray]]:
        """Wait for the batch's reads: each item's Prepared, and by index the probabilities already known.

        A read-ahead result classified by ``model`` is used as it is; one classified by an
        earlier model carries no array, so the claimed file is read again (in this thread).
        """
        wait(futures)
        prepared = [f.result() for f in futures]
        known: dict[int, np.ndarray] = {}
        for i, item in enumerate(journal.items):
            usable = early.get(item.source)
            if usable is None or prepared[i].error or prepared[i].array is not None:
                continue
            if usable.probs is not None and usable.model == model:
                known[i] = usable.probs  # classified while it settled
            else:  # classified ahead by a model replaced since: read the claimed file again
                prepared[i] = prepare(work_dir / item.key, item.key, max_pixels=self.max_pixels,
                                      previews=self.previews)
        return prepared, known
