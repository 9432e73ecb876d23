"""What this machine allows at all: the model's arithmetic against the CPU's float32 speed.

The performance targets are ratios (end to end against the decode limit and the naive
loop), and whether a ratio can be reached depends on how fast inference *can* be here,
not only on the service. This module measures the two facts that decide that:

- the **model's work**: multiply-adds per photo, counted from the LiteRT model's own
  operators (convolutions and dense layers; pooling and activations are noise beside them);
- the **float32 speed**: a large ``numpy`` matrix product on all cores, which is the
  best-tuned float32 kernel on the machine (OpenBLAS or MKL, hand-written assembly).

With the measured decode and inference rates, :func:`ceilings` gives the end-to-end rate
no service could beat (the roofline) and the target ratios it would give. A target above
its ceiling cannot be met on this machine by any change to the service; only faster
inference could lift the ceiling, and the matmul shows how much faster float32 gets here.
"""

from __future__ import annotations

import time
from math import prod
from pathlib import Path
from typing import Any

MATMUL_SIZE = 2048
"""A square float32 product of this size: big enough to run at the BLAS's full speed, 0.1 s a round."""


def model_flops(tflite: bytes) -> int:
    """Floating-point operations per photo (2 per multiply-add) of a LiteRT model's convolutions
    and dense layers, from its operators' tensor shapes at batch 1."""
    from ai_edge_litert.interpreter import Interpreter

    from bikewatch.inference.runtime import native_output_captured

    with native_output_captured((2,)):
        it = Interpreter(model_content=tflite)
    shapes = {d["index"]: tuple(int(x) for x in d["shape"]) for d in it.get_tensor_details()}
    flops = 0
    for op in it._get_ops_details():  # no public API lists a model's operators (see runtime.check_builtin_ops)
        ins = [shapes[i] for i in op["inputs"] if i >= 0]
        outs = [shapes[i] for i in op["outputs"]]
        if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D") and len(ins) >= 2 and outs:
            flops += 2 * prod(outs[0][1:]) * prod(ins[1][1:])  # each output: kh x kw x in-channels MACs
        elif op["op_name"] == "FULLY_CONNECTED" and len(ins) >= 2:
            flops += 2 * prod(ins[1])  # the weight matrix, once per photo
    return flops


def matmul_peak(rounds: int = 3, size: int = MATMUL_SIZE) -> dict[str, Any]:
    """float32 GFLOP/s of ``numpy.matmul`` on all cores (its BLAS's threads), best of ``rounds``."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.random((size, size), dtype=np.float32)
    b = rng.random((size, size), dtype=np.float32)
    a @ b  # the BLAS's threads start here, not in a timed round
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        n = 0
        while n < 3 or time.perf_counter() - t0 < 0.3:
            a @ b
            n += 1
        rates.append(n * 2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return {"gflops": max(rates), "rounds": rates, "size": size}


def roofline(decode: float, inference: float) -> float:
    """Photos/s when decoding and inference share the cores and nothing else costs anything; pure."""
    return 1 / (1 / decode + 1 / inference)


def ceilings(*, flops: int, matmul_gflops: float, decode: float, inference: float,
             naive: float | None) -> dict[str, float]:
    """Upper bounds for the end-to-end rate and its target ratios on this machine; pure.

    ``decode`` and ``inference`` are the measured rates (photos/s, all cores). The roofline
    shares the cores between them with nothing else to do: a service that cost nothing
    would reach it, none can pass it. ``inference_vs_matmul`` says how close inference
    already is to the machine's best float32 kernel, so how much faster it could get at all.
    """
    bound = roofline(decode, inference)
    out = {
        "flops_per_photo": float(flops),
        "matmul_gflops": matmul_gflops,
        "inference_gflops": inference * flops / 1e9,
        "inference_vs_matmul": inference * flops / 1e9 / matmul_gflops,
        "inference_at_matmul": matmul_gflops * 1e9 / flops,
        "roofline": bound,
        "vs_decode_limit": bound / decode,
    }
    if naive:
        out["vs_naive"] = bound / naive
    return out


def measure(model_path: Path) -> dict[str, Any]:
    """The model's FLOPs per photo and the machine's float32 matmul speed (``ceilings`` needs both)."""
    from bikewatch.inference.runtime import read_tflite

    tflite = read_tflite(model_path)
    if tflite is None:
        raise ValueError(f"{model_path} holds no LiteRT model")
    return {"flops_per_photo": model_flops(tflite), "matmul": matmul_peak()}
