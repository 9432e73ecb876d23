"""Hostile input, one daemon run for all of it: odd formats, broken files, odd names, links, FIFOs.

What must happen to each kind of file:

* **classified**: every decodable image, whatever its mode, format or name, lands in
  mountain/ or road/ with its CSV row;
* **rejected**: undecodable files land in rejected/ with their bytes kept and a reason in
  the CSV ``error`` column;
* **left alone**: partial downloads, dotfiles and OS metadata stay in the inbox, untouched;
* a **symlink** is never followed: its target is untouched, and a link that is moved stays a link.

Nothing is ever written outside the output folder, whatever a file name holds, and
the daemon keeps running afterwards. The output is on another filesystem than the
inbox where one is at hand (``/dev/shm``), so every file takes the copy path.
"""

from __future__ import annotations

import collections
import io
import os
import shutil
import stat
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

import imagefactory as f
from harness import Daemon, read_csv, wait_until
from photos import photo_bytes, sha256_file

LABELS = ("mountain", "road")


def noise(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    w, h = size
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    return im if mode == "RGB" else im.convert(mode)


def encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A tiny, valid PNG (correct CRCs) whose IHDR claims width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * (3 * 64), 9)  # far too little data: never decodable
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def write_file(path: Path, data: bytes) -> Path:
    """Write ``data`` at ``path``, making its parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def classified_files(folder: Path) -> dict[str, Path]:
    """Every decodable kind (and odd name); returns relative name -> path."""
    made: dict[str, Path] = {}

    def put(rel: str, data: bytes) -> None:
        made[rel] = write_file(folder / rel, data)

    def kind(rel: str, writer) -> None:
        p = writer(folder / rel)
        made[rel] = p

    put("grey.jpg", encoded(noise((120, 80), 1, "L"), "JPEG", quality=90))
    kind("cmyk.jpg", lambda p: f.save(p, noise((120, 80), 2, "CMYK"), "JPEG", quality=90))
    kind("rgba.png", lambda p: f.png(p, "RGBA", color=(10, 200, 30), alpha=100))
    kind("palette.png", lambda p: f.palette_png(p, color=(30, 60, 200)))
    kind("sixteen-bit.png", lambda p: f.png16(p, value=12345))
    kind("grey-alpha.png", lambda p: f.png(p, "LA", color=(90, 90, 90), alpha=200))
    kind("image.webp", lambda p: f.webp(p, color=(200, 100, 0)))
    kind("image.bmp", lambda p: f.bmp(p, color=(0, 100, 200)))
    kind("image.tiff", lambda p: f.tiff(p, color=(120, 0, 120)))
    kind("static.gif", lambda p: f.gif(p, color=(0, 150, 150)))
    kind("animated.gif", f.animated_gif)
    kind("progressive.jpg", lambda p: f.jpeg(p, image=noise((160, 100), 3), progressive=True))
    kind("exif-rotated.jpg", lambda p: f.jpeg(p, image=f.halves((200, 100)), exif_orientation=6))
    kind("pixel.png", lambda p: f.one_pixel(p, color=(1, 2, 3)))
    kind("panorama.jpg", lambda p: f.panorama(p, color=(40, 140, 40)))
    put("UPPER.JPG", photo_bytes(1, (64, 48), seed=9))
    put("Shout.JPEG", photo_bytes(2, (64, 48), seed=9))
    put("name with  spaces .jpg", photo_bytes(3, (64, 48), seed=9))
    put("Ünïcødé fjällcykel 山 велосипед.jpg", photo_bytes(4, (64, 48), seed=9))
    put("-leading-dash.jpg", photo_bytes(5, (64, 48), seed=9))
    put("--help.jpg", photo_bytes(6, (64, 48), seed=9))
    put("x" * 196 + ".jpg", photo_bytes(7, (64, 48), seed=9))  # 200 characters
    put("é" * 120 + ".jpg", photo_bytes(8, (64, 48), seed=9))  # 244 bytes in UTF-8
    put("$(touch PWNED) `id` ; rm -rf ~.jpg", photo_bytes(9, (64, 48), seed=9))
    put("x\\..\\..\\escape.jpg", photo_bytes(10, (64, 48), seed=9))
    put("line\nbreak\r\t.jpg", photo_bytes(11, (64, 48), seed=9))
    put('quote"comma,semi;.jpg', photo_bytes(12, (64, 48), seed=9))
    put("no-extension", photo_bytes(13, (64, 48), seed=9))
    put("a/b/c/d/nested.jpg", photo_bytes(14, (64, 48), seed=9))
    put("a/same-name.jpg", photo_bytes(15, (64, 48), seed=9))
    put("z/same-name.jpg", photo_bytes(16, (64, 48), seed=9))
    put("folder.jpg/inside.jpg", photo_bytes(17, (64, 48), seed=9))
    # A name that is not UTF-8 at all (Latin-1 bytes from an old camera or a Windows share).
    raw = os.fsencode(folder) + b"/caf\xe9 v\xe9lo.jpg"
    with open(raw, "wb") as fh:
        fh.write(photo_bytes(18, (64, 48), seed=9))
    made[os.fsdecode(b"caf\xe9 v\xe9lo.jpg")] = Path(os.fsdecode(raw))
    return made


def rejected_files(folder: Path) -> dict[str, Path]:
    made: dict[str, Path] = {}

    def put(rel: str, data: bytes) -> None:
        made[rel] = write_file(folder / rel, data)

    put("empty.jpg", b"")
    whole = encoded(noise((160, 120), 20), "JPEG", quality=90)
    put("truncated.jpg", whole[: len(whole) // 2])
    put("page.jpg", b"<!DOCTYPE html><html><head><title>403 Forbidden</title></head><body>nope</body></html>\n")
    put("notes.png", b"just some text, not a picture at all\n")
    put("random.jpg", np.random.default_rng(21).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    put("bomb.png", bomb_png())
    put("document.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")
    put("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>\n')
    put("archive.zip", b"PK\x05\x06" + b"\0" * 18)
    put("clip.mp4", b"\0\0\0\x18ftypmp42\0\0\0\0mp42isom" + b"\0" * 64)
    put("readme.txt", b"hello\n")
    put("sub/deep/broken.JPG", whole[:100])
    return made


LEFT_ALONE = {
    "upload.jpg.part": b"partial upload",
    "video.crdownload": b"chrome download in progress",
    ".hidden.jpg": photo_bytes(30, (32, 32), seed=9),
    ".DS_Store": b"\0\0\0\1Bud1",
    "Thumbs.db": b"\xd0\xcf\x11\xe0 thumbs",
    "a/.DS_Store": b"\0\0\0\1Bud1 nested",
    ".hidden-folder/photo.jpg": photo_bytes(31, (32, 32), seed=9),
}


def snapshot(paths: list[Path]) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), os.lstat(p).st_mtime_ns) for p in paths}


def tree(folder: Path) -> set[str]:
    out = set()
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            out.add(os.path.relpath(os.path.join(root, name), folder))
    return out


def test_hostile_inbox(tmp_path: Path) -> None:
    box = tmp_path / "box"  # the inbox's parent: nothing new may appear here
    inbox = box / "inbox"
    outside = tmp_path / "outside"  # targets of links from the inbox
    outside.mkdir()
    target = outside / "target.jpg"
    target.write_bytes(photo_bytes(40, (64, 64), seed=9))
    (outside / "secret.txt").write_text("do not touch\n")
    shm = Path("/dev/shm")
    out_parent: Path
    if shm.is_dir() and os.access(shm, os.W_OK) and os.stat(shm).st_dev != os.stat(tmp_path).st_dev:
        out_parent = Path(tempfile.mkdtemp(prefix="bikewatch-hostile-", dir=shm))
    else:
        out_parent = tmp_path / "outbox"
        out_parent.mkdir()
    output = out_parent / "sorted"
    inbox.mkdir(parents=True)
    d = Daemon(tmp_path, inbox=inbox, output=output,
               settings={"settle_seconds": 0.3, "closed_settle_seconds": 0.05, "max_batch": 8},
               # A systemd service does not get Python's lenient C-locale stdout: make it strict.
               env={"PYTHONIOENCODING": "utf-8:strict"})
    try:
        d.start()
        before_box, before_out = set(os.listdir(box)), set(os.listdir(out_parent))
        before_outside = snapshot([target, outside / "secret.txt"])

        stage = inbox / ".staging"  # hidden (ignored), on the inbox's filesystem
        good = classified_files(stage)
        bad = rejected_files(stage)
        os.symlink(target, stage / "link-to-outside.jpg")
        os.symlink(outside, stage / "link-to-folder")
        os.symlink(outside / "missing.jpg", stage / "dangling.jpg")
        os.mkfifo(stage / "pipe.jpg")
        expected_good = {rel: sha256_file(p) for rel, p in good.items()}
        expected_bad = {rel: sha256_file(p) for rel, p in bad.items()}
        # Move everything in at once (top-level entries: folders carry their nested files).
        for entry in os.listdir(stage):
            os.rename(stage / entry, inbox / entry)
        stage.rmdir()
        alone = {}
        for rel, data in LEFT_ALONE.items():
            p = inbox / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            alone[rel] = p
        alone_before = snapshot(list(alone.values()))

        n_links, n_fifo = 3, 1
        total = len(good) + len(bad) + n_links + n_fifo

        def progress() -> int:
            return len(read_csv(d.log_path))

        try:
            # Links may be left in the inbox rather than rejected; either is fine (checked below).
            wait_until(lambda: progress() >= total - sum(p.is_symlink() for p in inbox.iterdir()), 120,
                       interval=0.1, what=f"{total} rows")
        except AssertionError:
            raise AssertionError(f"{progress()} of {total} rows; daemon alive: {d.proc.poll() is None}\n"
                                 + "\n".join(d.lines[-60:])) from None
        assert d.proc is not None and d.proc.poll() is None, d.output_text()
        rows = read_csv(d.log_path)
        total -= sum(p.is_symlink() for p in inbox.iterdir())
        assert len(rows) == total, [r["source"] for r in rows]
        assert len({r["id"] for r in rows}) == total

        # Every delivered regular file, by content.
        delivered: dict[str, list[Path]] = collections.defaultdict(list)
        links, fifos = [], []
        for root, dirs, files in os.walk(output):
            for name in dirs + files:  # a link to a folder is listed among the folders
                p = Path(root) / name
                st = os.lstat(p)
                if name == "classifications.csv" or stat.S_ISDIR(st.st_mode):
                    continue
                if stat.S_ISLNK(st.st_mode):
                    links.append(p)
                elif stat.S_ISFIFO(st.st_mode):
                    fifos.append(p)
                else:
                    delivered[sha256_file(p)].append(p)
        assert not any(p.name.endswith(".partial") for ps in delivered.values() for p in ps)
        by_sha = collections.defaultdict(list)
        for r in rows:
            by_sha[r["sha256"]].append(r)

        for rel, digest in expected_good.items():
            assert len(delivered[digest]) == 1, f"{rel!r}: {delivered[digest]}"
            place = delivered[digest][0]
            assert place.relative_to(output).parts[0] in LABELS, f"{rel!r} went to {place}"
            (row,) = by_sha[digest]
            assert row["label"] in LABELS and row["error"] == "", (rel, row)
            assert row["p_mountain"] and row["p_road"], (rel, row)
            try:
                str(place).encode("utf-8")
            except UnicodeEncodeError:  # a name that is not UTF-8: the CSV shows its bytes escaped
                assert row["destination"] == os.fsencode(place).decode("utf-8", "backslashreplace"), (
                    rel, row["destination"])
            else:
                assert row["destination"] == str(place), (rel, row["destination"], place)
        for rel, digest in expected_bad.items():
            assert len(delivered[digest]) == 1, f"{rel!r}: {delivered[digest]}"
            place = delivered[digest][0]
            assert place.relative_to(output).parts[0] == "rejected", f"{rel!r} went to {place}"
            (row,) = by_sha[digest]
            assert row["label"] == "rejected" and row["error"], (rel, row)
            assert Path(row["destination"]) == place, (rel, row["destination"], place)
        reasons = {rel: by_sha[digest][0]["error"] for rel, digest in expected_bad.items()}
        print("rejection reasons:", *(f"  {k}: {v}" for k, v in reasons.items()), sep="\n")
        assert "empty" in reasons["empty.jpg"].lower()
        assert "large" in reasons["bomb.png"].lower() or "pixels" in reasons["bomb.png"].lower()
        assert "truncat" in reasons["truncated.jpg"].lower() or "decode" in reasons["truncated.jpg"].lower()

        # Links: never followed. Targets untouched; a link that was moved is still a link to the same place.
        assert snapshot([target, outside / "secret.txt"]) == before_outside
        assert sorted(os.listdir(outside)) == ["secret.txt", "target.jpg"]
        assert not delivered.get(sha256_file(target)), "a symlink was followed and its target copied"
        for p in links:
            assert os.readlink(p) in (str(target), str(outside), str(outside / "missing.jpg")), p
        still_links = [p for p in inbox.iterdir() if p.is_symlink()]
        assert len(links) + len(still_links) == n_links, (links, still_links)
        assert len(fifos) == n_fifo, fifos

        # Left alone: still in the inbox, same bytes, same mtime.
        assert snapshot(list(alone.values())) == alone_before
        leftovers = {os.path.relpath(os.path.join(r, n), inbox)
                     for r, ds, fs in os.walk(inbox) for n in fs if ".bikewatch" not in r}
        assert leftovers == set(LEFT_ALONE), leftovers

        # Nothing written outside the output folder (or the inbox's own state).
        assert set(os.listdir(box)) == before_box, set(os.listdir(box)) ^ before_box
        assert set(os.listdir(out_parent)) == before_out, set(os.listdir(out_parent)) ^ before_out
        assert set(os.listdir(tmp_path)) == {"box", "outside", "daemon.toml", "daemon.notify"}
        assert not any(os.path.basename(p) == "PWNED" for p in tree(tmp_path) | tree(out_parent)), "a name ran"
        assert not (Path(__file__).resolve().parent.parent / "PWNED").exists(), "a file name was executed"
        assert set(os.listdir(output)) <= {"mountain", "road", "rejected", "classifications.csv"}

        # Still alive and working.
        (inbox / "after.jpg").write_bytes(photo_bytes(99, (64, 48), seed=9))
        wait_until(lambda: progress() == total + 1, 30, what="one more photo sorted")
        last = read_csv(d.log_path)[-1]
        assert last["label"] in LABELS and Path(last["destination"]).exists()
        assert d.terminate(30) == 0, d.output_text()
        errors = [e for e in d.events() if e.get("level") == "error"]
        assert not errors, errors
    finally:
        d.stop_quietly()
        if out_parent.is_relative_to(shm):
            shutil.rmtree(out_parent, ignore_errors=True)
