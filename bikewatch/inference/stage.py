"""The inference stage: the model loaded and warmed up, replaced between batches, and run.

One model at a time, on the main thread only (the loop's): a batch's probabilities come
from :meth:`InferenceStage.predict`, whose input array is reused from batch to batch
(:class:`~bikewatch.inference.batch.BatchBuffer`). A replaced model file, or SIGHUP, loads
the new model between batches; a model that fails to load leaves the current one running.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from bikewatch.inference.batch import BatchBuffer
from bikewatch.inference.model import SIZE, BackendChoice, ModelError, load_classifier

MODEL_CHECK_SECONDS = 2.0
"""How often the model file is looked at for a replacement (``watch_model``)."""


class Model(Protocol):
    """What the service needs of a classifier (:class:`bikewatch.inference.model.Classifier`, or a test's)."""

    identity: str
    path: Path
    backend: str
    contract: Any  # .to_json(): the input contract, for the log

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


Loader = Callable[[Path | None, BackendChoice], Model]


def _load_classifier(path: Path | None, backend: BackendChoice) -> Model:
    return load_classifier(path, backend=backend)


class InferenceStage:
    """Prepared arrays -> probabilities (N, 2), mountain then road."""

    def __init__(self, model_path: Path | None, *, max_batch: int, watch_model: bool, log: Any,
                 load: Loader = _load_classifier) -> None:
        self.path = model_path
        self.max_batch = max_batch
        self.watch_model = watch_model
        self.log = log
        self._load = load
        self.backend: BackendChoice = "auto"
        self.model: Model | None = None
        self._stat: tuple[int, int, int] | None = None
        self.next_check = 0.0
        self._buffer = BatchBuffer(max_batch)

    @property
    def identity(self) -> str:
        return self.model.identity if self.model is not None else ""

    def start(self, backend: BackendChoice) -> Model:
        """Load and warm up the first model (raises :class:`ModelError`)."""
        self.backend = backend
        self.model = self._warm_load()
        return self.model

    def _warm_load(self) -> Model:
        started = time.monotonic()
        model = self._load(self.path, self.backend)
        if model.backend == "keras" and self.backend == "auto":
            self.log.warning(
                "model has no LiteRT form: running it through TensorFlow (about 700 MiB more, slower under W^X); "
                f"`bikewatch convert {model.path}` adds it", model=model.identity,
            )
        # Size LiteRT's tensors (or trace Keras's graph) for one photo and a full batch before READY:
        # otherwise the first batch of the first dump pays for that.
        for size in sorted({1, self.max_batch}):
            model.predict(np.zeros((size, SIZE, SIZE, 3), dtype=np.float32))
        self._stat = self._stat_model()
        self.log.info(
            "model loaded", model=model.identity, path=str(model.path), backend=model.backend,
            contract=model.contract.to_json(), ms=round((time.monotonic() - started) * 1000),
        )
        return model

    def _stat_model(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def watching(self) -> bool:
        """Whether the model file is looked at (the loop then wakes for :attr:`next_check`)."""
        return self.watch_model and self.path is not None

    def file_changed(self, now: float) -> bool:
        """Whether the model file was replaced (looked at every :data:`MODEL_CHECK_SECONDS` when watched)."""
        if not self.watching() or now < self.next_check:
            return False
        self.next_check = now + MODEL_CHECK_SECONDS
        st = self._stat_model()
        return st is not None and st != self._stat

    def reload(self) -> Model | None:
        """Load the new model in place of the current one; None (and the current one kept) when it fails."""
        old = self.identity
        try:
            new = self._warm_load()
        except (ModelError, OSError) as exc:
            self._stat = self._stat_model()
            self.log.error("model reload failed; keeping the current model", error=str(exc), model=old)
            return None
        self.model = new
        self.log.info("model switched", previous=old, model=new.identity)
        return new

    def predict(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities for up to ``max_batch`` arrays of (64, 64, 3) float32."""
        assert self.model is not None, "start() first"
        return self.model.predict(self._buffer.stack(arrays))
