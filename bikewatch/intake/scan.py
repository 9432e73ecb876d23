"""Finding candidate files in the inbox: the scan, one path's observation, and the filesystem type.

Events are hints, the scan is the truth: the watcher (:mod:`bikewatch.intake.watcher`) only
says *where* to look; a scan at start-up, a periodic rescan and a rescan after any inotify
queue overflow make sure nothing is forgotten. On network and FUSE filesystems inotify does
not see writes made by other machines, so bikewatch polls there instead (:func:`needs_polling`).
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "9p", "afs", "ceph", "glusterfs", "lustre",
     "gpfs", "beegfs", "davfs", "vboxsf", "virtiofs", "fuse", "fuseblk", "sshfs"}
)


Signature = tuple[int, int, int, int]
"""(size, mtime_ns, ctime_ns, inode): what changes whenever a file's content does."""


def stat_signature(st: os.stat_result) -> Signature:
    """A file's :data:`Signature` from its stat; pure. The ctime is in it because a writer can
    put size and mtime back (``cp -p``, ``touch -r``), never the ctime."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@dataclass(frozen=True)
class Seen:
    """One observation of a candidate file."""

    rel: str
    size: int
    mtime_ns: int
    ino: int
    regular: bool  # False for symlinks, FIFOs, sockets, devices
    ctime_ns: int = 0  # changes with every write, chmod or rename, and cannot be set back by a writer

    @property
    def signature(self) -> Signature:
        return (self.size, self.mtime_ns, self.ctime_ns, self.ino)


def is_ignored(name: str, patterns: Iterable[str]) -> bool:
    """Hidden files, in-progress uploads and OS metadata are left alone; pure.

    Case-insensitive: uploads from Windows and macOS write THUMBS.DB and X.PART too.
    """
    key = patterns if isinstance(patterns, tuple) else tuple(patterns)
    return bool(key) and _ignore_matcher(key)(name.lower()) is not None


@functools.lru_cache(maxsize=64)
def _ignore_matcher(patterns: tuple[str, ...]) -> Callable[[str], re.Match[str] | None]:
    """All patterns as one regex: one match per name instead of one fnmatch per pattern."""
    return re.compile("|".join(fnmatch.translate(p.lower()) for p in patterns)).match


def scan(inbox: Path, ignore: tuple[str, ...], skip: Iterable[Path] = ()) -> Iterator[Seen]:
    """Every candidate below ``inbox``; never follows symlinks, never enters hidden folders.

    Raises OSError when the inbox itself cannot be listed (a mount problem,
    which the caller must not mistake for an empty inbox).
    """
    skip_set = {os.path.normpath(p) for p in skip}
    stack = [""]
    first = True
    while stack:
        rel_dir = stack.pop()
        abs_dir = os.path.join(inbox, rel_dir) if rel_dir else str(inbox)
        try:
            entries = list(os.scandir(abs_dir))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            if first:
                raise
            continue  # a subfolder vanished or is private mid-scan
        first = False
        for entry in entries:
            name = entry.name
            if is_ignored(name, ignore):
                continue
            rel = os.path.join(rel_dir, name) if rel_dir else name
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if os.path.normpath(entry.path) not in skip_set:
                    stack.append(rel)
                continue
            yield _seen(rel, st)


def _seen(rel: str, st: os.stat_result) -> Seen:
    return Seen(rel, st.st_size, st.st_mtime_ns, st.st_ino, stat.S_ISREG(st.st_mode), st.st_ctime_ns)


def observe(inbox: Path, rel: str) -> Seen | None:
    """Stat one path (an event hint); None when it is gone or is a folder."""
    try:
        st = os.lstat(os.path.join(inbox, rel))
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        return None
    return _seen(rel, st)


def mount_fstype(path: Path, mountinfo: str | None = None) -> str:
    """Filesystem type of the mount holding ``path``, from /proc/self/mountinfo."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return "unknown"
    target = os.path.realpath(path)
    best, best_len = "unknown", -1
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount_point = fields[4].replace("\\040", " ")
        if (target == mount_point or target.startswith(mount_point.rstrip("/") + "/")) and len(mount_point) > best_len:
            best, best_len = right.split()[0], len(mount_point)
    return best


def needs_polling(fstype: str) -> bool:
    """inotify sees only local writes; on these filesystems other machines write too."""
    return fstype in NETWORK_FS or fstype.startswith("fuse.")
