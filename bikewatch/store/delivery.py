"""Moving files without ever overwriting one: no-clobber placement and naming.

The placement primitive is ``renameat2(RENAME_NOREPLACE)``; where the
filesystem does not support it, ``link()`` + ``unlink()`` (also no-clobber,
since ``link`` fails on an existing name); across filesystems a copy to a
temporary name, ``fsync``, then the same no-clobber link. Never
check-then-move, which races with every other writer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import stat
from pathlib import Path

from bikewatch.files import fsync_dir

NAME_MAX = 255
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int


def numbered_name(name: str, n: int) -> str:
    """``IMG_0001.jpg`` -> ``IMG_0001 (n).jpg``, shortened to fit NAME_MAX bytes; pure."""
    stem, ext = os.path.splitext(name)
    if stem == "" or (ext and len(ext.encode("utf-8", "surrogateescape")) > 32):
        stem, ext = name, ""
    suffix = f" ({n})" if n else ""
    return fit_name(stem, suffix + ext)


def fit_name(stem: str, tail: str) -> str:
    """Trim ``stem`` (never ``tail``) so the joined name fits NAME_MAX bytes."""
    budget = NAME_MAX - len(tail.encode("utf-8", "surrogateescape"))
    raw = stem.encode("utf-8", "surrogateescape")
    if len(raw) > budget:
        # Drop whole characters from the end: never split a multi-byte one, and keep the
        # bytes of a non-UTF-8 name (surrogate escapes), which decode(errors="ignore") would drop.
        while len(stem.encode("utf-8", "surrogateescape")) > budget:
            stem = stem[:-1]
    return stem + tail


def rename_noreplace(src: str | Path, dst: str | Path) -> None:
    """Atomic rename that fails with FileExistsError instead of replacing ``dst``."""
    if _renameat2 is not None:
        rc = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    # Filesystems without RENAME_NOREPLACE (some NFS/FUSE): link() also refuses to replace.
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS) and not os.path.exists(dst):
            # No hard links here either (e.g. some SMB mounts): best remaining option.
            _rename_if_absent(src, dst)
            return
        raise
    os.unlink(src)


def _rename_if_absent(src: str | Path, dst: str | Path) -> None:
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "destination exists", str(dst))
    os.rename(src, dst)


def copy_durably(src: Path, tmp: Path) -> None:
    """Copy bytes and mtime to ``tmp`` (created exclusively), fsync it."""
    with open(src, "rb") as fin, open(tmp, "xb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    st = os.stat(src, follow_symlinks=False)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))


def place(src: Path, dst: Path, *, tmp_name: str) -> None:
    """Put ``src`` at ``dst`` without replacing anything; ``src`` is gone afterwards.

    Raises FileExistsError when ``dst`` is taken (the caller picks another
    name). Across filesystems the bytes are copied to ``tmp_name`` beside
    ``dst`` and fsynced before the source is removed.
    """
    try:
        rename_noreplace(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = dst.with_name(tmp_name)
    mode = os.lstat(src).st_mode
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(src), tmp)  # links are moved as links, never followed
    elif not stat.S_ISREG(mode):
        # A FIFO, socket or device holds no bytes (opening a FIFO to copy it would block forever,
        # a socket cannot be opened at all, which would stall delivery): recreate the node.
        os.mknod(tmp, mode, os.lstat(src).st_rdev)
    else:
        try:
            copy_durably(src, tmp)
        except BaseException as exc:
            # A full or failing output: never leave a partial copy behind (it takes the space we need).
            if not isinstance(exc, FileExistsError):
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            raise
    try:
        rename_noreplace(tmp, dst)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(dst.parent)
    os.unlink(src)
