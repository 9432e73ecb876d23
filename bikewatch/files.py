"""File helpers every stage shares: one sha256, one fsync of a folder, one write-then-rename."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (a photo is never read into memory whole for this)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make renames and new names in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str], *, durable: bool = False, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, rename it over ``path``.

    A reader therefore sees the old file or the new one, never half of one. ``durable``
    fsyncs the file before the rename and the folder after it (journals: a power cut
    must not leave the rename without the bytes). On an error the temporary is removed.
    ``suffix`` keeps an extension that a writer looks at (Keras saves only to ``.keras``).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(target.parent)


def write_atomic(path: str | os.PathLike[str], data: str | bytes, *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` through :func:`replacing`."""
    with replacing(path, durable=durable) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
