"""Real image files for tests, written with Pillow (or by hand for broken ones).

Every function takes the destination path first, writes one file there, and
returns that path as a :class:`~pathlib.Path`, so daemon tests can drop the
same files into a watched inbox.  Colours are RGB tuples; images are solid
colours, halves or gradients so that tests can say where a colour must end up.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

RED = (220, 20, 20)
GREEN = (20, 200, 40)
BLUE = (20, 40, 220)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

Color = tuple[int, int, int]
PathLike = str | os.PathLike[str]


def _target(path: PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


# --------------------------------------------------------------------------- pictures


def solid(size: tuple[int, int] = (320, 200), color: Color = RED, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, color)


def halves(size: tuple[int, int] = (200, 100), left: Color = RED, right: Color = BLUE) -> Image.Image:
    """Left half ``left``, right half ``right``: makes orientation visible."""
    w, h = size
    im = Image.new("RGB", size, right)
    im.paste(left, (0, 0, w // 2, h))
    return im


def gradient(size: tuple[int, int] = (1000, 600)) -> Image.Image:
    """A smooth colour gradient with some mid-frequency stripes; resizing it is not trivial."""
    w, h = size
    x = np.linspace(0.0, 1.0, w)[None, :]
    y = np.linspace(0.0, 1.0, h)[:, None]
    r = 255 * x * np.ones_like(y)
    g = 255 * y * np.ones_like(x)
    b = 127.5 + 100 * np.sin(2 * np.pi * 6 * x) * np.cos(2 * np.pi * 4 * y)
    arr = np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


# --------------------------------------------------------------------------- good files


def save(path: PathLike, image: Image.Image, fmt: str | None = None, **params: object) -> Path:
    """Write any Pillow image (format from the extension unless ``fmt``)."""
    p = _target(path)
    image.save(p, format=fmt, **params)
    return p


def jpeg(
    path: PathLike,
    size: tuple[int, int] = (320, 200),
    color: Color = RED,
    quality: int = 90,
    progressive: bool = False,
    exif_orientation: int | None = None,
    image: Image.Image | None = None,
) -> Path:
    """A baseline (or progressive) JPEG; ``exif_orientation`` 1..8 adds an EXIF Orientation tag."""
    im = image if image is not None else solid(size, color)
    params: dict[str, object] = {"quality": quality, "progressive": progressive}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation  # Orientation
        params["exif"] = exif.tobytes()
    return save(path, im.convert("RGB") if im.mode != "RGB" else im, "JPEG", **params)


def mpo(path: PathLike, size: tuple[int, int] = (320, 200), colors: Sequence[Color] = (RED, BLUE),
        image: Image.Image | None = None) -> Path:
    """A JPEG with an MPF block and several pictures (Pillow calls it MPO), as many phones and
    stereo cameras write them; the first picture is ``image`` or ``colors[0]``."""
    first = image if image is not None else solid(size, colors[0])
    rest = [solid(first.size, c) for c in colors[1:]]
    return save(path, first, "MPO", save_all=True, append_images=rest, quality=92)


def cmyk_jpeg(path: PathLike, size: tuple[int, int] = (320, 200), color: Color = RED) -> Path:
    """A CMYK JPEG (as print workflows and some scanners write them)."""
    return save(path, solid(size, color).convert("CMYK"), "JPEG", quality=95)


def png(path: PathLike, mode: str = "RGB", size: tuple[int, int] = (320, 200), color: Color = RED,
        alpha: int = 255) -> Path:
    """A PNG in mode RGB, RGBA, L or LA; ``alpha`` is used by the modes that have one."""
    base = solid(size, color)
    if mode == "RGB":
        im = base
    elif mode == "RGBA":
        im = base.convert("RGBA")
        im.putalpha(alpha)
    elif mode == "L":
        im = base.convert("L")
    elif mode == "LA":
        im = base.convert("LA")
        im.putalpha(alpha)
    else:
        raise ValueError(f"png() does not make mode {mode}; see palette_png, png16, one_bit_png")
    return save(path, im, "PNG")


def palette_png(path: PathLike, size: tuple[int, int] = (320, 200), color: Color = RED,
                transparent: bool = False) -> Path:
    """A mode-P PNG filled with ``color``; with ``transparent`` that palette entry is the tRNS one,
    so the whole image is fully transparent."""
    im = Image.new("P", size, 0)
    im.putpalette(list(color) + [0, 0, 0] * 255)
    params: dict[str, object] = {"transparency": 0} if transparent else {}
    return save(path, im, "PNG", **params)


def png16(path: PathLike, size: tuple[int, int] = (320, 200), value: int = 32768) -> Path:
    """A 16-bit greyscale PNG ('I;16'); 32768 is mid-grey."""
    im = Image.new("I;16", size, value)
    return save(path, im, "PNG")


def one_bit_png(path: PathLike, size: tuple[int, int] = (320, 200)) -> Path:
    """A 1-bit PNG: left half black, right half white."""
    w, h = size
    im = Image.new("1", size, 1)
    im.paste(0, (0, 0, w // 2, h))
    return save(path, im, "PNG")


def webp(path: PathLike, size: tuple[int, int] = (320, 200), color: Color = RED) -> Path:
    return save(path, solid(size, color), "WEBP", lossless=True)


def bmp(path: PathLike, size: tuple[int, int] = (320, 200), color: Color = RED) -> Path:
    return save(path, solid(size, color), "BMP")


def tiff(path: PathLike, size: tuple[int, int] = (320, 200), color: Color = RED) -> Path:
    return save(path, solid(size, color), "TIFF")


def gif(path: PathLike, size: tuple[int, int] = (320, 200), color: Color = RED) -> Path:
    """A static GIF."""
    return save(path, solid(size, color).convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "GIF")


def animated_gif(path: PathLike, colors: Sequence[Color] = (RED, BLUE, GREEN),
                 size: tuple[int, int] = (320, 200)) -> Path:
    """An animated GIF, one solid frame per colour; the first frame is ``colors[0]``."""
    frames = [solid(size, c).convert("P", palette=Image.Palette.ADAPTIVE, colors=4) for c in colors]
    return save(path, frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def one_pixel(path: PathLike, color: Color = RED) -> Path:
    """A 1x1 PNG."""
    return save(path, solid((1, 1), color), "PNG")


def panorama(path: PathLike, size: tuple[int, int] = (4000, 300), color: Color = RED) -> Path:
    """A very wide JPEG."""
    return jpeg(path, size=size, color=color, quality=90)


# --------------------------------------------------------------------------- broken files


def empty(path: PathLike) -> Path:
    p = _target(path)
    p.write_bytes(b"")
    return p


def truncated_jpeg(path: PathLike, size: tuple[int, int] = (320, 200)) -> Path:
    """The first half of a real (noisy, so non-trivial) JPEG."""
    rng = np.random.default_rng(7)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    p = _target(path)
    p.write_bytes(data[: len(data) // 2])
    return p


def html_as_jpg(path: PathLike) -> Path:
    """An HTML error page saved under an image name (what a failed download leaves)."""
    p = _target(path)
    p.write_text("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
                 "<body><h1>Not Found</h1></body></html>\n")
    return p


def random_bytes(path: PathLike, n: int = 4096, seed: int = 3) -> Path:
    p = _target(path)
    p.write_bytes(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())
    return p


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(path: PathLike, width: int = 40000, height: int = 40000) -> Path:
    """A valid PNG header claiming ``width`` x ``height`` RGB pixels, a few hundred bytes on disk.

    The IDAT holds one compressed row only; a decoder that trusted the header
    would allocate width*height*3 bytes before noticing.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = zlib.compress(b"\x00" + b"\x00" * (3 * width), 9)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    p = _target(path)
    p.write_bytes(data)
    return p


GOOD_KINDS = {
    "baseline.jpg": lambda p: jpeg(p),
    "progressive.jpg": lambda p: jpeg(p, progressive=True),
    "cmyk.jpg": cmyk_jpeg,
    "camera-mpo.jpg": mpo,
    "rgb.png": lambda p: png(p, "RGB"),
    "rgba.png": lambda p: png(p, "RGBA", alpha=128),
    "grey.png": lambda p: png(p, "L"),
    "grey-alpha.png": lambda p: png(p, "LA", alpha=128),
    "palette.png": palette_png,
    "palette-transparent.png": lambda p: palette_png(p, transparent=True),
    "sixteen.png": png16,
    "onebit.png": one_bit_png,
    "image.webp": webp,
    "image.bmp": bmp,
    "image.tiff": tiff,
    "static.gif": gif,
    "animated.gif": animated_gif,
    "pixel.png": one_pixel,
    "panorama.jpg": panorama,
}
"""File name -> writer for every decodable kind; each writer takes the full path."""

BROKEN_KINDS = {
    "empty.jpg": empty,
    "truncated.jpg": truncated_jpeg,
    "page.jpg": html_as_jpg,
    "noise.jpg": random_bytes,
    "bomb.png": bomb_png,
}
"""File name -> writer for every kind the preprocessor must refuse."""


def write_all(folder: PathLike, kinds: dict | None = None) -> list[Path]:
    """Write every kind in ``kinds`` (default: good and broken) into ``folder``."""
    folder = Path(folder)
    kinds = kinds if kinds is not None else {**GOOD_KINDS, **BROKEN_KINDS}
    return [make(folder / name) for name, make in kinds.items()]
