"""Embedded previews: classify a camera JPEG from the small JPEG its EXIF block carries.

Why: a 12-megapixel JPEG takes about 21 ms to decode even at 1/8 DCT scale, while the
160x120 preview that cameras and phones embed (DCF: a JPEG in EXIF's IFD1, tags 0x0201
offset and 0x0202 length, relative to the TIFF header) decodes and resizes to 64x64 in
well under a millisecond, and lies in the first few kilobytes of the file. The model
sees 64x64 pixels either way.

When: only when the preview can be trusted (:func:`check`): it is there, it is a JPEG at
least :data:`MIN_SIDE` pixels on its short side, and it has the main image's shape (the
frame size in the JPEG's SOF header) within :data:`TOLERANCE`. An editor that rotates or
crops the photo and keeps the camera's old preview leaves a stale one of the wrong
shape, which is refused. The same EXIF orientation applies to both, so the shapes are
compared as stored; the caller applies the orientation to the preview.

Everything here is pure: bytes in, a verdict out. Reading the file is the caller's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from PIL import ExifTags, Image

HEAD_BYTES = 64 * 1024
"""The first read. DCF keeps the whole EXIF block, preview included, in one APP1 segment (at most 64 KiB)."""

MAX_HEAD_BYTES = 1024 * 1024
"""Headers (ICC profiles, XMP, maker notes) reaching past this mean a full decode instead."""

MIN_SIDE = 64
"""A preview smaller than the model's input on either side is not used."""

TOLERANCE = 0.02
"""How far the preview's aspect ratio may differ from the main image's (plus a pixel of rounding)."""

_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length


@dataclass(frozen=True)
class Header:
    """What the head of a JPEG says: its frame size and its EXIF block (TIFF bytes), if any."""

    frame: tuple[int, int] | None  # (width, height) from the SOF segment
    exif: bytes | None  # from the TIFF header on; the preview's offset is relative to it


class NeedMore(Exception):
    """The headers go on past the bytes given; ``upto`` is how many bytes are needed at least."""

    def __init__(self, upto: int) -> None:
        super().__init__(upto)
        self.upto = upto


def is_jpeg(head: bytes) -> bool:
    return head[:3] == b"\xff\xd8\xff"


def read_header(head: bytes) -> Header:
    """Walk the JPEG's marker segments up to the frame header; :class:`NeedMore` when ``head`` ends first.

    Only segment lengths are trusted, never offsets: a hostile length just ends the walk.
    """
    if not is_jpeg(head):
        return Header(None, None)
    pos, exif = 2, None
    while True:
        if pos + 4 > len(head):
            raise NeedMore(pos + 4)
        if head[pos] != 0xFF:
            return Header(None, exif)  # not a marker where one must be: leave it to the decoder
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # SOI again, EOI or scan data before any frame header
            return Header(None, exif)
        length = int.from_bytes(head[pos + 2:pos + 4], "big")
        if length < 2:
            return Header(None, exif)
        end = pos + 2 + length
        if marker == 0xE1 and exif is None:
            if end > len(head):
                raise NeedMore(end)
            body = head[pos + 4:end]
            if body.startswith(b"Exif\x00\x00"):
                exif = body[6:]
        elif marker in _SOF:
            if pos + 9 > len(head):
                raise NeedMore(pos + 9)
            height = int.from_bytes(head[pos + 5:pos + 7], "big")
            width = int.from_bytes(head[pos + 7:pos + 9], "big")
            return Header((width, height), exif)
        pos = end


@dataclass(frozen=True)
class Preview:
    """A preview fit to classify from: its JPEG bytes and the orientation to apply to it."""

    data: bytes
    orientation: int  # EXIF orientation of the main image, 1..8


def embedded(exif: bytes) -> tuple[bytes, int] | str:
    """The IFD1 preview's bytes and IFD0's orientation, or why there is none."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data": the reason below says it
            info = Image.Exif()
            info.load(exif)
            orientation = info.get(ExifTags.Base.Orientation, 1)
            ifd1 = info.get_ifd(ExifTags.IFD.IFD1)
    except Exception as exc:  # noqa: BLE001 - any malformed EXIF: no preview, decode the image
        return f"unreadable EXIF ({type(exc).__name__})"
    offset = ifd1.get(ExifTags.Base.JpegIFOffset)
    length = ifd1.get(ExifTags.Base.JpegIFByteCount)
    if not isinstance(offset, int) or not isinstance(length, int) or length <= 0:
        return "no preview in EXIF"
    if offset <= 0 or offset + length > len(exif):
        return "preview outside the EXIF block"
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        orientation = 1  # as ImageOps.exif_transpose: an unknown value changes nothing
    return exif[offset:offset + length], orientation


def same_shape(preview: tuple[int, int], frame: tuple[int, int], tolerance: float = TOLERANCE) -> bool:
    """Is ``preview`` (w, h) the main ``frame`` scaled down, to a pixel of rounding and ``tolerance``? Pure."""
    pw, ph = preview
    fw, fh = frame
    if min(pw, ph, fw, fh) <= 0:
        return False
    want_w = ph * fw / fh  # the width a faithful preview of this height has
    want_h = pw * fh / fw
    return abs(pw - want_w) <= 1 + tolerance * pw and abs(ph - want_h) <= 1 + tolerance * ph


def check(header: Header, *, max_pixels: int) -> Preview | str:
    """The trustworthy preview of a JPEG whose head gave ``header``, or why not (a short reason). Pure."""
    if header.frame is None:
        return "no JPEG frame header"
    fw, fh = header.frame
    if fw * fh > max_pixels or fw < 1 or fh < 1:
        return "frame size out of bounds"  # the full decode path says why, as it always has
    if header.exif is None:
        return "no EXIF block"
    got = embedded(header.exif)
    if isinstance(got, str):
        return got
    data, orientation = got
    try:
        size = read_header(data).frame
    except NeedMore:
        return "preview cut short"
    if size is None:
        return "preview is not a JPEG"
    if min(size) < MIN_SIDE:
        return f"preview too small ({size[0]}x{size[1]})"
    if not same_shape(size, header.frame):
        return f"preview {size[0]}x{size[1]} has not the shape of the image ({fw}x{fh}): stale"
    return Preview(data, orientation)


def preview_of(head: bytes, *, max_pixels: int) -> Preview | str:
    """:func:`check` on the bytes of a file's head; :class:`NeedMore` when its headers go on. Pure."""
    return check(read_header(head), max_pixels=max_pixels)

