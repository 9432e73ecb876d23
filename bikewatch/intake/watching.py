"""Finding files in the inbox and deciding when each one is complete.

Events are hints, the scan is the truth: a watchdog (inotify) observer only
says *where* to look; a scan at start-up, a periodic rescan and a rescan after
any inotify queue overflow make sure nothing is forgotten. On network and
FUSE filesystems inotify does not see writes made by other machines, so
bikewatch polls there instead (:func:`needs_polling`).

A file is *ready* once its size, mtime and ctime have stayed unchanged for
the settle time. A writer's "done" signal shortens it: a close-after-write, or
a rename into the inbox (the upload contract: write under a temporary name,
then rename). Any write after that signal restarts the full settle time.
"""

from __future__ import annotations

import collections
import fnmatch
import functools
import logging
import math
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

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


@dataclass
class _Track:
    seen: Seen
    stable_since: float
    closed: bool = False


def _order_key(track: _Track) -> tuple[float, str]:
    return (track.stable_since, track.seen.rel)


class Readiness:
    """Pure bookkeeping of candidates; feed it observations and a clock."""

    def __init__(self, settle: float, closed_settle: float) -> None:
        self.settle = settle
        self.closed_settle = min(closed_settle, settle)
        self._tracks: dict[str, _Track] = {}
        # Tracks oldest first, kept between calls so that taking a batch from 10,000 waiting
        # files does not sort them all again; entries no longer in _tracks are skipped.
        self._order: list[_Track] = []
        self._sorted = True
        # No candidate can be ready before this (a lower bound: it may be early, never late), so
        # that the loop's frequent "anything ready?" costs nothing while a big dump settles.
        self._due_at = math.inf

    def __len__(self) -> int:
        return len(self._tracks)

    def update(self, seen: Seen, now: float) -> bool:
        """Record an observation; True when it is new or the file changed (its settle time starts now)."""
        track = self._tracks.get(seen.rel)
        if track is None or track.seen.signature != seen.signature:
            new = _Track(seen, now, closed=False)
            self._tracks[seen.rel] = new
            if self._sorted and self._order and _order_key(new) < _order_key(self._order[-1]):
                self._sorted = False  # out of order: sorted once, by the next ready(), not here
            self._order.append(new)
            if self._bloated():
                self._compact()  # a busy writer's superseded tracks pile up between ready() calls
            self._due_at = min(self._due_at, now + self._needed(new))
            return True
        return False

    def _bloated(self) -> bool:
        """Mostly entries that were superseded or forgotten."""
        return len(self._order) > 2 * len(self._tracks) + 64

    def _compact(self) -> None:
        """Sort the order list when it is out of order or mostly entries that were superseded."""
        if not self._sorted or self._bloated():
            self._order = sorted(self._tracks.values(), key=_order_key)
            self._sorted = True

    def mark_closed(self, rel: str) -> None:
        """The writer is done (a close-after-write, or a rename into the inbox): a short settle suffices.

        Only the current observation is marked: a write after it is a new observation,
        which needs the full settle time again until the next such signal."""
        track = self._tracks.get(rel)
        if track is not None:
            track.closed = True
            self._due_at = min(self._due_at, track.stable_since + self.closed_settle)

    def forget(self, rel: str) -> None:
        self._tracks.pop(rel, None)

    def retain(self, present: set[str]) -> None:
        """After a full scan: drop tracks of files that are gone."""
        for rel in [r for r in self._tracks if r not in present]:
            del self._tracks[rel]

    def _needed(self, track: _Track) -> float:
        if not track.seen.regular:
            return 0.0  # links and special files never change by being written
        return self.closed_settle if track.closed else self.settle

    def ready(self, now: float, limit: int | None = None) -> list[Seen]:
        """Candidates unchanged for long enough, oldest first; the first ``limit`` of them when given."""
        if now < self._due_at:
            return []
        self._compact()
        out: list[Seen] = []
        lead, counting = 0, True  # entries forgotten or replaced before the first live one: dropped below
        due_at = math.inf
        for track in self._order:
            if self._tracks.get(track.seen.rel) is not track:
                lead += counting
                continue
            counting = False
            due = track.stable_since + self._needed(track)
            due_at = min(due_at, due)  # ready ones included: a caller may leave them for later
            if now >= due:
                out.append(track.seen)
                if limit is not None and len(out) >= limit:
                    break  # not all seen, but due_at <= now: the next call looks again
        self._due_at = due_at
        if lead:
            del self._order[:lead]
        return out

    def settling(self, rel: str, now: float, quiet: float) -> Seen | None:
        """``rel`` if it is a regular file unchanged for ``quiet`` seconds and not ready yet: worth reading ahead."""
        track = self._tracks.get(rel)
        if track is None or not track.seen.regular:
            return None
        age = now - track.stable_since
        return track.seen if quiet <= age < self._needed(track) else None

    def pending(self) -> list[str]:
        return list(self._tracks)

    def next_due(self, now: float) -> float | None:
        """Seconds until the next candidate could become ready (None when there is none)."""
        if not self._tracks:
            return None
        if self._due_at > now:
            return self._due_at - now  # maybe early (a file since forgotten), never late
        waits = [t.stable_since + self._needed(t) - now for t in self._tracks.values()]
        return max(0.0, min(waits))


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


class Hints:
    """Thread-safe inbox of event hints for the processing loop; wakes it up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: set[str] = set()
        self._closed: set[str] = set()
        self._rescan = False
        self.wake = threading.Event()

    def add(self, rel: str, *, closed: bool = False, rescan: bool = False) -> None:
        """Note a path to look at; ``closed`` when the event says its writer is done."""
        with self._lock:
            if rescan:
                self._rescan = True
            else:
                self._paths.add(rel)
                if closed:
                    self._closed.add(rel)
        self.wake.set()

    def request_rescan(self) -> None:
        self.add("", rescan=True)

    def take(self) -> tuple[set[str], set[str], bool]:
        with self._lock:
            paths, closed, rescan = self._paths, self._closed, self._rescan
            self._paths, self._closed, self._rescan = set(), set(), False
            self.wake.clear()
        return paths, closed, rescan


class _OverflowWatcher(logging.Handler):
    """watchdog reports an inotify queue overflow only as a log record: turn it into a rescan."""

    def __init__(self, hints: Hints) -> None:
        super().__init__(logging.WARNING)
        self.hints = hints

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.hints.request_rescan()


MOVE_PAIRING_SECONDS = 0.02
"""How long watchdog holds a rename's IN_MOVED_FROM waiting for its IN_MOVED_TO (its default: 0.5 s).

Every photo placed from the work folder (inside the inbox) into the output is a
move *out of* the watched tree, so its IN_MOVED_FROM never pairs up. watchdog's
queue delivers in order, so each one held every later event back for 0.5 s,
and while held, each new move searched the whole backlog: 0.5 ms of CPU per
photo in a 2000-photo burst, and up to 0.5 s more latency for a single photo.
The pair is two consecutive events read together, so 20 ms is ample; an
unpaired move only means "created" + "deleted" instead of "moved", which gives
the same hint.
"""

DONE_EVENTS = frozenset({"closed", "moved"})
"""Event types that say a file's writer is done with it: a close after writing, and a
rename into the inbox. A plain IN_CREATE is not one: the writer may not have written yet.
The observer reports an IN_MOVED_TO from outside the inbox as a move (watchdog's "full
events"), not as a creation, so that the two can be told apart."""

HINT_EVENTS = ("FileCreatedEvent", "DirCreatedEvent", "FileMovedEvent", "DirMovedEvent", "FileModifiedEvent",
               "FileAttribEvent", "FileClosedEvent")
"""The events that make hints. Naming them lets watchdog leave IN_OPEN and
IN_CLOSE_NOWRITE out of the inotify mask: the daemon's own reads of every
claimed photo would otherwise come back as two ignored events each."""


def _shorten_move_pairing() -> None:
    try:  # watchdog 7
        from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper as grouper
    except ImportError:  # pragma: no cover - watchdog 6
        try:
            from watchdog.observers.inotify_buffer import InotifyBuffer as grouper  # type: ignore[no-redef]
        except ImportError:
            return
    grouper.delay = min(grouper.delay, MOVE_PAIRING_SECONDS)


def _index_move_sources() -> None:
    """Let watchdog skip its queue scans for a rename whose source it has not queued.

    For every IN_MOVED_TO, watchdog 7 looks for the matching IN_MOVED_FROM twice, each
    time walking its whole queue of events with a Python predicate. A dump renamed into
    the inbox makes that queue thousands long while the observer's threads catch up, so
    the walks grow quadratic and hold the GIL when the service most needs it. These
    wrappers count the IN_MOVED_FROM cookies queued and skip a walk that cannot find
    anything; when a cookie is queued, watchdog's own code runs as before. Where
    watchdog's internals differ, nothing is patched.
    """
    try:
        from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper as grouper
        from watchdog.observers.inotify_move_event_grouper import PathedInotifyEvent as single
    except ImportError:  # pragma: no cover - watchdog 6
        return
    names = ("put_event", "read_event", "_group_moved_to_event", "get_queued_moved_from_event",
             "discard_pending_events")
    if getattr(grouper, "_bikewatch_indexed", False) or not all(hasattr(grouper, n) for n in names):
        return
    put, read, group, find, discard = (getattr(grouper, n) for n in names)
    lock = threading.Lock()  # put_event and read_event run on different threads

    def queued(self: Any) -> collections.Counter[int]:
        counts = self.__dict__.get("_bikewatch_from_cookies")
        if counts is None:  # setdefault: two threads arriving first still share one Counter
            counts = self.__dict__.setdefault("_bikewatch_from_cookies", collections.Counter())
        return counts

    def left(self: Any, cookie: int) -> None:
        with lock:
            counts = queued(self)
            counts[cookie] -= 1
            if counts[cookie] <= 0:
                del counts[cookie]

    def put_event(self: Any, event: Any) -> None:
        if event.ev.is_moved_from:
            with lock:
                queued(self)[event.ev.cookie] += 1
        put(self, event)

    def read_event(self: Any) -> Any:
        item = read(self)
        if isinstance(item, single) and item.ev.is_moved_from:  # (a pair is a plain tuple of two)
            left(self, item.ev.cookie)  # unpaired: it leaves the queue alone
        return item

    def group_moved_to_event(self: Any, to_event: Any) -> Any:
        if to_event.ev.cookie not in queued(self):
            return to_event  # moved in from outside the watched tree
        grouped = group(self, to_event)
        if not isinstance(grouped, single):  # paired: the IN_MOVED_FROM left the queue
            left(self, to_event.ev.cookie)
        return grouped

    def get_queued_moved_from_event(self: Any, cookie: int) -> Any:
        return find(self, cookie) if cookie in queued(self) else None

    def discard_pending_events(self: Any) -> None:
        with lock:
            queued(self).clear()
        discard(self)

    for name, wrapper in zip(names, (put_event, read_event, group_moved_to_event, get_queued_moved_from_event,
                                     discard_pending_events)):
        setattr(grouper, name, wrapper)
    grouper._bikewatch_indexed = True  # type: ignore[attr-defined]


class InboxWatcher:
    """A watchdog observer that turns events into :class:`Hints`."""

    def __init__(self, inbox: Path, hints: Hints, skip: Path) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers.inotify import InotifyObserver

        self.inbox = inbox
        self.hints = hints
        self._skip = os.fsencode(str(skip))
        skip_prefix = str(skip) + os.sep
        root = str(inbox)
        root_prefix = root if root.endswith(os.sep) else root + os.sep  # "/" stays "/"

        def rel_of(path: str | bytes) -> str | None:
            # watchdog joins each name to the watched folder's path, so a prefix cut is the
            # relative path (os.path.relpath normalises both paths first: 25x the CPU, per event).
            p = os.fsdecode(path)
            if p == str(skip) or p.startswith(skip_prefix):
                return None
            if p == root:
                return "."
            return p[len(root_prefix):] if p.startswith(root_prefix) else None

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in ("opened", "closed_no_write", "deleted"):
                    return
                dest = getattr(event, "dest_path", "")
                if event.event_type == "moved" and not dest:
                    return  # moved out of the inbox: like a deletion
                rel = rel_of(dest or event.src_path)
                if rel is None or rel == ".":
                    return
                if event.is_directory:
                    if event.event_type in ("created", "moved"):
                        hints.request_rescan()  # a whole folder moved in brings no per-file events
                    return
                hints.add(rel, closed=event.event_type in DONE_EVENTS)

        import watchdog.events

        _shorten_move_pairing()
        _index_move_sources()
        kinds = [getattr(watchdog.events, name) for name in HINT_EVENTS if hasattr(watchdog.events, name)]
        # Full events: an unpaired IN_MOVED_TO comes as a move with no source instead of as a
        # creation, and an unpaired IN_MOVED_FROM as a move with no destination.
        self._observer = InotifyObserver(generate_full_events=True)
        self._observer.daemon = True
        self._observer.schedule(Handler(), str(inbox), recursive=True, event_filter=kinds)
        self._overflow = _OverflowWatcher(hints)
        logging.getLogger("watchdog.observers.inotify_c").addHandler(self._overflow)
        logging.getLogger("watchdog.observers.inotify").addHandler(self._overflow)

    def start(self) -> None:
        self._observer.start()
        self.unwatch_state_dir()

    def unwatch_state_dir(self) -> int:
        """Remove the inotify watches that the recursive watch put on our own state folder.

        Every claim and delivery renames photos into and out of the work folder, and every
        batch writes journals there: about two inotify events per photo that the observer's
        threads would parse, pair and dispatch only for the handler to drop them, while
        the service's other threads wait for the GIL. Not watching the folder made 2000-photo
        dumps 5-7 points of the roofline faster (benchmarks/README.md, change 15).

        watchdog has no public way to leave a folder out of a recursive watch (its issue
        #212), so this reaches into its ``InotifyWatchGroup``; where that is not there (a
        different watchdog) it does nothing, and the events are still dropped by path in
        the handler. Called again at every rescan, because an inotify queue overflow makes
        watchdog rebuild all its watches. Returns the number of watches removed.
        """
        removed = 0
        prefix = self._skip + b"/"
        for emitter in list(getattr(self._observer, "emitters", ())):
            group = getattr(emitter, "_inotify", None)
            lock = getattr(group, "_lock", None)
            remove = getattr(group, "_remove_callbacks", None)
            if lock is None or remove is None or not isinstance(getattr(group, "_active_callbacks_by_path", None), dict):
                continue
            with lock:
                by_path = group._active_callbacks_by_path  # type: ignore[union-attr]
                wds = [wd for path, wd in list(by_path.items()) if path == self._skip or path.startswith(prefix)]
                if wds:
                    try:
                        remove(wds)
                    except (OSError, KeyError):  # a watch that went away meanwhile: nothing to remove
                        pass
                    removed += len(wds)
        return removed

    @property
    def alive(self) -> bool:
        return self._observer.is_alive()

    def stop(self) -> None:
        logging.getLogger("watchdog.observers.inotify_c").removeHandler(self._overflow)
        logging.getLogger("watchdog.observers.inotify").removeHandler(self._overflow)
        self._observer.stop()
        self._observer.join(timeout=5)
