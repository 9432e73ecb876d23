"""bikewatch.decode.preprocess on real files of every kind the factory makes (no TensorFlow here)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imagefactory as f
from bikewatch.decode.preprocess import (
    DEFAULT_MAX_PIXELS,
    SIZE,
    PreprocessError,
    is_image_name,
    preprocess_bytes,
    preprocess_file,
)


def mean_rgb(arr: np.ndarray) -> np.ndarray:
    return arr.reshape(-1, 3).mean(axis=0)


def assert_model_input(arr: np.ndarray) -> None:
    assert arr.shape == (SIZE, SIZE, 3)
    assert arr.dtype == np.float32
    assert arr.min() >= 0.0 and arr.max() <= 255.0
    assert np.isfinite(arr).all()


# --------------------------------------------------------------------------- every decodable kind


@pytest.mark.parametrize("name", sorted(f.GOOD_KINDS))
def test_every_good_kind_becomes_a_64x64_rgb_float32_array(tmp_path: Path, name: str) -> None:
    path = f.GOOD_KINDS[name](tmp_path / name)
    assert_model_input(preprocess_file(path))


@pytest.mark.parametrize(
    "name",
    ["baseline.jpg", "progressive.jpg", "camera-mpo.jpg", "rgb.png", "palette.png", "image.webp", "image.bmp", "image.tiff",
     "static.gif", "pixel.png", "panorama.jpg"],
)
def test_solid_red_stays_red_in_every_colour_format(tmp_path: Path, name: str) -> None:
    arr = preprocess_file(f.GOOD_KINDS[name](tmp_path / name))
    assert np.allclose(mean_rgb(arr), f.RED, atol=4), mean_rgb(arr)
    assert np.ptp(arr, axis=(0, 1)).max() <= 8  # solid in, solid out


def test_preprocess_bytes_and_file_agree(tmp_path: Path) -> None:
    path = f.jpeg(tmp_path / "a.jpg", image=f.gradient((300, 200)))
    assert np.array_equal(preprocess_bytes(path.read_bytes()), preprocess_file(path))


def test_greyscale_gives_equal_channels(tmp_path: Path) -> None:
    arr = preprocess_file(f.png(tmp_path / "g.png", "L", color=f.RED))
    expected_grey = Image.new("RGB", (1, 1), f.RED).convert("L").getpixel((0, 0))
    assert np.allclose(arr, expected_grey, atol=1)


def test_one_bit_image_keeps_black_left_and_white_right(tmp_path: Path) -> None:
    arr = preprocess_file(f.one_bit_png(tmp_path / "b.png"))
    assert arr[:, :24].max() <= 1.0
    assert arr[:, 40:].min() >= 254.0


def test_cmyk_jpeg_gives_sensible_rgb(tmp_path: Path) -> None:
    red = mean_rgb(preprocess_file(f.cmyk_jpeg(tmp_path / "red.jpg", color=f.RED)))
    blue = mean_rgb(preprocess_file(f.cmyk_jpeg(tmp_path / "blue.jpg", color=f.BLUE)))
    assert np.allclose(red, f.RED, atol=12), red
    assert np.allclose(blue, f.BLUE, atol=12), blue


def test_sixteen_bit_mid_grey_is_mid_grey_not_white(tmp_path: Path) -> None:
    path = f.png16(tmp_path / "g16.png", value=32768)
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file
    arr = preprocess_file(path)
    assert np.allclose(arr, 128, atol=1.5), mean_rgb(arr)


def test_sixteen_bit_full_scale_is_white(tmp_path: Path) -> None:
    arr = preprocess_file(f.png16(tmp_path / "w16.png", value=65535))
    assert arr.min() >= 254.0


def test_panorama_is_squashed_whole_not_cropped(tmp_path: Path) -> None:
    # 4000x300: the left quarter is blue, the rest red. A centre crop would lose the blue.
    im = f.solid((4000, 300), f.RED)
    im.paste(f.BLUE, (0, 0, 1000, 300))
    arr = preprocess_file(f.jpeg(tmp_path / "pano.jpg", image=im, quality=95))
    assert np.allclose(mean_rgb(arr[:, :14]), f.BLUE, atol=10)
    assert np.allclose(mean_rgb(arr[:, 18:]), f.RED, atol=10)


def test_one_pixel_image_fills_the_frame(tmp_path: Path) -> None:
    arr = preprocess_file(f.one_pixel(tmp_path / "p.png", color=f.GREEN))
    assert np.array_equal(arr, np.broadcast_to(np.float32(f.GREEN), (SIZE, SIZE, 3)))


# --------------------------------------------------------------------------- transparency


@pytest.mark.parametrize(
    "make",
    [
        lambda p: f.png(p, "RGBA", color=f.BLACK, alpha=0),
        lambda p: f.png(p, "LA", color=f.BLACK, alpha=0),
        lambda p: f.palette_png(p, color=f.BLACK, transparent=True),
    ],
    ids=["RGBA", "LA", "P-tRNS"],
)
def test_fully_transparent_images_come_out_white(tmp_path: Path, make) -> None:
    arr = preprocess_file(make(tmp_path / "clear.png"))
    assert arr.min() >= 254.0, mean_rgb(arr)


def test_half_transparent_red_is_blended_with_white(tmp_path: Path) -> None:
    arr = preprocess_file(f.png(tmp_path / "half.png", "RGBA", color=f.RED, alpha=128))
    expected = [c + (255 - c) * (127 / 255) for c in f.RED]
    assert np.allclose(mean_rgb(arr), expected, atol=2), mean_rgb(arr)


def test_palette_without_transparency_keeps_its_colour(tmp_path: Path) -> None:
    arr = preprocess_file(f.palette_png(tmp_path / "p.png", color=f.BLACK, transparent=False))
    assert arr.max() <= 1.0


def test_opaque_rgba_is_unchanged(tmp_path: Path) -> None:
    arr = preprocess_file(f.png(tmp_path / "o.png", "RGBA", color=f.BLUE, alpha=255))
    assert np.allclose(mean_rgb(arr), f.BLUE, atol=1)


# --------------------------------------------------------------------------- orientation and frames


def _red_fraction(arr: np.ndarray) -> np.ndarray:
    """Boolean map of pixels that are clearly red."""
    return (arr[..., 0] > 150) & (arr[..., 2] < 100)


@pytest.mark.parametrize(
    ("orientation", "red_where"),
    [(None, "left"), (1, "left"), (3, "right"), (6, "top"), (8, "bottom")],
)
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int | None, red_where: str) -> None:
    # 200x100, left half red, right half blue, stored as-is with an EXIF Orientation tag.
    path = f.jpeg(tmp_path / "o.jpg", image=f.halves((200, 100), f.RED, f.BLUE), quality=95,
                  exif_orientation=orientation)
    red = _red_fraction(preprocess_file(path))
    regions = {
        "left": (slice(None), slice(0, 28)),
        "right": (slice(None), slice(36, None)),
        "top": (slice(0, 28), slice(None)),
        "bottom": (slice(36, None), slice(None)),
    }
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
    assert red[regions[red_where]].mean() > 0.95
    assert red[regions[opposite[red_where]]].mean() < 0.05


def test_exif_orientation_on_png_is_applied_too(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = f.save(tmp_path / "o.png", f.halves((200, 100), f.RED, f.BLUE), "PNG", exif=exif.tobytes())
    red = _red_fraction(preprocess_file(path))
    assert red[:28].mean() > 0.95 and red[36:].mean() < 0.05


def test_animated_gif_uses_the_first_frame(tmp_path: Path) -> None:
    for first, rest in [(f.RED, (f.BLUE, f.GREEN)), (f.BLUE, (f.RED, f.GREEN))]:
        path = f.animated_gif(tmp_path / "anim.gif", colors=(first, *rest))
        assert Image.open(path).n_frames == 3
        arr = preprocess_file(path)
        assert np.allclose(mean_rgb(arr), first, atol=4), (first, mean_rgb(arr))


# --------------------------------------------------------------------------- JPEG draft decoding


@pytest.mark.parametrize("kind", ["JPEG", "MPO"])
def test_jpeg_draft_decoding_matches_a_full_decode(tmp_path: Path, kind: str) -> None:
    if kind == "JPEG":
        path = f.jpeg(tmp_path / "big.jpg", image=f.gradient((1000, 600)), quality=92)
    else:
        path = f.mpo(tmp_path / "big.jpg", image=f.gradient((1000, 600)))
    with Image.open(path) as im:
        assert im.format == kind
    got = preprocess_file(path)

    with Image.open(path) as full:
        full.load()
        assert full.size == (1000, 600)
        reference = np.asarray(full.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
    with Image.open(path) as reduced:
        reduced.draft("RGB", (SIZE, SIZE))
        reduced.load()
        assert reduced.size == (125, 75)  # DCT scaling 1/8, still >= 64 on each side
        drafted = np.asarray(reduced.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float32)

    # The preprocessor takes the reduced-decoding path ...
    assert np.array_equal(got, drafted)
    assert not np.array_equal(drafted, reference)
    # ... and that changes the model input only marginally.
    diff = np.abs(got - reference)
    assert diff.mean() < 1.5, diff.mean()
    assert diff.max() < 16, diff.max()


# --------------------------------------------------------------------------- broken files


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("empty.jpg", ["empty"]),
        ("truncated.jpg", ["truncated"]),
        ("page.jpg", ["not an image"]),
        ("noise.jpg", ["not an image"]),
        ("bomb.png", ["too large", "1600000000"]),
    ],
)
def test_broken_files_raise_preprocess_error_with_a_readable_reason(tmp_path: Path, name: str,
                                                                   words: list[str]) -> None:
    path = f.BROKEN_KINDS[name](tmp_path / name)
    with pytest.raises(PreprocessError) as info:
        preprocess_file(path)
    reason = info.value.reason
    assert reason == str(info.value)
    assert "\n" not in reason and len(reason) < 300
    for word in words:
        assert word in reason, reason


def test_bomb_file_is_tiny_but_claims_forty_thousand_square(tmp_path: Path) -> None:
    data = f.bomb_png(tmp_path / "bomb.png").read_bytes()
    assert len(data) < 2048
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    ihdr = data[16:29]
    assert struct.unpack(">II", ihdr[:8]) == (40000, 40000)
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(b"IHDR" + ihdr)  # a valid chunk, not garbage


def test_image_over_our_limit_is_refused_from_its_header(tmp_path: Path) -> None:
    # 12000x9000 = 108 Mpx: over bikewatch's 100 Mpx limit but under Pillow's own error threshold,
    # so it is bikewatch's header check that refuses it. Its IDAT holds a single row, so any attempt
    # to decode it would fail as "truncated" instead.
    path = f.bomb_png(tmp_path / "big.png", 12000, 9000)
    with pytest.raises(PreprocessError) as info:
        preprocess_file(path)
    reason = info.value.reason
    assert "too large" in reason and "12000x9000" in reason and str(DEFAULT_MAX_PIXELS) in reason, reason


def test_max_pixels_is_configurable(tmp_path: Path) -> None:
    path = f.jpeg(tmp_path / "a.jpg", size=(320, 200))
    assert_model_input(preprocess_file(path, max_pixels=320 * 200))
    with pytest.raises(PreprocessError, match=r"too large.*320x200.*63999"):
        preprocess_file(path, max_pixels=320 * 200 - 1)


def test_missing_file_and_directory_are_preprocess_errors(tmp_path: Path) -> None:
    with pytest.raises(PreprocessError, match="cannot read file"):
        preprocess_file(tmp_path / "nope.jpg")
    with pytest.raises(PreprocessError, match="is a directory"):
        preprocess_file(tmp_path)


def test_empty_bytes_are_refused() -> None:
    with pytest.raises(PreprocessError, match="empty"):
        preprocess_bytes(b"")


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name", ["a.jpg", "A.JPG", "b.Jpeg", "c.PNG", "d.webp", "e.TIFF", "f.tif", "g.gif", "h.bmp", "i.HEIC",
             "dir/j.jpe", "k.avif"],
)
def test_is_image_name_accepts_photo_extensions_in_any_case(name: str) -> None:
    assert is_image_name(name)


@pytest.mark.parametrize(
    "name", ["notes.txt", "photo.jpg.part", "photo.jpg~", "README", "archive.zip", "jpg", ".jpg", "x.crdownload"],
)
def test_is_image_name_rejects_other_names(name: str) -> None:
    assert not is_image_name(name)
