"""Which runtime runs the model: LiteRT on CPU, TensorFlow only where it is needed.

The service, ``sort`` and ``classify`` run the CNN through LiteRT
(``ai-edge-litert``): XNNPACK kernels that need no JIT, so they run at full
speed under W^X (``MemoryDenyWriteExecute=yes``), in a tenth of TensorFlow's
memory, imported in milliseconds. TensorFlow stays for training, for the seed
notebook's ``.h5`` weights and for ``device = "gpu"`` (LiteRT has no CUDA
path); it is an optional install (``bikewatch[train]``, ``bikewatch[gpu]``),
imported only through :func:`require_tensorflow`.

A ``.keras`` file written by :func:`bikewatch.inference.model.save_model` carries the
LiteRT flatbuffer as one more zip entry (:data:`TFLITE_ENTRY`) beside its
input contract: one file, one digest, one model identity whichever runtime
runs it, and an atomic replace switches both at once. A LiteRT model holds
operators, not code: only LiteRT's built-in operators are accepted
(:func:`check_builtin_ops`), so a model file cannot bring its own kernels.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import io
import re
import os
import sys
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

Backend = Literal["litert", "keras"]

TFLITE_ENTRY = "bikewatch.tflite"
"""Name of the LiteRT flatbuffer inside a ``.keras`` zip; Keras ignores entries it does not know."""
TFLITE_MAGIC = b"TFL3"
"""FlatBuffers file identifier of a LiteRT model, at bytes 4..8."""
TRAIN_EXTRA = "pip install 'bikewatch[train]'"


class TensorFlowMissing(Exception):
    """A command needs TensorFlow and it is not installed; the message says how to install it."""


def tensorflow_installed() -> bool:
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):  # a None or broken entry in sys.modules: not usable
        return False


_wx_checked = False


def require_tensorflow(purpose: str) -> Any:
    """Import TensorFlow for ``purpose``, or say in one line how to install it.

    Under W^X TensorFlow's oneDNN JIT cannot work, so it is turned off here, before the
    import (a no-op when W+X memory is allowed). LiteRT needs none of this.
    """
    global _wx_checked
    if "tensorflow" not in sys.modules:
        if not tensorflow_installed():
            raise TensorFlowMissing(f"{purpose} needs TensorFlow, which is not installed: {TRAIN_EXTRA}")
        if not _wx_checked:
            _wx_checked = True
            from bikewatch.service.systemd import adapt_tensorflow_to_wx

            if adapt_tensorflow_to_wx():
                from bikewatch.logs import get_logger

                get_logger().info("W^X memory policy detected: oneDNN JIT off (TF_ENABLE_ONEDNN_OPTS=0)")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with native_output_captured((2,)):  # absl's start-up lines, past TF_CPP_MIN_LOG_LEVEL
            import tensorflow

            tensorflow.config.list_physical_devices("GPU")  # "failed call to cuInit" comes here, not later
    import tensorflow as tf

    return tf


def gpu_present() -> bool:
    """An NVIDIA GPU this process can open, found without importing TensorFlow."""
    return any(os.access(p, os.R_OK | os.W_OK) for p in glob.glob("/dev/nvidia[0-9]*"))


def resolve_backend(device: str) -> Backend:
    """``cpu``: LiteRT. ``gpu``: TensorFlow. ``auto``: TensorFlow only with a GPU and TensorFlow at hand."""
    if device == "gpu":
        return "keras"
    if device == "auto" and gpu_present() and tensorflow_installed():
        return "keras"
    return "litert"


def inference_threads() -> int:
    """One LiteRT thread per CPU this process may run on (what TensorFlow's pools used too)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def native_output_captured(fds: tuple[int, ...] = (1, 2)) -> Iterator[list[str]]:
    """What native code writes to ``fds`` while the block runs goes to a list, not the terminal.

    LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." and the converter
    dumps signatures and MLIR notes, straight to file descriptors 1 and 2, past Python.
    """
    lines: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [(fd, os.dup(fd)) for fd in fds]
    with tempfile.TemporaryFile() as tmp, contextlib.redirect_stdout(io.StringIO()) as py_out:
        for fd in fds:
            os.dup2(tmp.fileno(), fd)
        try:
            yield lines
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace") + py_out.getvalue()  # the converter print()s too
            lines.extend(s for s in text.splitlines() if s.strip())


def read_tflite(path: Path) -> bytes | None:
    """The LiteRT model in a ``.keras`` zip, or the whole file if it is a bare ``.tflite``; else None."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[4:8] == TFLITE_MAGIC:
        return path.read_bytes()
    try:
        with zipfile.ZipFile(path) as zf:
            if TFLITE_ENTRY in zf.namelist():
                return zf.read(TFLITE_ENTRY)
    except zipfile.BadZipFile:
        return None
    return None


def convert_keras(keras_model: Any) -> bytes:
    """The Keras model as a LiteRT flatbuffer, through ``TFLiteConverter.from_keras_model``.

    That path, not a traced concrete function (which gave outputs 0.07 off), keeps the
    probabilities equal to Keras's (tests/test_litert.py). Float32, no quantisation.
    """
    tf = require_tensorflow("converting a model to LiteRT")
    with native_output_captured():
        converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
        return bytes(converter.convert())


_BUILTIN_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
"""LiteRT names built-in operators in upper snake case (CONV_2D); custom and Flex ones keep their own names."""


def check_builtin_ops(interpreter: Any, where: str) -> None:
    """Refuse custom and Flex (TensorFlow) operators: a model file runs LiteRT's own kernels only.

    Checked before tensors are allocated, so no operator of the file is prepared. A custom
    operator that slipped past the name check would still find no kernel: no custom op
    resolver is registered, and allocation fails ("unresolved custom op").
    """
    try:
        ops = interpreter._get_ops_details()  # no public API lists a model's operators
    except AttributeError:
        return
    foreign = sorted({name for name in (str(op["op_name"]) for op in ops)
                      if name in ("CUSTOM", "DELEGATE") or not _BUILTIN_NAME.fullmatch(name)})
    if foreign:
        raise ValueError(f"{where}: operators outside LiteRT's built-ins: {', '.join(foreign)}")


def _shape(detail: dict[str, Any]) -> tuple[int | None, ...]:
    """A tensor's shape as Keras writes it: None for a dynamic dimension (LiteRT says -1)."""
    dims = detail.get("shape_signature", detail["shape"])
    return tuple(None if int(d) < 0 else int(d) for d in dims)


class LiteRTRunner:
    """Calls a LiteRT interpreter with (N, 64, 64, 3) float32 batches; any N.

    The input is resized only when N changes (0.05 ms once allocated); one lock, because
    an interpreter is not safe for two threads at once.
    """

    def __init__(self, model: bytes, *, size: int, threads: int | None = None, where: str = "model") -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.threads = threads or inference_threads()
        with native_output_captured((2,)):
            self._it = Interpreter(model_content=model, num_threads=self.threads)
            check_builtin_ops(self._it, where)
            try:
                self._it.allocate_tensors()  # XNNPACK says it is applied here, once
            except RuntimeError as exc:  # e.g. an operator without a kernel
                raise ValueError(str(exc)) from exc
        inputs, outputs = self._it.get_input_details(), self._it.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"{where}: model must have one input and one output, not {len(inputs)} and {len(outputs)}")
        sig_in = _shape(inputs[0])
        sig_out = _shape(outputs[0])
        if sig_in[1:] != (size, size, 3):
            raise ValueError(f"{where}: model input must be (None, {size}, {size}, 3), not {sig_in}")
        if inputs[0]["dtype"] != np.float32:
            raise ValueError(f"{where}: model input must be float32, not {np.dtype(inputs[0]['dtype']).name}")
        if sig_out[1:] != (2,):
            raise ValueError(f"{where}: model must have 2 outputs (mountain, road), not {sig_out}")
        self._in, self._out = inputs[0]["index"], outputs[0]["index"]
        self._n = -1
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            n = len(batch)
            if n != self._n:
                self._it.resize_tensor_input(self._in, [n, *batch.shape[1:]])
                self._it.allocate_tensors()
                self._n = n
            self._it.set_tensor(self._in, batch)
            self._it.invoke()
            return self._it.get_tensor(self._out).copy()  # the interpreter reuses its buffer
