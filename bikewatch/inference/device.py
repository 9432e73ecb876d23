"""Which device the model runs on: CPU (LiteRT, no TensorFlow) or a GPU (TensorFlow)."""

from __future__ import annotations

import os

from bikewatch.config import ConfigError
from bikewatch.inference.model import BackendChoice


def backend_for(device: str) -> BackendChoice:
    """The model's runtime for what :func:`configure_device` returned: LiteRT where it can on a CPU, Keras on a GPU."""
    return "auto" if device.startswith("cpu") else "keras"


def configure_device(device: str) -> str:
    """CPU (LiteRT, no TensorFlow) or GPU (TensorFlow) as asked; on a GPU, memory growth so the
    service does not grab the whole card."""
    from bikewatch.inference.runtime import TensorFlowMissing, inference_threads, require_tensorflow, resolve_backend

    if resolve_backend(device) == "litert":
        if device == "cpu":  # a model only Keras can run must not find the GPU either
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return f"cpu (LiteRT, {inference_threads()} threads)"
    try:
        tf = require_tensorflow("setting 'device': 'gpu'")
    except TensorFlowMissing as exc:
        raise ConfigError(
            "setting 'device': 'gpu' needs TensorFlow with CUDA, which is not installed: pip install 'bikewatch[gpu]'"
        ) from exc

    gpus = tf.config.list_physical_devices("GPU")
    if device == "cpu":
        if gpus:
            tf.config.set_visible_devices([], "GPU")
        return "cpu"
    if device == "gpu" and not gpus:
        raise ConfigError("setting 'device': 'gpu' was asked for but TensorFlow sees no GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass
    return f"gpu x{len(gpus)} ({gpus[0].name})" if gpus else "cpu"
