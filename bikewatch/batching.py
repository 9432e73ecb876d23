"""Batches: when to send one, how to prepare its files, and how to label the results.

The dispatch rule is TensorFlow Serving's: send when ``max_batch`` files are
ready or when the oldest ready file has waited ``max_wait`` (so one photo in
a quiet inbox is not held back). Preparation (read, hash, preprocess) runs in
worker threads while the model works on the previous batch.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bikewatch.preprocess import PreprocessError, preprocess_bytes

MAX_FILE_BYTES = 512 * 1024 * 1024
"""Larger files are hashed in chunks and rejected, never read into memory whole."""

LABEL_REJECTED = "rejected"
LABEL_UNSURE = "unsure"


def should_dispatch(n_ready: int, oldest_wait: float, *, max_batch: int, max_wait: float, stopping: bool) -> bool:
    """Send a batch now? Pure, so the policy is testable without a clock."""
    if n_ready == 0 or stopping:
        return False
    return n_ready >= max_batch or oldest_wait >= max_wait


@dataclass(frozen=True)
class Prepared:
    """A claimed file after reading: its model input, or why it has none."""

    key: str
    array: np.ndarray | None
    sha256: str
    size: int
    mtime_ns: int
    error: str = ""


def digest_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare(path: Path, key: str, *, max_pixels: int) -> Prepared:
    """Read a claimed file once: hash and preprocess the same bytes. Never follows links."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        try:
            st = os.lstat(path)
        except OSError:
            return Prepared(key, None, "", 0, 0, f"cannot open file: {exc.strerror}")
        if stat.S_ISLNK(st.st_mode):
            return Prepared(key, None, "", st.st_size, st.st_mtime_ns, "symbolic link (never followed)")
        return Prepared(key, None, "", st.st_size, st.st_mtime_ns, f"cannot open file: {exc.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Prepared(key, None, "", 0, st.st_mtime_ns, "not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            return Prepared(key, None, digest_file(path), st.st_size, st.st_mtime_ns,
                            f"file too large ({st.st_size} bytes)")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read()
    except OSError as exc:
        return Prepared(key, None, "", 0, 0, f"cannot read file: {exc.strerror}")
    finally:
        os.close(fd)
    digest = hashlib.sha256(data).hexdigest()
    try:
        array = preprocess_bytes(data, max_pixels=max_pixels)
    except PreprocessError as exc:
        return Prepared(key, None, digest, len(data), st.st_mtime_ns, exc.reason)
    return Prepared(key, array, digest, len(data), st.st_mtime_ns)


def decide(p_mountain: float, p_road: float, unsure_below: float) -> str:
    """Label from probabilities; ``unsure`` only when a threshold is set and not met."""
    label = "road" if p_road > p_mountain else "mountain"
    if unsure_below > 0 and max(p_mountain, p_road) < unsure_below:
        return LABEL_UNSURE
    return label
