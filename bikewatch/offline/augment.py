"""Photo-level augmentation: turn a white-background product shot into what users drop.

The 200 training photos are bikes on white. Users' photos are bikes on grass, walls and
streets, of every aspect and size, darker, greyer, blurrier and more compressed. A network
that only ever saw white backgrounds learns "white = road-ish studio light" shortcuts that
do not carry over. So the background is segmented (near-white pixels connected to the
border), and each training view pastes the bike, scaled and placed at random, onto a
synthetic background, then degrades it the way cameras and re-uploads do. The view then
goes through the same 64x64 resize as every real photo (:func:`bikewatch.decode.preprocess.to_input`).

Everything here is pure numpy/Pillow, seeded by an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from bikewatch.decode.preprocess import to_input

SOURCE_SIZE = 192
"""Longest side the training photos are kept at for augmentation (64x64 is made from this)."""


def load_source(image: Image.Image, size: int = SOURCE_SIZE) -> np.ndarray:
    """An RGB uint8 array with the longest side ``size`` (aspect kept)."""
    image = image.convert("RGB")
    scale = size / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def background_mask(rgb: np.ndarray, *, threshold: int = 228, spread: int = 28, pure: int = 246) -> np.ndarray:
    """True where a pixel is near-white and connected to the border (the studio background),
    or pure white anywhere (the background seen through the wheels and the frame triangle).

    White parts of the bike itself (a white frame, saddle) are shaded, so rarely pure white;
    when they are, the view shows a bike with a see-through part, still a bike of its class.
    """
    rgb16 = rgb.astype(np.int16)
    white = (rgb16.min(axis=2) >= threshold) & ((rgb16.max(axis=2) - rgb16.min(axis=2)) <= spread)
    seed = np.zeros_like(white)
    seed[0, :], seed[-1, :], seed[:, 0], seed[:, -1] = white[0, :], white[-1, :], white[:, 0], white[:, -1]
    while True:  # morphological reconstruction of the border-connected white region
        grown = seed.copy()
        grown[1:, :] |= seed[:-1, :]
        grown[:-1, :] |= seed[1:, :]
        grown[:, 1:] |= seed[:, :-1]
        grown[:, :-1] |= seed[:, 1:]
        grown &= white
        if np.array_equal(grown, seed):
            return seed | ((rgb16.min(axis=2) >= pure) & ((rgb16.max(axis=2) - rgb16.min(axis=2)) <= 10))
        seed = grown


@dataclass(frozen=True)
class Source:
    """One training photo ready for compositing: pixels, foreground alpha (0..1) and its box."""

    rgb: np.ndarray
    alpha: np.ndarray
    box: tuple[int, int, int, int]  # left, top, right, bottom of the foreground

    @classmethod
    def from_rgb(cls, rgb: np.ndarray) -> "Source":
        fg = ~background_mask(rgb)
        ys, xs = np.nonzero(fg)
        if len(xs) < 0.01 * fg.size:  # nothing segmented: treat the whole frame as foreground
            fg[:] = True
            ys, xs = np.nonzero(fg)
        alpha = np.asarray(Image.fromarray((fg * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7)),
                           dtype=np.float32) / 255.0
        return cls(rgb, alpha, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


# ---- synthetic backgrounds ----------------------------------------------------------------

def _colour(rng: np.random.Generator) -> np.ndarray:
    """Mostly muted colours, as walls, roads, grass and sky are; now and then a vivid one."""
    grey = rng.uniform(30, 235)
    vivid = rng.uniform(0, 255, 3)
    return grey + (vivid - grey) * rng.uniform(0.0, 0.35 if rng.random() < 0.8 else 0.9)


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: int, amp: float) -> np.ndarray:
    grid = rng.normal(0, amp, (cells, cells, 3)).astype(np.float32)
    small = Image.fromarray(np.clip(grid + 128, 0, 255).astype(np.uint8))
    return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) - 128


def bg_solid(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    return np.broadcast_to(_colour(rng), (h, w, 3)).astype(np.float32)


def bg_gradient(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    a, b = _colour(rng), _colour(rng)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    return a * (1 - t[..., None]) + b * t[..., None]


def bg_noise(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    base = bg_solid(rng, w, h)
    tex = _smooth_noise(rng, w, h, int(rng.integers(2, 12)), rng.uniform(8, 40))
    fine = rng.normal(0, rng.uniform(0, 10), (h, w, 1)).astype(np.float32)
    return base + tex + fine


def bg_ground(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A wall or sky above a ground (grass, asphalt, gravel): the commonest real-world scene."""
    horizon = int(h * rng.uniform(0.35, 0.85))
    top, bottom = bg_noise(rng, w, h), bg_noise(rng, w, h)
    if rng.random() < 0.5:  # grass / earth / asphalt tones for the ground
        bottom = bottom * 0.4 + np.array(
            [(70, 110, 40), (110, 90, 60), (90, 90, 95), (140, 130, 110)][int(rng.integers(4))]) * 0.6
    out = top.copy()
    out[horizon:] = bottom[horizon:]
    return out


def bg_stripes(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Planks, bricks, fences: strong straight edges the network must learn to ignore."""
    a = _colour(rng)
    b = a + rng.normal(0, 30, 3)
    period = rng.uniform(6, 40)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    coord = xx if rng.random() < 0.5 else yy
    t = ((coord / period) % 1.0 < rng.uniform(0.2, 0.8)).astype(np.float32)[..., None]
    return a * t + b * (1 - t) + rng.normal(0, 8, (h, w, 1)).astype(np.float32)


def bg_clutter(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Random boxes and ellipses over a textured field: a street, a shop, a garage."""
    img = Image.fromarray(np.clip(bg_noise(rng, w, h), 0, 255).astype(np.uint8))
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 16))):
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        x1, y1 = x0 + rng.uniform(0.05, 0.6) * w, y0 + rng.uniform(0.05, 0.6) * h
        fill = tuple(int(c) for c in _colour(rng))
        (draw.rectangle if rng.random() < 0.6 else draw.ellipse)([x0, y0, x1, y1], fill=fill)
    return np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 2))), dtype=np.float32)


TRAIN_BACKGROUNDS: tuple[Callable[[np.random.Generator, int, int], np.ndarray], ...] = (
    bg_solid, bg_gradient, bg_noise, bg_ground, bg_stripes)
"""Backgrounds used while training; :func:`bg_clutter` is kept back for validation only, so the
validation measures whether the network learned to ignore backgrounds it has never seen."""
ALL_BACKGROUNDS = TRAIN_BACKGROUNDS + (bg_clutter,)


# ---- one augmented view ---------------------------------------------------------------------

@dataclass(frozen=True)
class ViewSpec:
    """How hard the views are: probabilities and ranges of each change."""

    p_background: float = 0.7
    backgrounds: tuple[Callable[[np.random.Generator, int, int], np.ndarray], ...] = TRAIN_BACKGROUNDS
    fill: tuple[float, float] = (0.55, 1.05)  # bike box / frame, on the limiting side
    aspect: tuple[float, float] = (0.75, 2.0)  # frame width / height
    p_flip: float = 0.5
    p_colour: float = 0.8
    p_gray: float = 0.1
    p_dark: float = 0.3
    p_blur: float = 0.3
    p_jpeg: float = 0.4
    p_rotate: float = 0.3


TRAIN_SPEC = ViewSpec()
FRAMED_SPEC = ViewSpec(p_background=0.5, fill=(0.7, 1.05), aspect=(1.0, 2.0))
"""Like TRAIN_SPEC, but the bike fills most of the frame, as in catalogue and review photos:
the 64x64 CNN could not learn bikes at 55% of the frame from 180 photos in 40 epochs."""
SPECS = {"train": TRAIN_SPEC, "framed": FRAMED_SPEC}
USER_SPEC = ViewSpec(p_background=0.7, backgrounds=ALL_BACKGROUNDS, fill=(0.6, 1.05), aspect=(0.9, 2.0),
                     p_gray=0.1, p_dark=0.3, p_blur=0.3, p_jpeg=0.6)
"""The validation's idea of a user's photo: more often on a background (one family unseen in
training), more often dark, blurred and re-compressed."""


def make_view(src: Source, rng: np.random.Generator, spec: ViewSpec = TRAIN_SPEC) -> np.ndarray:
    """One (64, 64, 3) float32 RGB 0..255 view of ``src``, made the way a user photo would be."""
    left, top, right, bottom = src.box
    bw, bh = right - left, bottom - top
    aspect = float(np.exp(rng.uniform(np.log(spec.aspect[0]), np.log(spec.aspect[1]))))
    fill = rng.uniform(*spec.fill)
    # frame size so that the bike box fills `fill` of the limiting side
    fw = max(bw / fill, bh * aspect / fill)
    fh = fw / aspect
    scale = 160.0 / max(fw, fh)  # work at about 160 px: cheap, and well above 64
    fw_i, fh_i = max(8, round(fw * scale)), max(8, round(fh * scale))
    bw_i, bh_i = max(4, round(bw * scale)), max(4, round(bh * scale))
    fg = Image.fromarray(src.rgb[top:bottom, left:right]).resize((bw_i, bh_i), Image.Resampling.BILINEAR)
    al = Image.fromarray((src.alpha[top:bottom, left:right] * 255).astype(np.uint8)).resize(
        (bw_i, bh_i), Image.Resampling.BILINEAR)
    if rng.random() < spec.p_background:
        bg = spec.backgrounds[int(rng.integers(len(spec.backgrounds)))](rng, fw_i, fh_i)
    else:
        bg = np.full((fh_i, fw_i, 3), rng.uniform(225, 255), dtype=np.float32)
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    # placement: anywhere, allowing up to ~12% of the bike to leave the frame
    x = int(rng.uniform(-0.12 * bw_i, max(fw_i - 0.88 * bw_i, -0.12 * bw_i + 1)))
    y = int(rng.uniform(-0.12 * bh_i, max(fh_i - 0.88 * bh_i, -0.12 * bh_i + 1)))
    canvas.paste(fg, (x, y), al)
    if rng.random() < spec.p_rotate:
        canvas = canvas.rotate(rng.uniform(-6, 6), resample=Image.Resampling.BILINEAR,
                               fillcolor=tuple(int(c) for c in np.asarray(canvas).reshape(-1, 3).mean(0)))
    if rng.random() < spec.p_flip:
        canvas = ImageOps.mirror(canvas)
    if rng.random() < spec.p_colour:
        canvas = ImageEnhance.Color(canvas).enhance(rng.uniform(0.3, 1.6))
        canvas = ImageEnhance.Contrast(canvas).enhance(rng.uniform(0.6, 1.4))
        canvas = ImageEnhance.Brightness(canvas).enhance(rng.uniform(0.75, 1.25))
        if rng.random() < 0.3:  # colour cast: white balance, old prints
            arr = np.asarray(canvas, dtype=np.float32) * rng.uniform(0.8, 1.2, 3)
            canvas = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < spec.p_gray:
        canvas = ImageOps.grayscale(canvas).convert("RGB")
    if rng.random() < spec.p_dark:  # under-exposed, old or evening photos
        unit = np.asarray(canvas, dtype=np.float32) / 255.0
        dark = unit ** rng.uniform(1.1, 2.0) * rng.uniform(0.55, 0.95)
        canvas = Image.fromarray(np.clip(dark * 255, 0, 255).astype(np.uint8))
    if rng.random() < spec.p_blur:
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.6)))
    if rng.random() < spec.p_jpeg:
        buf = io.BytesIO()
        canvas.save(buf, "JPEG", quality=int(rng.integers(15, 90)))
        canvas = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return to_input(canvas)


def make_views(sources: list[Source], per_source: int, seed: int, spec: ViewSpec | str = TRAIN_SPEC) -> np.ndarray:
    """``per_source`` views of each source, shape (len(sources), per_source, 64, 64, 3); seeded."""
    rng = np.random.default_rng(seed)
    spec = SPECS[spec] if isinstance(spec, str) else spec
    out = np.zeros((len(sources), per_source, 64, 64, 3), dtype=np.float32)
    for i, src in enumerate(sources):
        for j in range(per_source):
            out[i, j] = make_view(src, rng, spec)
    return out
