"""The inbox watcher's own watches (bikewatch.intake.watcher): real inotify on real tmp folders.

What the watcher adds on top of watchdog's low-level inotify instance: a watch per folder
that it keeps up to date as folders come and go, never one on the state folder, and a
rescan when the kernel's event queue overflows. Every wait has a deadline; no sleeps.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator

import pytest

from bikewatch.intake.hints import Hints
from bikewatch.intake.watcher import InboxWatcher
from harness import collect, wait_until


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path




@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    inbox = tmp_path / "inbox"
    (inbox / "DCIM").mkdir(parents=True)
    return inbox


@pytest.fixture
def running(inbox: Path) -> Iterator[tuple[InboxWatcher, Hints]]:
    hints = Hints()
    watcher = InboxWatcher(inbox, hints, inbox / ".bikewatch")
    watcher.start()
    try:
        yield watcher, hints
    finally:
        watcher.stop()


def marker_seen(inbox: Path, hints: Hints, name: str = "marker.jpg") -> tuple[set[str], bool]:
    """Write a marker file and gather every hint up to its close (paths, and whether a rescan was
    asked for): events arrive in order, so whatever an earlier write would have hinted has arrived."""
    touch(inbox / name)
    paths, _, rescan = collect(hints, lambda p, c, r: name in c)
    return paths, rescan


def test_a_state_folder_made_after_start_gets_no_watch(running: tuple[InboxWatcher, Hints], inbox: Path) -> None:
    watcher, hints = running
    (inbox / ".bikewatch" / "work").mkdir(parents=True)  # the service may make it after the watcher starts
    touch(inbox / ".bikewatch" / "work" / "journal.json")
    os.rename(inbox / ".bikewatch" / "work" / "journal.json", inbox / ".bikewatch" / "work" / "j2.json")
    paths, rescan = marker_seen(inbox, hints)
    assert not any(p.startswith(".bikewatch") for p in paths), paths
    assert not rescan  # not even a rescan for the new folder: it is not input
    assert watcher.watched == {"", "DCIM"}


def test_nested_folders_made_at_once_are_all_watched(running: tuple[InboxWatcher, Hints], inbox: Path) -> None:
    watcher, hints = running
    deep = inbox / "DCIM" / "a" / "b" / "c"
    deep.mkdir(parents=True)  # b and c may exist before a's watch: found by the walk, not by events
    wait_until(lambda: {"DCIM/a", "DCIM/a/b", "DCIM/a/b/c"} <= watcher.watched, 10, what="watches on a, b and c")
    touch(deep / "IMG_0001.jpg")
    collect(hints, lambda p, c, r: "DCIM/a/b/c/IMG_0001.jpg" in c)


def test_a_folder_moved_out_is_no_longer_watched(running: tuple[InboxWatcher, Hints], inbox: Path,
                                                 tmp_path: Path) -> None:
    watcher, hints = running
    (inbox / "DCIM" / "old" / "sub").mkdir(parents=True)
    wait_until(lambda: "DCIM/old/sub" in watcher.watched, 10, what="watches on the new folders")
    os.rename(inbox / "DCIM" / "old", tmp_path / "elsewhere")
    wait_until(lambda: not any(r.startswith("DCIM/old") for r in watcher.watched), 10, what="watches removed")
    touch(tmp_path / "elsewhere" / "sub" / "x.jpg")  # outside the inbox now: no hint, under any name
    paths, _ = marker_seen(inbox, hints)
    assert not any("x.jpg" in p for p in paths), paths


def test_a_folder_renamed_inside_the_inbox_is_watched_under_its_new_name(
        running: tuple[InboxWatcher, Hints], inbox: Path) -> None:
    watcher, hints = running
    (inbox / "DCIM" / "upload.tmp" / "sub").mkdir(parents=True)
    wait_until(lambda: "DCIM/upload.tmp/sub" in watcher.watched, 10, what="watches on the new folders")
    os.rename(inbox / "DCIM" / "upload.tmp", inbox / "DCIM" / "100CANON")
    collect(hints, lambda p, c, r: r)  # a folder moved in: rescan
    wait_until(lambda: {"DCIM/100CANON", "DCIM/100CANON/sub"} <= watcher.watched
               and not any("upload.tmp" in r for r in watcher.watched), 10, what="watches under the new name")
    touch(inbox / "DCIM" / "100CANON" / "sub" / "IMG_0001.jpg")
    paths, closed, _ = collect(hints, lambda p, c, r: "DCIM/100CANON/sub/IMG_0001.jpg" in c)
    assert not any("upload.tmp" in p for p in paths)


def test_starting_on_a_missing_inbox_raises_and_leaves_no_thread(tmp_path: Path) -> None:
    before = threading.active_count()
    watcher = InboxWatcher(tmp_path / "gone", Hints(), tmp_path / "gone" / ".bikewatch")
    with pytest.raises(FileNotFoundError):
        watcher.start()
    assert not watcher.alive
    wait_until(lambda: threading.active_count() == before, 10, what="the reader thread to end")


class _Failing(Hints):
    """A consumer that breaks on its first hint: the reader thread dies of it."""

    def add_all(self, paths: set[str], closed: set[str]) -> None:
        raise RuntimeError("consumer broke")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_reader_thread_shows_as_not_alive(inbox: Path) -> None:
    watcher = InboxWatcher(inbox, _Failing(), inbox / ".bikewatch")
    watcher.start()
    try:
        assert watcher.alive
        touch(inbox / "a.jpg")
        wait_until(lambda: not watcher.alive, 10, what="the reader thread to die")  # the loop then rescans
    finally:
        watcher.stop()


class _Gated(Hints):
    """Hints whose first delivery waits for ``gate``: it holds watchdog's reader thread in our
    callback, so the kernel's event queue fills up for real."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.held = threading.Event()

    def add_all(self, paths: set[str], closed: set[str]) -> None:
        self.held.set()
        self.gate.wait(30)
        super().add_all(paths, closed)


def _max_queued_events() -> int:
    try:
        return int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    except (OSError, ValueError):
        return -1


def test_a_real_queue_overflow_asks_for_a_rescan_and_watches_what_was_missed(
        inbox: Path, caplog: pytest.LogCaptureFixture) -> None:
    limit = _max_queued_events()
    if not 0 < limit <= 1_000_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too large to overflow cheaply")
    hints = _Gated()
    watcher = InboxWatcher(inbox, hints, inbox / ".bikewatch")
    watcher.start()
    try:
        a, b = touch(inbox / "a.jpg"), touch(inbox / "b.jpg")
        assert hints.held.wait(10), "the reader thread never delivered a hint"
        # The reader is held inside our callback; it read at most one buffer (2048 events) ahead.
        # Alternate two files: the kernel merges an event only with an identical one just before it.
        for i in range(limit + 4096):
            os.utime(a if i % 2 else b)
        (inbox / "DCIM" / "missed").mkdir()  # its IN_CREATE is lost: the queue is full
        hints.gate.set()
        collect(hints, lambda p, c, r: r, timeout=30)
        assert "overflow" in caplog.text  # watchdog's own record: the kernel's queue did overflow
        wait_until(lambda: "DCIM/missed" in watcher.watched, 10, what="a watch on the folder made during the overflow")
        touch(inbox / "DCIM" / "missed" / "IMG_0001.jpg")
        collect(hints, lambda p, c, r: "DCIM/missed/IMG_0001.jpg" in c)
        assert watcher.alive
    finally:
        hints.gate.set()
        watcher.stop()


def test_a_folder_renamed_over_an_empty_one_is_watched(running: tuple[InboxWatcher, Hints], inbox: Path,
                                                       tmp_path: Path) -> None:
    watcher, hints = running
    (inbox / "DCIM" / "100CANON").mkdir()
    collect(hints, lambda p, c, r: r)  # the new folder's rescan, asked for once its watch is added
    touch(tmp_path / "staging" / "IMG_0001.jpg")
    os.rename(tmp_path / "staging", inbox / "DCIM" / "100CANON")  # replaces the empty folder: a new inode
    collect(hints, lambda p, c, r: r)  # the moved-in folder's: its watch is added first
    touch(inbox / "DCIM" / "100CANON" / "IMG_0002.jpg")
    collect(hints, lambda p, c, r: "DCIM/100CANON/IMG_0002.jpg" in c)
