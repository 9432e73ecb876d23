"""When to send a batch to the model.

The dispatch rule is TensorFlow Serving's: send when ``max_batch`` files are
ready or when the oldest ready file has waited ``max_wait`` (so one photo in
a quiet inbox is not held back).
"""

from __future__ import annotations


def should_dispatch(n_ready: int, oldest_wait: float, *, max_batch: int, max_wait: float, stopping: bool) -> bool:
    """Send a batch now? Pure, so the policy is testable without a clock."""
    if n_ready == 0 or stopping:
        return False
    return n_ready >= max_batch or oldest_wait >= max_wait
