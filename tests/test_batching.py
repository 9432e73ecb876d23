"""The batch buffer that every batch for the model is stacked into (bikewatch.decode.prepare)."""

from __future__ import annotations

import numpy as np

from bikewatch.inference.batch import BatchBuffer
from bikewatch.service.dispatch import should_dispatch


def _arrays(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 64, 3)).astype(np.float32) for _ in range(n)]


def test_stack_is_np_stack_in_a_reused_buffer() -> None:
    buf = BatchBuffer(4)
    first = buf.stack(_arrays(4, 1))
    np.testing.assert_array_equal(first, np.stack(_arrays(4, 1)))
    assert first.dtype == np.float32 and first.flags["C_CONTIGUOUS"]
    second = buf.stack(_arrays(3, 2))
    assert second.shape == (3, 64, 64, 3)
    np.testing.assert_array_equal(second, np.stack(_arrays(3, 2)))
    assert np.shares_memory(first, second)  # the same memory, batch after batch


def test_stack_grows_for_a_larger_batch_and_takes_uint8_input() -> None:
    buf = BatchBuffer(2)
    big = buf.stack(_arrays(5, 3))
    np.testing.assert_array_equal(big, np.stack(_arrays(5, 3)))
    as_bytes = [a.astype(np.uint8) for a in _arrays(2, 4)]
    np.testing.assert_array_equal(buf.stack(as_bytes), np.stack(as_bytes).astype(np.float32))


def test_dispatch_rule() -> None:
    assert should_dispatch(32, 0.0, max_batch=32, max_wait=0.05, stopping=False)
    assert not should_dispatch(3, 0.01, max_batch=32, max_wait=0.05, stopping=False)
    assert should_dispatch(3, 0.05, max_batch=32, max_wait=0.05, stopping=False)
    assert not should_dispatch(0, 9.0, max_batch=32, max_wait=0.05, stopping=False)
    assert not should_dispatch(32, 9.0, max_batch=32, max_wait=0.05, stopping=True)
