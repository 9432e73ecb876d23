"""The benchmark's machine ceiling: the model's FLOPs counted right, and bounds that are bounds."""

from __future__ import annotations

import math

import pytest

from benchmarks.ceiling import ceilings, model_flops
from bikewatch.inference.model import default_model_path
from bikewatch.inference.runtime import read_tflite


def seed_cnn_flops() -> int:
    """The seed CNN's multiply-adds on 64x64x3, by hand: valid 3x3 convolutions, 2x2 pools, dense layers."""
    macs, side, channels = 0, 64, 3
    for pool_after in (False, True, False, True, True):
        side -= 2  # a valid 3x3 convolution
        macs += side * side * 32 * 3 * 3 * channels
        channels = 32
        if pool_after:
            side //= 2
    flat = side * side * channels
    macs += flat * 32 + 32 * 16 + 16 * 2
    return 2 * macs


def test_model_flops_of_the_embedded_model_are_the_seed_cnns() -> None:
    tflite = read_tflite(default_model_path())
    assert tflite is not None
    assert model_flops(tflite) == seed_cnn_flops() == 102_190_912


def test_the_roofline_bounds_what_any_split_of_the_cores_allows() -> None:
    c = ceilings(flops=100_000_000, matmul_gflops=200.0, decode=1200.0, inference=1600.0, naive=20.0)
    assert c["roofline"] == pytest.approx(1 / (1 / 1200 + 1 / 1600))
    # Any end-to-end rate: a share s of the cores decodes, 1 - s infers, the slower side sets the pace.
    best = max(min(1200 * s, 1600 * (1 - s)) for s in (i / 10_000 for i in range(10_001)))
    assert best <= c["roofline"] + 1e-9 and math.isclose(best, c["roofline"], rel_tol=1e-3)
    assert c["vs_decode_limit"] == pytest.approx(1600 / 2800)
    assert c["vs_naive"] == pytest.approx(c["roofline"] / 20)
    assert c["inference_gflops"] == pytest.approx(160.0)
    assert c["inference_vs_matmul"] == pytest.approx(0.8)
    assert c["inference_at_matmul"] == pytest.approx(2000.0)
    assert "vs_naive" not in ceilings(flops=1, matmul_gflops=1.0, decode=1.0, inference=1.0, naive=None)
