"""No-clobber placement and naming (bikewatch.store.delivery) on real files.

The cross-filesystem cases mount a small tmpfs (we normally run as root) and
skip with the reason when that is not possible.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from bikewatch.store.deliver import free_name
from bikewatch.store.delivery import NAME_MAX, copy_durably, fit_name, numbered_name, place, rename_noreplace

OLD_NS = 1_500_000_000_123_456_789


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make(path: Path, data: bytes, mtime_ns: int = OLD_NS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A folder on a different filesystem than tmp_path: a fresh tmpfs mount."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "bikewatch-test", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a cross-filesystem move: {res.stderr.strip() or res.returncode}")
    try:
        assert os.stat(mnt).st_dev != os.stat(tmp_path).st_dev
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "n", "expected"),
    [
        ("IMG_0001.jpg", 0, "IMG_0001.jpg"),
        ("IMG_0001.jpg", 1, "IMG_0001 (1).jpg"),
        ("IMG_0001.jpg", 12, "IMG_0001 (12).jpg"),
        ("archive.tar.gz", 2, "archive.tar (2).gz"),
        ("noext", 3, "noext (3)"),
        (".bashrc", 1, ".bashrc (1)"),
        ("IMG_0001.JPG", 1, "IMG_0001 (1).JPG"),
        ("weird name ü.jpeg", 1, "weird name ü (1).jpeg"),
    ],
)
def test_numbered_name(name: str, n: int, expected: str) -> None:
    assert numbered_name(name, n) == expected


def test_numbered_name_long_extension_is_not_an_extension() -> None:
    name = "report." + "x" * 40
    assert numbered_name(name, 1) == name + " (1)"


def nbytes(name: str) -> int:
    return len(name.encode("utf-8", "surrogateescape"))


def test_numbered_name_200_chars_fits() -> None:
    name = "a" * 200 + ".jpg"
    assert numbered_name(name, 1) == "a" * 200 + " (1).jpg"


def test_numbered_name_255_bytes_ascii_is_trimmed_keeping_suffix_and_extension() -> None:
    name = "b" * 251 + ".jpg"
    assert nbytes(name) == NAME_MAX
    out = numbered_name(name, 7)
    assert nbytes(out) == NAME_MAX and out.endswith(" (7).jpg") and out.startswith("bbbb")


def test_numbered_name_non_ascii_never_splits_a_character() -> None:
    name = "é" * 125 + ".jpg"  # 254 bytes
    for n in (1, 10, 100):
        out = numbered_name(name, n)
        assert nbytes(out) <= NAME_MAX
        assert out.endswith(f" ({n}).jpg")
        out.encode("utf-8")  # strict: no half character
        assert set(out[: -len(f" ({n}).jpg")]) == {"é"}
    emoji = "🚲" * 63 + ".jpg"  # 4-byte characters, 256 bytes: the stem must lose whole characters
    out = numbered_name(emoji, 1)
    assert nbytes(out) <= NAME_MAX and out.endswith(" (1).jpg")
    out.encode("utf-8")


def test_numbered_name_non_utf8_bytes_are_kept_when_trimming() -> None:
    name = os.fsdecode(b"\xff" * 251 + b".jpg")  # a 255-byte name that is not UTF-8
    out = numbered_name(name, 1)
    raw = os.fsencode(out)
    assert len(raw) == NAME_MAX and raw == b"\xff" * 247 + b" (1).jpg"


def test_numbered_names_are_usable_on_disk(tmp_path: Path) -> None:
    for name in ("é" * 125 + ".jpg", "c" * 251 + ".jpg", os.fsdecode(b"\xfe" * 250 + b".png")):
        for n in (0, 1, 99):
            p = tmp_path / numbered_name(name, n)
            p.write_bytes(b"x")  # ENAMETOOLONG would fail here
            p.unlink()


def test_fit_name_never_trims_the_tail() -> None:
    assert fit_name("x" * 300, " (1).jpg") == "x" * 247 + " (1).jpg"


# --------------------------------------------------------------------------- no-clobber rename


def test_rename_noreplace_moves(tmp_path: Path) -> None:
    src = make(tmp_path / "a", b"A")
    rename_noreplace(src, tmp_path / "b")
    assert not src.exists() and (tmp_path / "b").read_bytes() == b"A"


def test_rename_noreplace_refuses_to_clobber(tmp_path: Path) -> None:
    src = make(tmp_path / "a", b"new")
    dst = make(tmp_path / "b", b"old")
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    assert src.read_bytes() == b"new" and dst.read_bytes() == b"old"


def test_rename_noreplace_refuses_to_clobber_a_dangling_link(tmp_path: Path) -> None:
    src = make(tmp_path / "a", b"new")
    dst = tmp_path / "b"
    dst.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    assert dst.is_symlink() and src.read_bytes() == b"new"


def test_rename_noreplace_moves_a_link_as_a_link(tmp_path: Path) -> None:
    target = make(tmp_path / "target", b"T")
    link = tmp_path / "link"
    link.symlink_to(target)
    rename_noreplace(link, tmp_path / "moved")
    assert os.readlink(tmp_path / "moved") == str(target) and target.read_bytes() == b"T"


def test_rename_noreplace_across_filesystems_says_exdev(tmp_path: Path, other_fs: Path) -> None:
    src = make(tmp_path / "a", b"A")
    with pytest.raises(OSError) as exc:
        rename_noreplace(src, other_fs / "a")
    assert exc.value.errno == 18  # EXDEV: place() copies instead
    assert src.exists()


# --------------------------------------------------------------------------- place()


def test_place_same_filesystem_keeps_bytes_and_mtime(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = make(tmp_path / "in" / "a.jpg", data)
    dst = tmp_path / "out" / "a.jpg"
    dst.parent.mkdir()
    place(src, dst, tmp_name=".a.partial")
    assert not src.exists()
    assert dst.read_bytes() == data and os.stat(dst).st_mtime_ns == OLD_NS
    assert sorted(os.listdir(dst.parent)) == ["a.jpg"]


def test_place_refuses_to_clobber(tmp_path: Path) -> None:
    src = make(tmp_path / "a.jpg", b"new")
    dst = make(tmp_path / "out" / "a.jpg", b"old")
    with pytest.raises(FileExistsError):
        place(src, dst, tmp_name=".a.partial")
    assert src.read_bytes() == b"new" and dst.read_bytes() == b"old"


def test_place_across_filesystems_keeps_bytes_and_mtime(tmp_path: Path, other_fs: Path) -> None:
    data = os.urandom(2_500_000)  # more than one copy chunk
    src = make(tmp_path / "a.jpg", data)
    dst = other_fs / "a.jpg"
    place(src, dst, tmp_name=".bikewatch-k.partial")
    assert not src.exists()
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert os.stat(dst).st_mtime_ns == OLD_NS
    assert os.listdir(other_fs) == ["a.jpg"]  # no temporary left behind


def test_place_across_filesystems_refuses_to_clobber_and_cleans_up(tmp_path: Path, other_fs: Path) -> None:
    src = make(tmp_path / "a.jpg", b"new")
    dst = make(other_fs / "a.jpg", b"old")
    with pytest.raises(FileExistsError):
        place(src, dst, tmp_name=".bikewatch-k.partial")
    assert src.read_bytes() == b"new" and dst.read_bytes() == b"old"
    assert os.listdir(other_fs) == ["a.jpg"]


def test_place_across_filesystems_moves_a_link_as_a_link(tmp_path: Path, other_fs: Path) -> None:
    target = make(tmp_path / "outside.jpg", b"secret")
    link = tmp_path / "link.jpg"
    link.symlink_to(target)
    place(link, other_fs / "link.jpg", tmp_name=".k.partial")
    assert os.path.islink(other_fs / "link.jpg") and os.readlink(other_fs / "link.jpg") == str(target)
    assert not os.path.lexists(link)
    assert target.read_bytes() == b"secret" and os.stat(target).st_mtime_ns == OLD_NS


def test_place_across_filesystems_does_not_block_on_a_fifo(tmp_path: Path, other_fs: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    done = threading.Event()
    errors: list[BaseException] = []

    def move() -> None:
        try:
            place(fifo, other_fs / "pipe.jpg", tmp_name=".k.partial")
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=move, daemon=True).start()
    if not done.wait(10):
        # Unblock the stuck open() so the thread can finish, then fail.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("place() blocked opening a FIFO")
    assert not errors, errors
    assert stat.S_ISFIFO(os.lstat(other_fs / "pipe.jpg").st_mode)
    assert not os.path.lexists(fifo)


def test_place_across_filesystems_moves_a_socket_file(tmp_path: Path, other_fs: Path) -> None:
    import socket

    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
    place(path, other_fs / "s.sock", tmp_name=".k.partial")  # a socket cannot be opened to copy it
    assert stat.S_ISSOCK(os.lstat(other_fs / "s.sock").st_mode)
    assert not os.path.lexists(path)


def test_copy_durably_is_exclusive(tmp_path: Path) -> None:
    src = make(tmp_path / "a", b"A")
    tmp = make(tmp_path / "t", b"existing")
    with pytest.raises(FileExistsError):
        copy_durably(src, tmp)
    assert tmp.read_bytes() == b"existing"


# --------------------------------------------------------------------------- free_name() + place(): the service's naming


def test_free_name_picks_the_first_number_free_on_disk_and_in_the_batch(tmp_path: Path) -> None:
    out = tmp_path / "out"
    make(out / "IMG_0001.jpg", b"zero")
    make(out / "IMG_0001 (2).jpg", b"two")
    assert free_name(out, "IMG_0001.jpg", set()) == "IMG_0001 (1).jpg"  # fills a gap
    assert free_name(out, "IMG_0001.jpg", {"IMG_0001 (1).jpg"}) == "IMG_0001 (3).jpg"  # chosen for another item
    assert free_name(out, "new.jpg", set()) == "new.jpg"  # the plain name first


def test_many_collisions_every_source_present_exactly_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    datas = [os.urandom(64) for _ in range(12)]
    for i, data in enumerate(datas):
        place(make(tmp_path / "in" / f"{i}" / "IMG.jpg", data), out / free_name(out, "IMG.jpg", set()), tmp_name=".p")
    names = sorted(os.listdir(out))
    assert names == sorted(["IMG.jpg"] + [f"IMG ({n}).jpg" for n in range(1, 12)])
    assert sorted(sha(out / n) for n in names) == sorted(hashlib.sha256(d).hexdigest() for d in datas)
