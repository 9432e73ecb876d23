"""The work area: this worker's claim folder, its lock and heartbeat, and dead workers' folders.

Each worker owns ``STATE/work/<worker>-<pid>-<rand>/`` on the inbox's filesystem, held by an
``flock`` for as long as the worker lives, its lock file touched every few seconds so that
workers on other hosts can tell it is alive. A worker at start-up (and at each rescan) takes
over every dead worker's folder by renaming it into its own (one rename wins, on any share);
:mod:`bikewatch.store.recovery` then finishes what it holds.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Collection, Iterator

from bikewatch.files import fsync_dir
from bikewatch.store.journal import remove_journal_tmps

LOCK_NAME = "lock"
ADOPTED_PREFIX = "adopted-"
"""A dead worker's folder, renamed into the live worker's own folder that recovers it."""


HEARTBEAT_SECONDS = 10.0
"""How often a live worker touches its lock file (see :meth:`WorkArea.orphaned_dirs`)..."""
STALE_SECONDS = 120.0
"""...and how old that touch must be before a worker on another host counts as dead (the
``stale_worker_seconds`` setting; a quarter of it is the heartbeat when that is shorter)."""


def lock_is_stale(owner: str, mtime: float, *, host: str, now: float, stale_after: float) -> bool:
    """Is the worker that wrote ``owner`` ("host pid") dead? Pure.

    On this host the pid answers. For another host only a heartbeat older than
    ``stale_after`` does: a free flock alone is not trusted there, because an
    NFS share mounted with ``nolock`` grants every machine every lock.
    """
    parts = owner.split()
    if not parts:
        return True  # no owner ever written: nothing but the free lock to go by
    if len(parts) == 2 and parts[0] == host and parts[1].isdigit():
        return not os.path.exists(f"/proc/{parts[1]}")
    return now - mtime > stale_after


class WorkArea:
    """This worker's claim folder; holds its lock for the life of the process."""

    def __init__(self, state_dir: Path, worker: str, stale_after: float = STALE_SECONDS) -> None:
        self.stale_after = stale_after
        self.heartbeat_every = min(HEARTBEAT_SECONDS, stale_after / 4)
        self.root = state_dir / "work"
        self.root.mkdir(parents=True, exist_ok=True)
        self.name = f"{worker}-{os.getpid()}-{secrets.token_hex(3)}"
        self.dir = self.root / self.name
        # Locked under a hidden name first, so no other worker ever sees it unlocked.
        nursery = self.root / f".new-{self.name}"
        nursery.mkdir()
        self._lock_fd = os.open(nursery / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(self._lock_fd, f"{socket.gethostname()} {os.getpid()}".encode())
        os.rename(nursery, self.dir)
        self._seq = 0
        self._beat = time.monotonic()
        self._stop_beating = threading.Event()
        self._beater: threading.Thread | None = None
        fsync_dir(self.root)

    def heartbeat(self, now: float) -> None:
        """Touch the lock file so workers on other machines can tell we are alive."""
        if now - self._beat >= self.heartbeat_every:
            self._beat = now
            try:
                os.utime(self._lock_fd)
            except OSError:
                pass

    def beat_in_background(self) -> None:
        """Keep the heartbeat going on a thread of its own until :meth:`close`.

        A live worker whose main loop waits a long time (an fsync on a slow share, a big
        recovery) must not look dead to other hosts: one that took its folder over then could
        record a batch the worker is just recording itself. The process dying stops it.
        """
        if self._beater is not None:
            return

        def beat() -> None:
            while not self._stop_beating.wait(self.heartbeat_every):
                self.heartbeat(time.monotonic())

        self._beater = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._beater.start()

    def new_batch_id(self) -> str:
        self._seq += 1
        return f"{self.name}.{self._seq:08d}"

    def journal_path(self, batch: str) -> Path:
        return self.dir / f"{batch}.json"

    def close(self) -> None:
        """Remove our folder when nothing is left in it; release the lock."""
        self._stop_beating.set()
        if self._beater is not None:
            self._beater.join(timeout=5)
        try:
            remove_journal_tmps(self.dir)  # a journal rewrite that failed (inbox gone meanwhile); the previous one stands
            leftovers = [p for p in self.dir.iterdir() if p.name != LOCK_NAME]
            if not leftovers:
                os.unlink(self.dir / LOCK_NAME)
                os.rmdir(self.dir)
        except OSError:
            pass
        os.close(self._lock_fd)

    def orphaned_dirs(self, stale_after: float | None = None, retired: Collection[str] = ()) -> Iterator[Path]:
        """Work folders of dead workers, each yielded once it is ours: taken over by a rename.

        A dead worker's folder is renamed into our own folder (``adopted-<name>``) before
        anything in it is touched. Of several workers that judge it dead at once, on this
        host or another, one rename wins; the others find it gone (ENOENT) and move on. No
        lock is needed, which matters on shares whose locks do not reach every host (sshfs,
        NFS mounted ``nolock``). Until it is recovered, the adopted folder is as safe as our
        own: if we die too, whoever takes over our folder recovers it with ours.
        Folders adopted earlier and not recovered yet (the output was unusable) come first.

        ``retired`` names folders this very process used before (its inbox's filesystem
        went away and it started a new one): their lock names a live pid, ours, yet
        nobody works in them any more.
        """
        stale_after = self.stale_after if stale_after is None else stale_after
        for entry in sorted(self.dir.iterdir()):
            if entry.name.startswith(ADOPTED_PREFIX) and entry.is_dir():
                yield entry
        host, now = socket.gethostname(), time.time()
        for entry in sorted(self.root.iterdir()):
            if entry == self.dir or entry.name.startswith(".") or not entry.is_dir():
                continue
            if self._is_dead(entry, host=host, now=now, stale_after=stale_after, retired=retired):
                adopted = self._take_over(entry)
                if adopted is not None:
                    yield adopted

    def _is_dead(self, entry: Path, *, host: str, now: float, stale_after: float, retired: Collection[str]) -> bool:
        try:
            fd = os.open(entry / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            # No usable lock file (a folder in its place, a damaged entry): nobody can hold it,
            # so only age tells, as for a worker on another host.
            try:
                return now - os.lstat(entry).st_mtime > stale_after
            except OSError:
                return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # alive
            # Garbage, empty or cut off: lock_is_stale then goes by the heartbeat alone.
            owner = os.pread(fd, 256, 0).decode("utf-8", "replace")
            return entry.name in retired or lock_is_stale(owner, os.fstat(fd).st_mtime, host=host, now=now,
                                                          stale_after=stale_after)
        except OSError:
            return False
        finally:
            os.close(fd)  # releases the flock; the rename that follows is what makes the folder ours

    def _take_over(self, entry: Path) -> Path | None:
        """Rename a dead worker's folder into ours; None when another worker's rename won."""
        target = self.dir / f"{ADOPTED_PREFIX}{entry.name}"
        try:
            os.rename(entry, target)
        except FileNotFoundError:
            # Another worker won, or (NFS) our retransmitted rename did succeed.
            if not os.path.isdir(target):
                return None
        except OSError:
            return None  # ENOTEMPTY/EEXIST: cannot be ours (names are unique); leave it be
        try:
            fsync_dir(self.root)
            fsync_dir(self.dir)
        except OSError:
            pass
        return target
