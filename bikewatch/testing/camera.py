"""Camera-like JPEGs made with Pillow: the full image with its downscaled preview embedded as DCF does.

For the benchmark (``./dev bench --camera``) and the tests: Pillow writes an EXIF
block but not IFD1's preview, so the TIFF structure is built here by hand, little-endian,
as cameras write it: IFD0 (orientation), then IFD1 (JPEG compression, the preview's
offset and length, tags 0x0103, 0x0201, 0x0202), then the preview's bytes, all in APP1.
"""

from __future__ import annotations

import io
import struct

from PIL import Image

PREVIEW_LONG_SIDE = 160
"""DCF's thumbnail is 160x120 for a 4:3 photo."""

_INVERSE = {  # stored pixels for a scene seen upright, under each EXIF orientation
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # exif_transpose turns it back with ROTATE_270
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def as_stored(scene: Image.Image, orientation: int) -> Image.Image:
    """The pixels a camera stores for ``scene`` (as seen) when it tags them with ``orientation``."""
    method = _INVERSE.get(orientation)
    return scene.transpose(method) if method is not None else scene


def preview_image(stored: Image.Image, long_side: int = PREVIEW_LONG_SIDE) -> Image.Image:
    """The camera's preview of its stored pixels: the whole frame, scaled down."""
    w, h = stored.size
    scale = long_side / max(w, h)
    return stored.convert("RGB").resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)


def jpeg_bytes(image: Image.Image, quality: int = 90, **params: object) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality, **params)
    return buf.getvalue()


def exif_with_preview(preview: bytes | None, orientation: int = 1) -> bytes:
    """An APP1 EXIF payload ("Exif\\0\\0" + TIFF) with IFD0's orientation and, when given, IFD1's preview."""

    def ifd(entries: list[tuple[int, int, int]], next_offset: int) -> bytes:
        out = struct.pack("<H", len(entries))
        for tag, kind, value in sorted(entries):
            packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
            out += struct.pack("<HHI", tag, kind, 1) + packed
        return out + struct.pack("<I", next_offset)

    ifd0_size = 2 + 12 + 4
    ifd1_at = 8 + ifd0_size
    if preview is None:
        tiff = b"II*\x00" + struct.pack("<I", 8) + ifd([(0x0112, 3, orientation)], 0)
    else:
        ifd1_size = 2 + 3 * 12 + 4
        data_at = ifd1_at + ifd1_size
        tiff = (b"II*\x00" + struct.pack("<I", 8) + ifd([(0x0112, 3, orientation)], ifd1_at)
                + ifd([(0x0103, 3, 6), (0x0201, 4, data_at), (0x0202, 4, len(preview))], 0) + preview)
    return b"Exif\x00\x00" + tiff


def camera_jpeg(stored: Image.Image, *, orientation: int = 1, preview: bytes | Image.Image | None = None,
                quality: int = 90, preview_quality: int = 85, **params: object) -> bytes:
    """``stored`` as a JPEG carrying ``preview`` in IFD1 (default: made from ``stored``) and ``orientation``.

    ``params`` go to Pillow's JPEG writer (``icc_profile=...``, for instance).
    """
    if preview is None:
        preview = preview_image(stored)
    if isinstance(preview, Image.Image):
        preview = jpeg_bytes(preview, preview_quality)
    return jpeg_bytes(stored, quality, exif=exif_with_preview(preview, orientation), **params)
