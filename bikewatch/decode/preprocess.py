"""The one preprocessor: photo bytes in, a 64x64 RGB float32 array out.

Training, evaluation, ``classify`` and the daemon all call :func:`preprocess_bytes`
(or :func:`preprocess_file`), so the model never sees pixels prepared two ways.
The steps are: decode (at reduced size where the format allows), apply the EXIF
orientation, convert any mode to RGB (transparency composited on white), and
resize the whole frame to 64x64 like the seed notebook did (no crop).

The output is RGB in 0..255 as float32; a model's input contract (see
:mod:`bikewatch.inference.model`) turns that into what the model was trained on.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

try:  # Registers AVIF/HEIF when pillow-heif is installed; optional.
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - optional dependency
    pass

SIZE = 64
DEFAULT_MAX_PIXELS = 100_000_000
"""Refuse images that claim more pixels than this (a 100-megapixel camera still fits)."""

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff",
     ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".heic", ".heif", ".avif"}
)

_WHITE = (255, 255, 255)


class PreprocessError(Exception):
    """A file that cannot become a model input; ``reason`` is short and human-readable."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_image_name(name: str) -> bool:
    """True for names whose extension says 'photo' (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def preprocess_file(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read ``path`` and preprocess it; see :func:`preprocess_bytes`."""
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError as exc:
        raise PreprocessError("is a directory") from exc
    except OSError as exc:
        raise PreprocessError(f"cannot read file: {exc.strerror or exc}") from exc
    return preprocess_bytes(data, max_pixels=max_pixels)


def preprocess_bytes(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Turn encoded image bytes into a (64, 64, 3) float32 RGB array in 0..255.

    Raises :class:`PreprocessError` with a readable reason for anything that is
    empty, truncated, not an image, unsupported, or too large to decode safely.
    """
    if not data:
        raise PreprocessError("empty file")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is the policy; Pillow's warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise PreprocessError("not an image (unrecognised format)") from exc
    except Image.DecompressionBombError as exc:
        raise PreprocessError(f"too large to decode safely ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise PreprocessError(f"unreadable image header: {exc}") from exc
    with image:
        width, height = image.size
        # Checked on the header alone, before a single pixel is decoded.
        if width * height > max_pixels:
            raise PreprocessError(
                f"too large to decode safely: {width}x{height} pixels exceeds the limit of {max_pixels}"
            )
        if width < 1 or height < 1:
            raise PreprocessError(f"invalid image size {width}x{height}")
        try:
            return _to_array(image)
        except PreprocessError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError, Image.DecompressionBombError) as exc:
            raise PreprocessError(_describe_decode_error(exc)) from exc


def _describe_decode_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"truncated image: {text}"
    return f"cannot decode image: {text}"


def _to_array(image: Image.Image) -> np.ndarray:
    if image.format in ("JPEG", "MPO"):  # MPO: JPEGs with an MPF block (many phone photos)
        # DCT-domain downscaling: a 1000x600 JPEG decodes at 125x75, 1/64 of the work.
        # draft() keeps the result at least SIZE on each side, so quality is unchanged.
        image.draft("RGB" if image.mode not in ("L", "CMYK") else image.mode, (SIZE, SIZE))
    elif image.format == "HEIF":  # pillow-heif: its embedded thumbnail, when that is a scaled copy of the image
        image.draft(None, (SIZE, SIZE))
    image.seek(0)  # animated formats: the first frame
    image.load()
    oriented = ImageOps.exif_transpose(image) or image
    return to_input(to_rgb(oriented))


def to_input(rgb: Image.Image) -> np.ndarray:
    """The whole RGB frame resized to 64x64 (no crop), as float32 0..255: the one resize.

    Training's augmented views go through this too, so they are made exactly like real inputs.
    """
    resized = rgb.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


_MOMENT = (2 * np.arange(SIZE, dtype=np.int64) - (SIZE - 1))  # -63, -61, ..., 61, 63: odd, antisymmetric


def mirror_statistic(batch: np.ndarray) -> np.ndarray:
    """Per image, sum of pixel value x (2*column - 63), in exact integer arithmetic.

    For the mirror image m(x) the statistic is exactly -s(x), whatever the pixels, because
    the column weights are antisymmetric and integers add without rounding.
    """
    ints = np.rint(batch).astype(np.int64)
    return np.einsum("nhwc,w->n", ints, _MOMENT)


def canonical_orientation(batch: np.ndarray) -> np.ndarray:
    """Mirror each (64, 64, 3) image whose :func:`mirror_statistic` is negative (ties: the
    lexicographically smaller of the image and its mirror), so an image and its exact mirror
    give the same array, and so the same prediction, by construction."""
    batch = np.asarray(batch)
    if batch.ndim != 4 or len(batch) == 0:
        return batch
    s = mirror_statistic(batch)
    flip = s < 0
    for i in np.flatnonzero(s == 0):  # symmetric moment: compare the images themselves
        a, b = batch[i].ravel(), batch[i][:, ::-1].ravel()
        diff = np.flatnonzero(a != b)
        flip[i] = bool(len(diff)) and a[diff[0]] > b[diff[0]]
    out = batch.copy()
    out[flip] = out[flip][:, :, ::-1]
    return out


def _peak(arr: np.ndarray) -> float:
    """The largest value, 0 for an empty image (numpy's ``initial=`` has no stub every numpy version accepts)."""
    return float(arr.max()) if arr.size else 0.0


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white, 16-bit is scaled."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or _peak(arr) > 255 else 255.0
        gray = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        top = 1.0 if _peak(arr) <= 1.0 else 255.0
        gray = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise PreprocessError(f"unsupported image mode {mode}") from exc


def preprocess_preview(data: bytes, orientation: int = 1) -> np.ndarray:
    """An embedded preview (see :mod:`bikewatch.decode.previews`) into the same model input as its main image.

    The preview is a plain JPEG without EXIF of its own; the main image's ``orientation``
    applies to it, so it is given to the preview before the very steps
    :func:`preprocess_bytes` takes. Raises :class:`PreprocessError` when it does not decode.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=("JPEG",))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PreprocessError(f"unreadable preview: {exc}") from exc
    with image:
        if image.size[0] < 1 or image.size[1] < 1:
            raise PreprocessError(f"invalid preview size {image.size[0]}x{image.size[1]}")
        image.getexif()[ExifTags.Base.Orientation] = orientation  # what _to_array's exif_transpose reads
        try:
            return _to_array(image)
        except PreprocessError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
            raise PreprocessError(_describe_decode_error(exc)) from exc
