"""Finding files and deciding when they are complete (bikewatch.intake: scan, readiness, hints, watcher).

Readiness is pure and gets explicit clock values; scan and the watchdog
observer run on real tmp folders, waited for with deadlines, never sleeps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from bikewatch.config import DEFAULT_IGNORE
from bikewatch.intake.hints import Hints
from bikewatch.intake.readiness import Readiness
from bikewatch.intake.scan import Seen, is_ignored, mount_fstype, needs_polling, observe, scan
from bikewatch.intake.watcher import InboxWatcher
from harness import collect


def seen(rel: str = "a.jpg", size: int = 10, mtime: int = 1, ino: int = 7, regular: bool = True) -> Seen:
    return Seen(rel, size, mtime, ino, regular)


# --------------------------------------------------------------------------- Readiness


def test_ready_after_settle_time_unchanged() -> None:
    r = Readiness(settle=1.0, closed_settle=0.1)
    r.update(seen(), now=100.0)
    assert r.ready(100.0) == []
    assert r.ready(100.99) == []
    r.update(seen(), now=100.5)  # the same observation again does not restart the clock
    assert r.ready(101.0) == [seen()]
    assert len(r) == 1


@pytest.mark.parametrize("change", [dict(size=11), dict(mtime=2), dict(ino=8)])
def test_any_change_restarts_the_clock(change: dict[str, int]) -> None:
    r = Readiness(settle=1.0, closed_settle=0.1)
    r.update(seen(), now=0.0)
    r.update(seen(**change), now=0.9)
    assert r.ready(1.5) == []
    assert r.ready(2.0) == [seen(**change)]


def test_growing_file_is_never_ready_while_it_keeps_growing() -> None:
    r = Readiness(settle=1.0, closed_settle=0.1)
    t = 0.0
    for size in range(1, 50):
        r.update(seen(size=size * 4096, mtime=size), now=t)
        assert r.ready(t) == [] and r.ready(t + 0.99) == []
        t += 0.5  # appends every 0.5 s, shorter than the settle time
    assert r.ready(t - 0.5 + 1.0) != []


def test_closed_file_settles_sooner_and_a_change_cancels_it() -> None:
    r = Readiness(settle=1.0, closed_settle=0.1)
    r.update(seen(), now=0.0)
    r.mark_closed("a.jpg")
    assert r.ready(0.05) == []
    assert r.ready(0.1) == [seen()]
    r.update(seen(size=20), now=0.2)  # written again after the close
    assert r.ready(0.35) == []
    assert r.ready(1.2) == [seen(size=20)]


def test_closed_settle_never_longer_than_settle() -> None:
    r = Readiness(settle=0.5, closed_settle=5.0)
    r.update(seen(), now=0.0)
    r.mark_closed("a.jpg")
    assert r.ready(0.5) == [seen()]


def test_mark_closed_of_unknown_path_is_harmless() -> None:
    r = Readiness(settle=1.0, closed_settle=0.1)
    r.mark_closed("nope")
    assert len(r) == 0 and r.next_due(0.0) is None


def test_links_and_special_files_are_ready_at_once() -> None:
    r = Readiness(settle=1.0, closed_settle=0.1)
    r.update(seen("link", regular=False), now=5.0)
    assert r.ready(5.0) == [seen("link", regular=False)]


def test_ready_is_oldest_first_and_forget_retain_next_due() -> None:
    r = Readiness(settle=1.0, closed_settle=0.1)
    r.update(seen("b"), now=1.0)
    r.update(seen("a"), now=2.0)
    r.update(seen("c"), now=1.0)
    assert [s.rel for s in r.ready(10.0)] == ["b", "c", "a"]
    assert r.next_due(1.5) == pytest.approx(0.5)
    assert r.next_due(50.0) == 0.0
    r.forget("b")
    r.retain({"a", "zzz"})
    assert len(r) == 1 and [s.rel for s in r.ready(10.0)] == ["a"]
    assert r.next_due(2.25) == pytest.approx(0.75)


# --------------------------------------------------------------------------- is_ignored


@pytest.mark.parametrize(
    "name",
    [".hidden.jpg", ".bikewatch", "IMG_1.jpg.part", "x.tmp", "y.jpg.crdownload", "backup.jpg~", ".DS_Store",
     "Thumbs.db", "desktop.ini", "~$draft.docx", "a.partial", "b.filepart", "Icon\r"],
)
def test_ignored_by_default(name: str) -> None:
    assert is_ignored(name, DEFAULT_IGNORE)


@pytest.mark.parametrize("name", ["IMG_0001.jpg", "IMG_0001.JPG", "part.jpg", "tmp", "photo~1.jpg", "a.jpg.bak",
                                  "DCIM", "Thumbs.db.jpg", "desktop.ini.png"])
def test_not_ignored_by_default(name: str) -> None:
    assert not is_ignored(name, DEFAULT_IGNORE)


def test_is_ignored_with_custom_patterns() -> None:
    assert is_ignored("a.raw", ("*.raw",)) and not is_ignored(".x", ("*.raw",)) and not is_ignored("a", ())


# --------------------------------------------------------------------------- scan / observe


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def rels(inbox: Path, **kw: object) -> set[str]:
    return {s.rel for s in scan(inbox, DEFAULT_IGNORE, **kw)}  # type: ignore[arg-type]


def test_scan_finds_files_in_subfolders(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    touch(inbox / "a.jpg")
    touch(inbox / "DCIM" / "100CANON" / "IMG_0001.JPG", b"12345")
    touch(inbox / "DCIM" / "101CANON" / "IMG_0002.JPG")
    found = {s.rel: s for s in scan(inbox, DEFAULT_IGNORE)}
    assert set(found) == {"a.jpg", "DCIM/100CANON/IMG_0001.JPG", "DCIM/101CANON/IMG_0002.JPG"}
    s = found["DCIM/100CANON/IMG_0001.JPG"]
    st = os.stat(inbox / s.rel)
    assert (s.size, s.mtime_ns, s.ino, s.regular) == (5, st.st_mtime_ns, st.st_ino, True)


def test_scan_skips_ignored_files_hidden_dirs_and_the_state_dir(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    touch(inbox / "keep.jpg")
    for name in (".hidden.jpg", "u.jpg.part", "x.tmp", "d.crdownload", "b~", ".DS_Store", "Thumbs.db", "desktop.ini"):
        touch(inbox / name)
    touch(inbox / ".thumbnails" / "t.jpg")
    touch(inbox / ".bikewatch" / "work" / "w-1-a" / "w-1-a.00000001.0000")
    touch(inbox / "state" / "x.jpg")
    assert rels(inbox, skip=[inbox / "state"]) == {"keep.jpg"}
    # Even with no hidden-file pattern, the state folder is never input.
    found = {s.rel for s in scan(inbox, ("*.part",), skip=[inbox / ".bikewatch", inbox / "state"])}
    assert "keep.jpg" in found and ".thumbnails/t.jpg" in found
    assert not any(r.startswith((".bikewatch", "state")) for r in found)


def test_scan_does_not_follow_symlinked_dirs(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    outside = tmp_path / "outside"
    touch(outside / "secret.jpg")
    touch(inbox / "real.jpg")
    (inbox / "linkdir").symlink_to(outside, target_is_directory=True)
    (inbox / "link.jpg").symlink_to(outside / "secret.jpg")
    found = {s.rel: s for s in scan(inbox, DEFAULT_IGNORE)}
    assert set(found) == {"real.jpg", "linkdir", "link.jpg"}  # the links themselves, never what they point to
    assert not found["linkdir"].regular and not found["link.jpg"].regular
    assert found["real.jpg"].regular


def test_scan_reports_special_files_as_not_regular(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.mkfifo(inbox / "pipe")
    (s,) = list(scan(inbox, DEFAULT_IGNORE))
    assert s.rel == "pipe" and not s.regular


def test_scan_raises_when_the_inbox_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(scan(tmp_path / "gone", DEFAULT_IGNORE))
    f = touch(tmp_path / "file")
    with pytest.raises(NotADirectoryError):
        list(scan(f, DEFAULT_IGNORE))


def test_scan_of_an_empty_inbox_is_empty(tmp_path: Path) -> None:
    assert list(scan(tmp_path, DEFAULT_IGNORE)) == []


def test_observe(tmp_path: Path) -> None:
    touch(tmp_path / "a.jpg", b"abc")
    (tmp_path / "d").mkdir()
    (tmp_path / "l").symlink_to(tmp_path / "nowhere")
    s = observe(tmp_path, "a.jpg")
    assert s is not None and s.size == 3 and s.regular
    assert observe(tmp_path, "d") is None
    assert observe(tmp_path, "missing") is None
    link = observe(tmp_path, "l")
    assert link is not None and not link.regular


# --------------------------------------------------------------------------- filesystems

MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /proc rw,nosuid shared:12 - proc proc rw
40 22 0:35 / /srv/photos rw,relatime shared:20 - nfs4 server:/export/photos rw,vers=4.2
41 40 0:36 / /srv/photos/local rw,relatime - ext4 /dev/sdb1 rw
42 22 0:37 / /mnt/my\040drive rw,relatime - fuse.sshfs me@host:/ rw
43 22 0:38 / /srv/photosx rw - xfs /dev/sdc1 rw
44 22 0:39 / /data rw master:7 propagated_from:3 - cifs //nas/data rw
"""


@pytest.mark.parametrize(
    ("path", "fstype"),
    [
        ("/srv/photos/inbox", "nfs4"),
        ("/srv/photos", "nfs4"),
        ("/srv/photos/local/inbox", "ext4"),  # the longest mount point wins
        ("/srv/photosx/inbox", "xfs"),  # a prefix of the name is not a parent folder
        ("/mnt/my drive/inbox", "fuse.sshfs"),  # \040 is a space
        ("/data/in", "cifs"),  # several optional fields before " - "
        ("/home/me", "ext4"),
    ],
)
def test_mount_fstype_from_sample_mountinfo(path: str, fstype: str) -> None:
    assert mount_fstype(Path(path), MOUNTINFO) == fstype


def test_mount_fstype_of_garbage_is_unknown() -> None:
    assert mount_fstype(Path("/x"), "not a mountinfo line\n\n") == "unknown"


def test_mount_fstype_of_this_machine(tmp_path: Path) -> None:
    assert mount_fstype(tmp_path) not in ("", "unknown")


@pytest.mark.parametrize("fstype", ["nfs", "nfs4", "cifs", "smb3", "9p", "fuse", "fuse.sshfs", "fuse.rclone",
                                    "ceph", "glusterfs", "virtiofs", "vboxsf"])
def test_needs_polling_on_network_filesystems(fstype: str) -> None:
    assert needs_polling(fstype)


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs", "tmpfs", "zfs", "overlay", "unknown"])
def test_no_polling_on_local_filesystems(fstype: str) -> None:
    assert not needs_polling(fstype)


# --------------------------------------------------------------------------- Hints and InboxWatcher


def test_hints_take_clears() -> None:
    h = Hints()
    h.add("a")
    h.add("b", closed=True)
    assert h.wake.is_set()
    assert h.take() == ({"a", "b"}, {"b"}, False)
    assert not h.wake.is_set()
    h.request_rescan()
    assert h.take() == (set(), set(), True)


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, Hints]]:
    inbox = tmp_path / "inbox"
    (inbox / ".bikewatch" / "work").mkdir(parents=True)
    (inbox / "DCIM").mkdir()
    hints = Hints()
    watcher = InboxWatcher(inbox, hints, inbox / ".bikewatch")
    watcher.start()
    try:
        assert watcher.alive
        yield inbox, hints
    finally:
        watcher.stop()
    assert not watcher.alive




def test_watcher_hints_a_created_file_and_its_close(watched: tuple[Path, Hints]) -> None:
    inbox, hints = watched
    touch(inbox / "DCIM" / "IMG_0001.jpg", b"photo")
    paths, closed, _ = collect(hints, lambda p, c, r: "DCIM/IMG_0001.jpg" in c)
    assert "DCIM/IMG_0001.jpg" in paths


def test_watcher_hints_a_rename_by_its_new_name_as_done(watched: tuple[Path, Hints], tmp_path: Path) -> None:
    inbox, hints = watched
    touch(inbox / "upload.jpg.part")
    collect(hints, lambda p, c, r: "upload.jpg.part" in c)
    os.rename(inbox / "upload.jpg.part", inbox / "upload.jpg")
    collect(hints, lambda p, c, r: "upload.jpg" in c)  # the upload contract: the rename says "complete"


def test_watcher_hints_a_rename_from_outside_the_inbox_as_done(watched: tuple[Path, Hints], tmp_path: Path) -> None:
    inbox, hints = watched
    staged = touch(tmp_path / "staging" / "IMG_0002.jpg", b"photo")
    os.rename(staged, inbox / "DCIM" / "IMG_0002.jpg")  # an IN_MOVED_TO with no IN_MOVED_FROM in the inbox
    paths, closed, _ = collect(hints, lambda p, c, r: "DCIM/IMG_0002.jpg" in c)
    assert "DCIM/IMG_0002.jpg" in paths


def test_watcher_does_not_call_a_file_done_while_its_writer_has_it_open(watched: tuple[Path, Hints]) -> None:
    inbox, hints = watched
    with open(inbox / "slow.jpg", "wb") as writer:
        writer.write(b"first half")
        writer.flush()
        touch(inbox / "marker.jpg")  # events arrive in order: once this is seen, slow.jpg's were too
        paths, closed, _ = collect(hints, lambda p, c, r: "marker.jpg" in c)
        assert "slow.jpg" in paths and "slow.jpg" not in closed  # created and written: not done
        writer.write(b"second half")
    collect(hints, lambda p, c, r: "slow.jpg" in c)  # closed after writing: done


def test_watcher_is_silent_about_files_moved_out(watched: tuple[Path, Hints], tmp_path: Path) -> None:
    inbox, hints = watched
    f = touch(inbox / "leaving.jpg")
    collect(hints, lambda p, c, r: "leaving.jpg" in c)
    os.rename(f, tmp_path / "elsewhere.jpg")
    touch(inbox / "marker.jpg")
    paths, _, _ = collect(hints, lambda p, c, r: "marker.jpg" in c)
    assert "leaving.jpg" not in paths


def test_watcher_asks_for_a_rescan_when_a_folder_moves_in(watched: tuple[Path, Hints], tmp_path: Path) -> None:
    inbox, hints = watched
    staging = tmp_path / "staging"
    touch(staging / "100CANON" / "IMG_0001.jpg")
    os.rename(staging, inbox / "DCIM" / "dump")
    collect(hints, lambda p, c, r: r)


def test_watcher_is_silent_about_the_state_dir(watched: tuple[Path, Hints]) -> None:
    inbox, hints = watched
    touch(inbox / ".bikewatch" / "work" / "journal.json")
    os.rename(inbox / ".bikewatch" / "work" / "journal.json", inbox / ".bikewatch" / "work" / "j2.json")
    touch(inbox / "marker.jpg")  # events arrive in order: once this is seen, the others were too
    paths, _, _ = collect(hints, lambda p, c, r: "marker.jpg" in c)
    assert not any(p.startswith(".bikewatch") for p in paths), paths


def _inotify_watches() -> int:
    """inotify watches held by this process, from /proc/self/fdinfo (one "inotify wd:" line each)."""
    count = 0
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            count += Path(f"/proc/self/fdinfo/{fd}").read_text().count("inotify wd:")
        except OSError:
            pass  # an fd closed meanwhile
    return count


def test_watcher_does_not_watch_its_own_state_folder(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    for folder in (".bikewatch/work/w1", ".bikewatch/status", "DCIM/100CANON"):
        (inbox / folder).mkdir(parents=True)
    before = _inotify_watches()
    hints = Hints()
    watcher = InboxWatcher(inbox, hints, inbox / ".bikewatch")
    watcher.start()
    try:
        assert _inotify_watches() - before == 3  # inbox, DCIM, DCIM/100CANON: none below .bikewatch
        assert watcher.watched == {"", "DCIM", "DCIM/100CANON"}
        (inbox / "DCIM" / "101CANON").mkdir()  # a new folder elsewhere is still watched, with its files
        collect(hints, lambda p, c, r: r)  # asked for once the new folder's watch is added
        assert "DCIM/101CANON" in watcher.watched and _inotify_watches() - before == 4
        touch(inbox / "DCIM" / "101CANON" / "IMG_0001.jpg")
        collect(hints, lambda p, c, r: "DCIM/101CANON/IMG_0001.jpg" in c)
    finally:
        watcher.stop()


def test_watcher_ignores_deletions(watched: tuple[Path, Hints]) -> None:
    inbox, hints = watched
    f = touch(inbox / "gone.jpg")
    collect(hints, lambda p, c, r: "gone.jpg" in c)
    f.unlink()
    touch(inbox / "marker.jpg")
    paths, _, _ = collect(hints, lambda p, c, r: "marker.jpg" in c)
    assert "gone.jpg" not in paths


@pytest.mark.parametrize("name", ["THUMBS.DB", "Desktop.ini", "X.PART", "a.TMP", "photo.CrDownload"])
def test_ignore_patterns_are_case_insensitive(name: str) -> None:
    from bikewatch.config import DEFAULT_IGNORE

    assert is_ignored(name, DEFAULT_IGNORE)
    assert not is_ignored("IMG_0001.JPG", DEFAULT_IGNORE)


def test_ready_files_left_by_the_caller_are_ready_again_next_time() -> None:
    r = Readiness(settle=1.0, closed_settle=0.1)
    r.update(seen("a"), now=0.0)
    assert r.ready(0.5) == [] and r.next_due(0.5) == pytest.approx(0.5)
    assert [s.rel for s in r.ready(1.0)] == ["a"]
    assert [s.rel for s in r.ready(1.1)] == ["a"]  # not taken: still ready
    r.update(seen("b"), now=1.2)
    assert [s.rel for s in r.ready(1.3, limit=1)] == ["a"]
    assert [s.rel for s in r.ready(2.2)] == ["a", "b"]


def test_close_write_and_new_files_make_the_next_due_time_earlier() -> None:
    r = Readiness(settle=1.0, closed_settle=0.1)
    r.update(seen("slow"), now=0.0)
    assert r.ready(0.2) == []
    r.update(seen("copied"), now=0.3)
    r.mark_closed("copied")
    assert r.next_due(0.3) == pytest.approx(0.1)
    assert [s.rel for s in r.ready(0.4)] == ["copied"]
    r.forget("copied")
    r.update(seen("link", regular=False), now=0.5)
    assert [s.rel for s in r.ready(0.5)] == ["link"]
    r.forget("link")
    assert r.ready(0.9) == [] and r.next_due(0.9) == pytest.approx(0.1)
    assert [s.rel for s in r.ready(1.0)] == ["slow"]
