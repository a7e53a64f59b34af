"""Synthetic 24x24 character crops for the 36-class character CNN (0-9, A-Z, case-insensitive).

The images imitate crops of a sliding window over a word image (the data of Jaderberg et al. 2014,
used by Lebedev et al. 2015): one character in the middle of the window, parts of its neighbours cut
at the borders, rendered from many fonts with random scale, position, rotation, shear, stroke width,
blur, contrast, polarity, background gradient and texture, and pixel noise.

Fonts come from this package (onnx_cp/data/fonts, see its README for licences), matplotlib's
bundled fonts (so the generator needs the optional extra `plots`) and the system's DejaVu fonts.
Every font file belongs to exactly one split (by a hash of its file name), so the test split is
rendered only from fonts never seen in training.

Preprocessing (what the shipped models expect, and what `generate_chars` returns):
pixel intensities in [0, 1] (0 black, 1 white), then `x = (v - PIXEL_MEAN) / PIXEL_STD`.
For real images in 0..255 that is `open_dataset(..., grayscale=True, scale=1/255,
mean=PIXEL_MEAN, std=PIXEL_STD)` after resizing to 24x24.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from onnx_cp.errors import OnnxCpError, UsageError

CLASSES = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
NUM_CLASSES = len(CLASSES)
IMAGE_SIZE = 24
PIXEL_MEAN = 0.5
PIXEL_STD = 0.3
SPLITS = ("train", "val", "test")

_SPLIT_SALT = "onnx-cp-chars-1:"
_SPLIT_ID = {name: i for i, name in enumerate(SPLITS)}
_SCALE = 2  # render at 2x and box-downsample: cheap anti-aliasing
_CANVAS = 64  # render canvas at 2x (margin for rotation); output canvas is 2 * IMAGE_SIZE
_CHUNK = 1024  # images per work unit; chunk seeds do not depend on the worker count
_PARALLEL_MIN = 8192
_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

# matplotlib's fonts that are real text faces with Latin letters and digits
_MPL_FONTS = ("STIXGeneral", "STIXGeneralBol", "STIXGeneralBolIta", "STIXGeneralItalic",
              "cmr10", "cmb10", "cmss10", "cmti10", "cmtt10")
_SYSTEM_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu",)
MATPLOTLIB_MISSING = ("the character generator renders from matplotlib's bundled fonts: "
                      "pip install 'onnx-cp[plots]'")


def _split_of(font_name: str) -> str:
    """Fixed split of a font, from a salted hash of its name: ~70% train, ~12% val, ~18% test.

    The salt was chosen once so that the 59 fonts of the reference machine divide 43/7/9 with the
    plain DejaVu Sans/Serif and cmr10 in train; a missing or added font moves no other font."""
    bucket = int(hashlib.sha1((_SPLIT_SALT + font_name).encode()).hexdigest(), 16) % 100
    return "test" if bucket < 18 else "val" if bucket < 30 else "train"


@lru_cache(maxsize=1)
def available_fonts() -> dict[str, str]:
    """All usable font files, name (file stem) -> path. Duplicates by name are taken once."""
    found: dict[str, str] = {}
    here = Path(__file__).parent / "fonts"
    for path in sorted(here.glob("*/*")):
        if path.suffix.lower() in (".ttf", ".otf"):
            found.setdefault(path.stem, str(path))
    for folder in _SYSTEM_FONT_DIRS:
        for path in sorted(Path(folder).glob("*.ttf")):
            found.setdefault(path.stem, str(path))
    for path in sorted(_matplotlib_fonts().glob("*.ttf")):
        if path.stem.startswith("DejaVu") and "Display" not in path.stem:
            found.setdefault(path.stem, str(path))  # only if the system lacks DejaVu
        elif path.stem in _MPL_FONTS:
            found.setdefault(path.stem, str(path))
    return dict(sorted(found.items()))


def _matplotlib_fonts() -> Path:
    """matplotlib's bundled TrueType folder. Required, not optional: without its fonts every split
    would render from other fonts, so the images for a given seed would silently change."""
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise
        raise OnnxCpError(MATPLOTLIB_MISSING) from None
    return Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"


def split_fonts(split: str) -> list[str]:
    """Names of the fonts a split is rendered from (disjoint across splits)."""
    _check_split(split)
    return [name for name in available_fonts() if _split_of(name) == split]


def _check_split(split: str) -> None:
    if split not in _SPLIT_ID:
        raise UsageError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")


@lru_cache(maxsize=512)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _glyph(label: int, rng: np.random.Generator) -> str:
    ch = CLASSES[label]
    return ch.lower() if ch.isalpha() and rng.random() < 0.5 else ch


def _affine_inverse(rng: np.random.Generator) -> tuple[float, ...]:
    """PIL AFFINE coefficients (output -> input) of a random rotation, shear, scale and shift."""
    angle = np.deg2rad(np.clip(rng.normal(0.0, 5.0), -12.0, 12.0))
    shear = rng.uniform(-0.2, 0.2)
    sx = rng.uniform(0.88, 1.12)
    sy = sx * rng.uniform(0.92, 1.08)
    shift = rng.uniform(-1.5, 1.5, size=2) * _SCALE
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    forward = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([sx, sy])
    inv = np.linalg.inv(forward)
    out_center = np.array([IMAGE_SIZE * _SCALE / 2.0] * 2) + shift
    in_center = np.array([_CANVAS / 2.0] * 2)
    offset = in_center - inv @ out_center
    return (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])


def _render_mask(label: int, font_paths: list[str], rng: np.random.Generator) -> np.ndarray:
    """Ink coverage (24x24 uint8) of one window: the labelled glyph plus cut neighbours."""
    path = font_paths[rng.integers(len(font_paths))]
    font = _font(path, int(rng.integers(30, 47)))
    stroke = int(rng.choice([0, 0, 0, 1, 2]))
    canvas = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(canvas)
    mid = _CANVAS / 2.0
    glyph = _glyph(label, rng)
    box = draw.textbbox((mid, mid), glyph, font=font, anchor="mm", stroke_width=stroke)
    # centre the ink horizontally; keep the line's vertical position (baseline-relative, like text)
    x = mid - (box[0] + box[2]) / 2.0 + mid
    draw.text((x, mid), glyph, font=font, fill=255, anchor="mm", stroke_width=stroke,
              stroke_fill=255)
    left_ink = x - mid + box[0]
    right_ink = x - mid + box[2]
    for side in (-1, 1):
        if rng.random() < 0.35:
            continue
        other = _ALNUM[rng.integers(len(_ALNUM))]
        gap = rng.uniform(1.0, 7.0)
        obox = draw.textbbox((0, mid), other, font=font, anchor="lm", stroke_width=stroke)
        ox = left_ink - gap - obox[2] if side < 0 else right_ink + gap - obox[0]
        draw.text((ox, mid), other, font=font, fill=255, anchor="lm", stroke_width=stroke,
                  stroke_fill=255)
    out = IMAGE_SIZE * _SCALE
    img = canvas.transform((out, out), Image.Transform.AFFINE, _affine_inverse(rng),
                           resample=Image.Resampling.BILINEAR)
    radius = rng.uniform(0.0, 1.6)
    if radius > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(img.reduce(_SCALE), dtype=np.uint8)


def _smooth_field(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """(n,24,24) low-frequency random fields: a cells x cells grid, bilinearly upsampled."""
    grid = rng.normal(size=(n, cells + 1, cells + 1))
    pos = np.linspace(0.0, cells, IMAGE_SIZE)
    i0 = np.minimum(pos.astype(int), cells - 1)
    t = pos - i0
    rows = grid[:, i0, :] * (1 - t)[None, :, None] + grid[:, i0 + 1, :] * t[None, :, None]
    return rows[:, :, i0] * (1 - t)[None, None, :] + rows[:, :, i0 + 1] * t[None, None, :]


def _compose(masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Vectorised photometry: polarity, contrast, background gradient/texture, noise -> [0,1]."""
    n = masks.shape[0]
    ink = masks.astype(np.float32) / 255.0
    contrast = rng.uniform(0.25, 0.95, size=n)
    low = rng.uniform(0.0, 1.0 - contrast)
    dark_text = rng.random(n) < 0.5
    fg = np.where(dark_text, low, low + contrast)
    bg = np.where(dark_text, low + contrast, low)
    coords = (np.arange(IMAGE_SIZE) - (IMAGE_SIZE - 1) / 2.0) / IMAGE_SIZE
    slope = rng.uniform(-0.25, 0.25, size=(n, 2)) * contrast[:, None]
    gradient = slope[:, 0, None, None] * coords[None, :, None] + slope[:, 1, None, None] * coords
    texture = _smooth_field(rng, n, 4) * (rng.uniform(0.0, 0.08, size=n) * contrast)[:, None, None]
    background = bg[:, None, None] + gradient + texture
    img = background + (fg[:, None, None] - background) * ink
    img += rng.normal(size=img.shape) * rng.uniform(0.0, 0.06, size=n)[:, None, None]
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _render_chunk(job: tuple[np.ndarray, list[str], np.random.SeedSequence]) -> np.ndarray:
    labels, font_paths, seed_seq = job
    rng = np.random.default_rng(seed_seq)
    masks = np.stack([_render_mask(int(label), font_paths, rng) for label in labels])
    return _compose(masks, rng)


def preprocess(pixels: np.ndarray) -> np.ndarray:
    """[0,1] grayscale pixels (N,24,24) or (N,1,24,24) -> model input (N,1,24,24) float32."""
    x = (np.asarray(pixels, dtype=np.float32) - PIXEL_MEAN) / PIXEL_STD
    return x.reshape(x.shape[0], 1, IMAGE_SIZE, IMAGE_SIZE)


def generate_chars(n: int, *, seed: int, split: str = "train",
                   workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render n preprocessed character crops: x (n,1,24,24) float32, y (n,) int64 in [0, 36).

    Deterministic in (n, seed, split) whatever `workers` is; classes are balanced (counts differ
    by at most one). Splits use disjoint fonts and independent random streams.
    """
    _check_split(split)
    if n < 0:
        raise UsageError(f"number of images must be >= 0, got {n}")
    fonts = [available_fonts()[name] for name in split_fonts(split)]
    if not fonts:
        raise UsageError(f"no fonts available for split {split!r}")
    root = np.random.SeedSequence(entropy=int(seed), spawn_key=(_SPLIT_ID[split],))
    labels = np.random.default_rng(root).permutation(np.arange(n) % NUM_CLASSES).astype(np.int64)
    chunk_seeds = root.spawn((n + _CHUNK - 1) // _CHUNK)
    jobs = [(labels[i * _CHUNK:(i + 1) * _CHUNK], fonts, s) for i, s in enumerate(chunk_seeds)]
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if n >= _PARALLEL_MIN and workers > 1 and len(jobs) > 1:
        # spawn, not fork: callers (training scripts) may hold torch/OpenMP thread pools
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_render_chunk, jobs)
    else:
        parts = [_render_chunk(job) for job in jobs]
    pixels = np.concatenate(parts) if parts else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    return preprocess(pixels), labels
