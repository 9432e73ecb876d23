"""The inbox watcher: inotify events turned into :class:`~bikewatch.intake.hints.Hints`.

The service needs hints ("look at this path", "this writer is done", "rescan"), not
watchdog's paired move events, so this uses watchdog's low-level inotify module
(:class:`watchdog.observers.inotify_c.InotifyFD`; watchdog >= 7.1, the first with
independent instances and ``on_queue_overflow``) through its public API only: one inotify
instance of our own, one reader thread (watchdog's loop, see :class:`_Reader`), and a
non-recursive watch on each folder of the inbox that the watcher adds and removes itself.

That gives, by construction, what the old observer needed patches for:

- the state folder is never watched, so the service's own claims, journals and
  deliveries there cost no events at all (benchmarks/README.md, change 15);
- no move pairing: a rename into a folder is one IN_MOVED_TO, a hint with no delay;
- an inotify queue overflow arrives as a callback, not as a log message, and asks for
  a rescan after the watches are brought up to date;
- only the events that make hints are asked for: no IN_OPEN, IN_CLOSE_NOWRITE or
  IN_DELETE, so the daemon's own reads of every claimed photo cost nothing.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Callable

from watchdog.observers.inotify_c import (
    CallbackId,
    InotifyConstants as K,
    InotifyEvent,
    InotifyFD,
    Mask,
    WatchDescriptor,
)

from bikewatch.intake.hints import Hints
from bikewatch.logs import get_logger

FOLDER_MASK = Mask(K.IN_CREATE | K.IN_MODIFY | K.IN_ATTRIB | K.IN_CLOSE_WRITE | K.IN_MOVED_TO | K.IN_MOVED_FROM
                   | K.IN_ONLYDIR | K.IN_DONT_FOLLOW | K.IN_EXCL_UNLINK)
"""What each folder's watch asks for. IN_MOVED_FROM is there only for folders moved out
(their watches are removed); a file's IN_MOVED_FROM or deletion makes no hint."""

DONE = K.IN_CLOSE_WRITE | K.IN_MOVED_TO
"""Events that say a file's writer is done with it: a close after writing, and a rename into
the inbox (from outside it or within it). A plain IN_CREATE is not one: the writer may not
have written yet."""

CHANGED = K.IN_CREATE | K.IN_MODIFY | K.IN_ATTRIB
"""Events that say a file is there or changed, but not that it is complete."""

_ID = CallbackId(0)  # one callback (this watcher) on each of our own instance's watches


class _Reader(InotifyFD):
    """watchdog's inotify instance and reader thread, with a call after each read's events.

    The same loop as ``InotifyFD.run`` (its public ``read_events`` and ``handle_event``), plus
    ``after_read``: the watcher hands that read's hints to the loop at once, with one wake-up."""

    def __init__(self, after_read: Callable[[], None]) -> None:
        super().__init__()
        self._after_read = after_read

    def run(self) -> None:
        while self.should_keep_running():
            for event in self.read_events():
                self.handle_event(event)
            self._after_read()


class InboxWatcher:
    """Watches every folder of ``inbox`` except ``skip`` (the state folder) and drops hints.

    The kernel's events are read on watchdog's thread, which calls :meth:`on_event`; that
    thread also adds the watches for folders created or moved in, before it asks the loop
    for a rescan, so a file written into a new folder before its watch existed is found
    by that rescan and every later one by the watch.
    """

    def __init__(self, inbox: Path, hints: Hints, skip: Path) -> None:
        self.inbox = os.path.abspath(inbox)
        self.hints = hints
        self._skip = os.path.abspath(skip)
        self._lock = threading.Lock()
        self._dirs: dict[WatchDescriptor, str] = {}  # each watch's folder, relative to the inbox ("" for it)
        self._wd_of: dict[str, WatchDescriptor] = {}  # and back: a folder already watched is not added again
        self._inode: dict[WatchDescriptor, int] = {}  # unless a new folder took the name (rename over an empty one)
        self._fd: InotifyFD | None = None
        self._found: set[str] = set()  # this read's hints, handed over after it (reader thread only)
        self._done: set[str] = set()
        self._warned_limit = False
        self.log = get_logger(component="watcher")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Watch the inbox's folders and start reading events; raises OSError when the inbox cannot be watched."""
        fd = _Reader(self._hand_over)  # our own instance, not watchdog's shared one: no other watches mix in
        fd.start()  # reading first: each watch is recorded under the lock that on_event waits for
        self._fd = fd
        try:
            self._watch_tree("", strict=True)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fd.stop()  # closes the instance: every watch goes with it
            fd.join(timeout=5)

    @property
    def alive(self) -> bool:
        """False once the reader thread has died (or was never started): the loop then rescans instead."""
        return self._fd is not None and self._fd.is_alive()

    @property
    def watched(self) -> set[str]:
        """The folders watched now, relative to the inbox ("" for the inbox itself)."""
        with self._lock:
            return set(self._dirs.values())

    # ------------------------------------------------------------------ watchdog's WatchCallback

    def on_event(self, event: InotifyEvent) -> None:
        """One inotify event on one of our folders: a hint, a watch to add or remove, or nothing."""
        with self._lock:
            folder = self._dirs.get(event.wd)
        if folder is None or not event.name:
            return  # a watch removed meanwhile, or an event about the watched folder itself
        name = os.fsdecode(event.name)
        rel = f"{folder}/{name}" if folder else name
        mask = event.mask
        if mask & K.IN_ISDIR:
            if mask & (K.IN_CREATE | K.IN_MOVED_TO) and not self._is_skipped(os.path.join(self.inbox, rel)):
                self._watch_tree(rel)
                self.hints.request_rescan()  # a folder moved in brings no per-file events
            elif mask & K.IN_MOVED_FROM:
                self._unwatch_tree(rel)  # moved out, or renamed here: its IN_MOVED_TO watches it again
        elif mask & DONE:
            self._found.add(rel)
            self._done.add(rel)
        elif mask & CHANGED:
            self._found.add(rel)

    def _hand_over(self) -> None:
        """After each read: its hints to the loop, in one go."""
        if self._found:
            found, done = self._found, self._done
            self._found, self._done = set(), set()
            self.hints.add_all(found, done)

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        """The kernel dropped a watch (its folder was deleted, or the instance closed)."""
        with self._lock:
            self._forget(wd)

    def on_queue_overflow(self) -> None:
        """Events were lost, folders made or moved among them: watch the tree afresh, then have the loop rescan."""
        with self._lock:
            wds = list(self._dirs)
        self._remove(wds)  # the paths recorded for them may be stale; what is still there is watched again
        self._watch_tree("")
        self.hints.request_rescan()

    # ------------------------------------------------------------------ the watches

    def _is_skipped(self, path: str) -> bool:
        return path == self._skip or path.startswith(self._skip + os.sep)

    def _watch_tree(self, top: str, *, strict: bool = False) -> None:
        """Watch ``top`` and every folder below it, never following links, never the state folder.

        Each folder's watch is added before it is listed, so a subfolder made meanwhile is
        seen either in the listing or as an event. ``strict``: raise when ``top`` itself
        cannot be watched (the inbox at start-up); otherwise a folder gone meanwhile is skipped.
        """
        fd = self._fd
        stack = [top]
        while stack and fd is not None:
            rel = stack.pop()
            path = os.path.join(self.inbox, rel) if rel else self.inbox
            if self._is_skipped(path):
                continue
            try:
                ino = os.lstat(path).st_ino
                with self._lock:  # an event for this folder waits until it is recorded
                    known = self._wd_of.get(rel)
                    if known is not None and self._inode.get(known) == ino:
                        continue  # made while its parent was walked: both the walk and the event find it
                    wd = fd.add_callback(os.fsencode(path), FOLDER_MASK, self, _ID)
                    if wd != -1:
                        self._forget(wd)  # the same folder under an old name (a rename we missed)
                        self._dirs[wd] = rel
                        self._wd_of[rel] = wd
                        self._inode[wd] = ino
            except OSError as exc:
                if strict and rel == top:
                    raise
                if exc.errno == errno.ENOSPC:
                    self._watch_limit_reached(path)
                    break
                continue  # gone or replaced by a file meanwhile: its parent's events or a rescan cover it
            if wd == -1:  # watchdog returns -1 for a folder we may not read (EACCES)
                fd.remove_callbacks([(wd, _ID)])
                if strict and rel == top:
                    raise PermissionError(errno.EACCES, "cannot watch the inbox", path)
                continue
            try:
                with os.scandir(path) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(f"{rel}/{entry.name}" if rel else entry.name)
            except OSError:
                continue  # vanished or private since its watch was added

    def _unwatch_tree(self, top: str) -> None:
        prefix = top + "/"
        with self._lock:
            wds = [wd for wd, rel in self._dirs.items() if rel == top or rel.startswith(prefix)]
        self._remove(wds)

    def _remove(self, wds: list[WatchDescriptor]) -> None:
        fd = self._fd
        with self._lock:
            for wd in wds:
                self._forget(wd)
        if fd is None or not wds:
            return
        try:
            fd.remove_callbacks([(wd, _ID) for wd in wds])
        except OSError:
            pass  # the kernel removed it first (the folder is gone): nothing left to remove

    def _forget(self, wd: WatchDescriptor) -> None:
        """Drop one watch from the books; the caller holds the lock."""
        rel = self._dirs.pop(wd, None)
        self._inode.pop(wd, None)
        if rel is not None and self._wd_of.get(rel) == wd:
            del self._wd_of[rel]

    def _watch_limit_reached(self, path: str) -> None:
        if not self._warned_limit:
            self._warned_limit = True
            self.log.warning("inotify watch limit reached; folders beyond it are found by the periodic rescan only",
                             folder=path, setting="fs.inotify.max_user_watches")
