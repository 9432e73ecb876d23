"""Decoding a claimed file: read it once, hash it, and make the model's input (or say why not).

Preparation (read, hash, preprocess) runs in
decode worker processes (:mod:`bikewatch.decode.pool`) while the model works on the
previous batch.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bikewatch.decode import previews as _previews
from bikewatch.files import sha256_file
from bikewatch.decode.preprocess import PreprocessError, preprocess_bytes, preprocess_preview
from bikewatch.intake.scan import Signature, stat_signature

MAX_FILE_BYTES = 512 * 1024 * 1024
"""Larger files are hashed in chunks and rejected, never read into memory whole."""

@dataclass(frozen=True)
class Prepared:
    """A claimed file after reading: its model input, or why it has none."""

    key: str
    array: np.ndarray | None
    sha256: str
    size: int
    mtime_ns: int
    error: str = ""
    # (size, mtime_ns, ctime_ns, inode) when the bytes read are known to be the file's whole content
    # as long as a later lstat shows the same four values; None when that cannot be vouched for.
    signature: Signature | None = None
    # "preview" (the embedded EXIF preview, only the file's head read, no sha256), "full", or "" (not decoded)
    decoded_from: str = ""


DECODED_PREVIEW = "preview"
DECODED_FULL = "full"


VOUCH_AGE_NS = 50_000_000
"""How long a file must have been still, by its ctime, when a read begins, for the read to vouch for it.

File times come from a coarse clock (one tick, up to 10 ms): a write landing in the
same tick as the read could leave size, mtime and ctime as they were. A write after
a read that began more than a tick past the ctime always moves the ctime."""

COARSE_VOUCH_AGE_NS = 2_100_000_000
"""The same for filesystems whose times have whole seconds only (FAT keeps 2 s)."""


def signature_of(before: os.stat_result, after: os.stat_result, read_began_ns: int) -> Signature | None:
    """The signature that vouches for bytes read between the two fstats, or None; pure.

    ``read_began_ns`` is the wall clock taken before ``before``.
    """
    sig = stat_signature(before)
    if sig != stat_signature(after):
        return None  # written to while we read
    age = read_began_ns - before.st_ctime_ns
    needed = COARSE_VOUCH_AGE_NS if before.st_ctime_ns % 1_000_000_000 == 0 else VOUCH_AGE_NS
    if age < needed:
        return None  # too fresh, or a ctime in the future (a skewed clock on a network share)
    return sig


def from_preview(fd: int, st: os.stat_result, key: str, *, max_pixels: int,
                 began_ns: int | None) -> Prepared | None:
    """Classify from the JPEG's embedded preview, reading only the file's head; None: decode it all.

    Only a preview :func:`bikewatch.decode.previews.check` trusts is used, and only in a file that
    ends as a whole JPEG does (an EOI marker): a copy cut short is decoded in full, and
    rejected as it always was. The bytes past the head are never read, so there is no
    sha256 of the file: the row's ``sha256`` stays empty (README: "Formats, and camera photos' embedded previews").
    """
    head = os.pread(fd, min(st.st_size, _previews.HEAD_BYTES), 0)
    if not _previews.is_jpeg(head):
        return None
    while True:
        try:
            found = _previews.preview_of(head, max_pixels=max_pixels)
            break
        except _previews.NeedMore as more:
            if more.upto > min(st.st_size, _previews.MAX_HEAD_BYTES) or len(head) >= st.st_size:
                return None
            more_bytes = os.pread(fd, max(more.upto, 2 * len(head)) - len(head), len(head))
            if not more_bytes:
                return None  # shorter than it was a moment ago: the full read sorts that out
            head += more_bytes
    if isinstance(found, str) or os.pread(fd, 2, st.st_size - 2) != b"\xff\xd9":
        return None
    try:
        array = preprocess_preview(found.data, found.orientation)
    except PreprocessError:
        return None  # a preview that does not decode says nothing about the image: decode that
    sig = signature_of(st, os.fstat(fd), began_ns) if began_ns is not None else None
    return Prepared(key, array, "", st.st_size, st.st_mtime_ns, signature=sig, decoded_from=DECODED_PREVIEW)


def prepare(path: str | Path, key: str, *, max_pixels: int, vouch: bool = False,
            previews: bool = False) -> Prepared:
    """Read a claimed file once: hash and preprocess the same bytes. Never follows links.

    With ``vouch`` (a read ahead of the claim), the result carries the signature the read
    vouches for (see :func:`signature_of`); a claimed file needs none. With ``previews``,
    a camera JPEG larger than its head is classified from its embedded preview where one
    can be trusted (:func:`from_preview`).
    """
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
        began_ns = time.time_ns() if vouch else 0
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Prepared(key, None, "", 0, st.st_mtime_ns, "not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            return Prepared(key, None, sha256_file(path), st.st_size, st.st_mtime_ns,
                            f"file too large ({st.st_size} bytes)")
        if previews and st.st_size > _previews.HEAD_BYTES:
            try:
                quick = from_preview(fd, st, key, max_pixels=max_pixels, began_ns=began_ns if vouch else None)
            except Exception:  # noqa: BLE001 - whatever a malformed header trips: the full decode decides
                quick = None
            if quick is not None:
                return quick
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read()
        sig = signature_of(st, os.fstat(fd), began_ns) if vouch and len(data) == st.st_size else None
    except OSError as exc:
        return Prepared(key, None, "", 0, 0, f"cannot read file: {exc.strerror}")
    finally:
        os.close(fd)
    digest = hashlib.sha256(data).hexdigest()
    try:
        array = preprocess_bytes(data, max_pixels=max_pixels)
    except PreprocessError as exc:
        return Prepared(key, None, digest, len(data), st.st_mtime_ns, exc.reason, sig)
    return Prepared(key, array, digest, len(data), st.st_mtime_ns, signature=sig, decoded_from=DECODED_FULL)
