"""Embedded EXIF previews (bikewatch.decode.previews, batching.prepare): used when trustworthy, refused when stale.

Every photo here is a real JPEG made with Pillow, its preview embedded in IFD1 as DCF
cameras do (bikewatch.testing.camera), and read back by Pillow's own EXIF reader as a check
on that builder.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageOps

from bikewatch.decode import previews
from harness import wait_until
from bikewatch.decode.prepare import DECODED_FULL, DECODED_PREVIEW, prepare
from bikewatch.files import sha256_file
from bikewatch.testing.camera import as_stored, camera_jpeg, jpeg_bytes, preview_image
from bikewatch.decode.pool import DecodePool
from bikewatch.store.deliver import finish_batch
from bikewatch.store.journal import PHASE_DECIDED, Item, Journal, write_journal
from bikewatch.store.workarea import WorkArea
from bikewatch.store.ledger import COLUMNS, Ledger, Row, read_rows
from bikewatch.decode.preprocess import preprocess_bytes

MAX = 100_000_000
SIZE = (1600, 1200)


def scene(size: tuple[int, int] = SIZE, seed: int = 0) -> Image.Image:
    """A photo-like picture: smooth shapes with some grain, big enough to need more than the file's head."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, base.shape, dtype=np.int16)
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def full_array(path: Path) -> np.ndarray:
    return preprocess_bytes(path.read_bytes())


def test_the_builder_embeds_the_preview_where_pillow_finds_it(tmp_path: Path) -> None:
    p = write(tmp_path / "a.jpg", camera_jpeg(scene(), orientation=6))
    with Image.open(p) as im:
        exif = im.getexif()
        ifd1 = exif.get_ifd(ExifTags.IFD.IFD1)
        assert exif[ExifTags.Base.Orientation] == 6
        offset, length = ifd1[ExifTags.Base.JpegIFOffset], ifd1[ExifTags.Base.JpegIFByteCount]
        thumb = im.info["exif"][6 + offset:6 + offset + length]
    with Image.open(io.BytesIO(thumb)) as t:
        assert t.format == "JPEG" and t.size == (160, 120)
    header = previews.read_header(p.read_bytes()[:previews.HEAD_BYTES])
    assert header.frame == SIZE
    got = previews.check(header, max_pixels=MAX)
    assert isinstance(got, previews.Preview) and got.data == thumb and got.orientation == 6


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_a_trustworthy_preview_is_used_and_matches_the_full_image(tmp_path: Path, orientation: int) -> None:
    seen = scene()
    p = write(tmp_path / "a.jpg", camera_jpeg(as_stored(seen, orientation), orientation=orientation))
    with Image.open(p) as im:
        assert (ImageOps.exif_transpose(im) or im).size == seen.size  # the builder stores what a camera would
    got = prepare(p, "k", max_pixels=MAX, previews=True)
    assert got.error == "" and got.decoded_from == DECODED_PREVIEW
    assert got.sha256 == "" and got.size == p.stat().st_size
    full = full_array(p)
    assert got.array is not None
    assert np.abs(got.array - full).mean() < 4.0  # the same picture, the same way up
    turned = np.rot90(full) if orientation in (1, 3) else full[::-1, ::-1]  # what a wrong turn would give
    assert np.abs(got.array - turned).mean() > 4 * np.abs(got.array - full).mean()


def test_previews_off_decodes_and_hashes_the_whole_file(tmp_path: Path) -> None:
    p = write(tmp_path / "a.jpg", camera_jpeg(scene()))
    got = prepare(p, "k", max_pixels=MAX, previews=False)
    assert got.decoded_from == DECODED_FULL and got.sha256 == sha256_file(p)


def _stale(tmp_path: Path, main: Image.Image, preview_of: Image.Image, orientation: int = 1) -> Path:
    return write(tmp_path / "stale.jpg", camera_jpeg(main, orientation=orientation, preview=preview_image(preview_of)))


@pytest.mark.parametrize("edit", ["rotated", "rotated, orientation reset", "cropped square", "cropped 16:9"])
def test_a_stale_preview_is_refused(tmp_path: Path, edit: str) -> None:
    """An editor changed the pixels but kept the camera's preview: classify from the pixels."""
    original = scene()
    if edit == "rotated":  # pixels turned, the old orientation tag and preview kept
        p = _stale(tmp_path, original.transpose(Image.Transpose.ROTATE_90), original, orientation=6)
    elif edit == "rotated, orientation reset":
        p = _stale(tmp_path, original.transpose(Image.Transpose.ROTATE_270), original)
    elif edit == "cropped square":
        p = _stale(tmp_path, original.crop((200, 0, 1400, 1200)), original)
    else:
        p = _stale(tmp_path, original.crop((0, 150, 1600, 1050)), original)
    assert isinstance(previews.preview_of(p.read_bytes()[:previews.HEAD_BYTES], max_pixels=MAX), str)
    got = prepare(p, "k", max_pixels=MAX, previews=True)
    assert got.decoded_from == DECODED_FULL and got.sha256 == sha256_file(p)
    assert got.array is not None and np.array_equal(got.array, full_array(p))


def test_a_letterboxed_preview_of_a_wide_photo_is_refused(tmp_path: Path) -> None:
    """DCF's 160x120 thumbnail of a 16:9 photo has black bars: not the image's shape."""
    wide = scene((1920, 1080))
    box = Image.new("RGB", (160, 120))
    box.paste(wide.resize((160, 90)), (0, 15))
    p = write(tmp_path / "wide.jpg", camera_jpeg(wide, preview=box))
    assert prepare(p, "k", max_pixels=MAX, previews=True).decoded_from == DECODED_FULL


def test_a_preview_smaller_than_the_model_input_is_refused(tmp_path: Path) -> None:
    img = scene()
    p = write(tmp_path / "a.jpg", camera_jpeg(img, preview=preview_image(img, long_side=80)))  # 80x60
    assert previews.preview_of(p.read_bytes()[:previews.HEAD_BYTES], max_pixels=MAX) == "preview too small (80x60)"
    assert prepare(p, "k", max_pixels=MAX, previews=True).decoded_from == DECODED_FULL


def test_a_preview_that_does_not_decode_falls_back_to_the_image(tmp_path: Path) -> None:
    img = scene()
    good = jpeg_bytes(preview_image(img))
    broken = good[:len(good) // 3] + bytes(len(good) - len(good) // 3)  # header intact, scan data zeroed
    p = write(tmp_path / "a.jpg", camera_jpeg(img, preview=broken))
    got = prepare(p, "k", max_pixels=MAX, previews=True)
    assert got.error == "" and got.decoded_from == DECODED_FULL


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 64, b"\xff\xd8\xff\xe1\xff\xff" + b"\x00" * 32])
def test_garbage_in_the_exif_block_falls_back_to_the_image(tmp_path: Path, garbage: bytes) -> None:
    img = scene()
    data = jpeg_bytes(img, exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00" + garbage)
    p = write(tmp_path / "a.jpg", data)
    got = prepare(p, "k", max_pixels=MAX, previews=True)
    assert got.error == "" and got.decoded_from == DECODED_FULL


def test_a_camera_photo_cut_short_is_rejected_as_before_not_sorted_by_its_preview(tmp_path: Path) -> None:
    data = camera_jpeg(scene())
    p = write(tmp_path / "cut.jpg", data[: len(data) * 2 // 3])
    got = prepare(p, "k", max_pixels=MAX, previews=True)
    assert got.array is None and "truncated" in got.error and got.sha256 == sha256_file(p)


def test_an_oversized_frame_is_rejected_whatever_its_preview(tmp_path: Path) -> None:
    p = write(tmp_path / "a.jpg", camera_jpeg(scene()))
    got = prepare(p, "k", max_pixels=1_000_000, previews=True)
    assert got.array is None and "too large to decode safely" in got.error


def test_only_the_head_of_the_file_is_read(tmp_path: Path) -> None:
    p = write(tmp_path / "a.jpg", camera_jpeg(scene((3200, 2400))))
    size = p.stat().st_size
    assert size > 1_000_000

    def read_bytes() -> int:
        with open("/proc/self/io") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))

    prepare(p, "k", max_pixels=MAX, previews=True)  # once first: the imports it needs read files too
    before = read_bytes()
    got = prepare(p, "k", max_pixels=MAX, previews=True)
    head_only = read_bytes() - before
    before = read_bytes()
    prepare(p, "k", max_pixels=MAX, previews=False)
    whole = read_bytes() - before
    assert got.decoded_from == DECODED_PREVIEW
    assert head_only < previews.HEAD_BYTES + 8192 < size <= whole


def test_headers_longer_than_the_first_read_are_read_on(tmp_path: Path) -> None:
    """A big ICC profile puts the frame header past the first 64 KB: read on, up to previews.MAX_HEAD_BYTES."""
    img = scene()
    long_headers = write(tmp_path / "icc.jpg", camera_jpeg(img, icc_profile=bytes(200_000)))
    assert prepare(long_headers, "k", max_pixels=MAX, previews=True).decoded_from == DECODED_PREVIEW
    too_long = write(tmp_path / "huge.jpg", camera_jpeg(scene((3200, 2400)), icc_profile=bytes(1_200_000)))
    got = prepare(too_long, "k", max_pixels=MAX, previews=True)
    assert got.decoded_from == DECODED_FULL and got.error == ""


def test_a_read_ahead_from_the_preview_vouches_for_the_file(tmp_path: Path) -> None:
    p = write(tmp_path / "a.jpg", camera_jpeg(scene()))
    old = 1_400_000_000_000_000_000
    os.utime(p, ns=(old, old))
    # A read vouches only once the ctime is a clock tick old (batching.VOUCH_AGE_NS): poll for that.
    got = wait_until(lambda: (r := prepare(p, "k", max_pixels=MAX, previews=True, vouch=True)).signature and r,
                     timeout=10, interval=0.02, what="a read that vouches")
    st = os.lstat(p)
    assert got.decoded_from == DECODED_PREVIEW
    assert got.signature == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def test_small_files_and_other_formats_are_decoded_as_before(tmp_path: Path) -> None:
    small = write(tmp_path / "small.jpg", camera_jpeg(scene((320, 240))))
    png = tmp_path / "a.png"
    scene().save(png)
    for p in (small, png):
        got = prepare(p, "k", max_pixels=MAX, previews=True)
        assert got.decoded_from == DECODED_FULL and got.sha256 == sha256_file(p)


def test_the_decode_workers_report_the_source_and_survive_hostile_headers(tmp_path: Path) -> None:
    good = write(tmp_path / "good.jpg", camera_jpeg(scene()))
    data = bytearray(camera_jpeg(scene(seed=1)))
    data[20:40] = b"\xff" * 20  # a mangled EXIF block
    bad = write(tmp_path / "bad.jpg", bytes(data))
    with DecodePool(1, previews=True) as pool:
        a = pool.submit(good, "g", max_pixels=MAX).result(timeout=120)
        b = pool.submit(bad, "b", max_pixels=MAX).result(timeout=120)
    assert a.decoded_from == DECODED_PREVIEW and a.array is not None
    assert b.decoded_from in (DECODED_FULL, "") and (b.array is not None or b.error)


def test_pack_and_unpack_keep_the_source(tmp_path: Path) -> None:
    from bikewatch.decode.pool import pack, unpack

    p = prepare(write(tmp_path / "a.jpg", camera_jpeg(scene())), "a", max_pixels=MAX, previews=True)
    q = unpack(pack(p))
    assert p.decoded_from == q.decoded_from == DECODED_PREVIEW
    assert q.array is not None and p.array is not None and np.array_equal(q.array, p.array)


def test_same_shape_allows_rounding_only() -> None:
    assert previews.same_shape((160, 120), (4000, 3000))
    assert previews.same_shape((160, 120), (4032, 3024))
    assert previews.same_shape((160, 107), (6000, 4000))  # 3:2 rounded to a pixel
    assert previews.same_shape((120, 160), (3000, 4000))
    assert not previews.same_shape((160, 120), (3000, 4000))
    assert not previews.same_shape((160, 120), (3000, 3000))
    assert not previews.same_shape((160, 120), (4000, 2250))
    assert not previews.same_shape((160, 120), (4000, 2850))  # 5 % cropped off the height
    assert not previews.same_shape((0, 120), (4000, 3000))


# --------------------------------------------------------------------------- labels, with the real model


@pytest.mark.needs_shared
def test_preview_and_full_image_give_the_same_label(tmp_path: Path, shared_test_photos, default_classifier) -> None:
    quick, full, names = [], [], []
    for i, (src, _) in enumerate(shared_test_photos):
        with Image.open(src) as im:
            seen = im.convert("RGB").resize(SIZE, Image.Resampling.BICUBIC)
        for orientation in (1, 6):
            p = write(tmp_path / f"{i}-{orientation}.jpg",
                      camera_jpeg(as_stored(seen, orientation), orientation=orientation, quality=92))
            got = prepare(p, p.name, max_pixels=MAX, previews=True)
            assert got.decoded_from == DECODED_PREVIEW, p.name
            quick.append(got.array)
            full.append(full_array(p))
            names.append(p.name)
    a = default_classifier.predict(np.stack(quick)).argmax(axis=1)
    b = default_classifier.predict(np.stack(full)).argmax(axis=1)
    assert list(a) == list(b), [n for n, x, y in zip(names, a, b) if x != y]


# --------------------------------------------------------------------------- the CSV and recovery


def test_a_new_csv_has_decoded_from_and_an_old_one_keeps_its_columns(tmp_path: Path) -> None:
    row = Row("t", "s", "d", "road", "0.9", "0.1", "0.9", "", "m", "", "5", "id1", "w", decoded_from="preview")
    new = Ledger(tmp_path / "new.csv")
    new.append([row])
    assert list(read_rows(new.path)) == [dict(zip(COLUMNS, row.values()))]
    old_columns = COLUMNS[:-1]
    old = tmp_path / "old.csv"
    old.write_bytes((",".join(old_columns) + "\r\n" + ",".join("x" * len(old_columns)) + "\r\n").encode())
    ledger = Ledger(old)
    ledger.append([row])
    ledger.append([replace(row, id="id2")])
    with open(old, newline="") as fh:
        lines = list(csv.reader(fh))
    assert all(len(line) == len(old_columns) for line in lines)  # pandas and spreadsheets read it as before
    assert [r["id"] for r in read_rows(old)] == ["x", "id1", "id2"]
    assert ledger.ids() == {"x", "id1", "id2"}


def test_recovery_knows_a_finished_copy_of_a_photo_that_has_no_sha256(tmp_path: Path) -> None:
    """A crash after a cross-filesystem copy, before the unlink: no duplicate, though the row has no digest."""
    inbox, output = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    (output / "road").mkdir(parents=True)
    work = WorkArea(inbox / ".bikewatch", "t")
    try:
        ledger = Ledger(output / "classifications.csv")
        for name, copy_is_ours in (("a.jpg", True), ("b.jpg", False)):
            f = work.dir / f"k-{name}"
            f.write_bytes(camera_jpeg(scene((400, 300))))
            st = os.lstat(f)
            item = Item(key=f.name, source=name, label="road", p_mountain=0.1, p_road=0.9, sha256="",
                        size=st.st_size, mtime_ns=st.st_mtime_ns, timestamp="2024-01-01T00:00:00+00:00",
                        dest=f"road/{name}", decoded_from=DECODED_PREVIEW)
            dest = output / "road" / name
            shutil.copy2(f, dest)
            if not copy_is_ours:  # same size and time, other bytes: someone else's photo
                data = bytearray(dest.read_bytes())
                data[-3] ^= 0xFF
                dest.write_bytes(bytes(data))
                os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
            path = work.journal_path(f"b-{name}")
            write_journal(path, Journal(batch=f"b-{name}", phase=PHASE_DECIDED, worker="t", model="m", items=(item,)))
            finish_batch(path, work.dir, inbox=inbox, output=output, ledger=ledger, digest=sha256_file)
            assert not f.exists()
        assert sorted(os.listdir(output / "road")) == ["a.jpg", "b (1).jpg", "b.jpg"]
        rows = list(read_rows(ledger.path))
        assert [r["decoded_from"] for r in rows] == ["preview", "preview"] and all(r["sha256"] == "" for r in rows)
    finally:
        work.close()


# --------------------------------------------------------------------------- HEIC, and the service end to end


def heic(path: Path, image: Image.Image, thumbnails: list[int]) -> Path:
    pytest.importorskip("pillow_heif")  # a dependency: present wherever bikewatch is installed
    image.save(path, "HEIF", quality=80, thumbnails=thumbnails)
    return path


@pytest.mark.parametrize("thumbnails", [[], [160]], ids=["plain", "with thumbnail"])
def test_heic_photos_are_read(tmp_path: Path, thumbnails: list[int]) -> None:
    img = scene((640, 480))
    p = heic(tmp_path / "IMG_0001.HEIC", img, thumbnails)
    got = prepare(p, "k", max_pixels=MAX, previews=True)
    assert got.error == "" and got.array is not None and got.sha256 == sha256_file(p)
    want = np.asarray(img.resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32)
    assert np.abs(got.array - want).mean() < 16  # the same picture (HEVC at quality 80, or its thumbnail)


@pytest.mark.slow
@pytest.mark.parametrize("on", [True, False], ids=["previews on", "previews off"])
def test_the_service_says_which_source_each_row_came_from(tmp_path: Path, on: bool) -> None:
    from harness import Daemon, files_under

    staging = tmp_path / "staging"
    staging.mkdir()
    img = scene()
    write(staging / "camera.jpg", camera_jpeg(img))
    write(staging / "turned.jpg", camera_jpeg(as_stored(img, 6), orientation=6))
    write(staging / "cropped.jpg", camera_jpeg(img.crop((0, 0, 1200, 1200)), preview=preview_image(img)))
    heic(staging / "phone.heic", scene((640, 480), seed=2), [160])
    cut = camera_jpeg(scene(seed=3))
    write(staging / "cut.jpg", cut[: len(cut) // 2])
    d = Daemon(tmp_path, settings={"previews": on, "closed_settle_seconds": 0.05}).start()
    try:
        for f in sorted(staging.iterdir()):
            os.rename(f, d.inbox / f.name)
        wait_until(lambda: len(d.rows()) == 5, timeout=120, what="five CSV rows")
    finally:
        assert d.terminate() == 0
    rows = {Path(r["source"]).name: r for r in d.rows()}
    got = {name: (r["label"] == "rejected", r["decoded_from"], bool(r["sha256"])) for name, r in rows.items()}
    quick = "preview" if on else "full"
    assert got == {
        "camera.jpg": (False, quick, not on), "turned.jpg": (False, quick, not on),
        "cropped.jpg": (False, "full", True), "phone.heic": (False, "full", True), "cut.jpg": (True, "", True),
    }
    assert "truncated" in rows["cut.jpg"]["error"]
    assert sorted(p.name for p in files_under(d.output) if p.suffix != ".csv") == sorted(rows)



def test_the_previews_setting_is_a_documented_boolean() -> None:
    from bikewatch.config import ConfigError, Settings, coerce

    assert Settings().previews is True
    assert coerce("previews", "off", "BIKEWATCH_PREVIEWS") is False
    assert coerce("previews", True, "config") is True
    with pytest.raises(ConfigError, match="previews"):
        coerce("previews", "sometimes", "config")
    toml = (Path(__file__).resolve().parent.parent / "config" / "bikewatch.toml").read_text()
    assert "\npreviews = true\n" in toml
