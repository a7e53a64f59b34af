"""Consistent augmentation for distillation: each epoch trains on fresh random views of the sample
inputs, and the teacher is run again on the same views, so its outputs stay exact targets.

Distillation can only follow the teacher where it has seen inputs. A fixed set overfits: charnet at
about 12x (conv1 SVD 16, conv2 CP 32, conv3 spatial SVD 16), 5000 steps at 3e-4 on 20000 images,
reached 94.69% test top-1; on 60000 distinct images, the same steps reached 95.58% (original 96.41%).
Views made by small shifts and contrast changes give the student that support from the data users
have (400 photos, not 60000). The teacher relabels every view, so nothing here needs labels or to
know the task; only the geometry of an image input (its two spatial axes)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_cp.errors import UsageError
from onnx_cp.settings import AUGMENTATIONS


@dataclass(frozen=True)
class Augmentation:
    """Random views of image inputs: a shift of up to `max_shift` of each spatial size and a zoom by
    a factor in [1 - zoom, 1 + zoom] about the centre (edges repeated into the space uncovered,
    bilinear), contrast scaled by a factor in [1 - contrast, 1 + contrast] about each sample's mean,
    brightness moved by up to `brightness` of its standard deviation; then a share `mix` of the views
    blended with another view of the batch, x' = l x_i + (1 - l) x_j with l uniform in [0, 1]
    (mixup as "function matching", Beyer et al., CVPR 2022: the teacher relabels the blend, so the
    student meets the teacher's function between the samples too)."""

    max_shift: float = 0.1
    contrast: float = 0.2
    brightness: float = 0.1
    zoom: float = 0.0
    mix: float = 0.0

    def describe(self) -> str:
        parts = [f"shifts up to {self.max_shift:.0%} of each side"]
        if self.zoom:
            parts.append(f"zoom x[{1 - self.zoom:g}, {1 + self.zoom:g}]")
        parts.append(f"contrast x[{1 - self.contrast:g}, {1 + self.contrast:g}], brightness +-{self.brightness:g} std")
        if self.mix:
            parts.append(f"{self.mix:.0%} blended with another view (mixup)")
        return ", ".join(parts) + "; the teacher relabels every view"


DEFAULT_AUGMENTATION = Augmentation()
MIXED_AUGMENTATION = Augmentation(zoom=0.25, mix=0.5)


def augmentation_for(mode: str, sample_shape: tuple[int, ...], distilling: bool) -> Augmentation | None:
    """The augmentation a run uses: "auto" (the default) shifts image inputs when there is a teacher
    to relabel the views (labels alone do not follow a shifted detector box or text line); "shift"
    asks for it (an error where the input is not an image); "none" trains on the samples as given."""
    if mode not in AUGMENTATIONS:
        raise UsageError(f"augment {mode!r}: expected one of {', '.join(AUGMENTATIONS)}", option="augment")
    if mode == "none":
        return None
    axes = spatial_axes(sample_shape)
    if mode in ("shift", "mix") and (axes is None or not distilling):
        why = "the input is not an image (N, C, H, W) or (N, H, W, C)" if axes is None else "there is no teacher"
        raise UsageError(f"cannot augment: {why}", option="augment")
    if axes is None or not distilling:
        return None
    return MIXED_AUGMENTATION if mode == "mix" else DEFAULT_AUGMENTATION


def spatial_axes(sample_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The height and width axes of one sample (no batch axis): (C, H, W) -> (1, 2); a channels-last
    (H, W, C) with 1 to 4 channels -> (0, 1); None for inputs that are not images."""
    if len(sample_shape) != 3:
        return None
    if sample_shape[0] <= 4 or sample_shape[2] > 4:
        return (1, 2) if min(sample_shape[1:]) >= 8 else None
    return (0, 1) if min(sample_shape[:2]) >= 8 else None


def augmented(x: np.ndarray, augmentation: Augmentation, rng: np.random.Generator) -> np.ndarray:
    """A random view of every sample of x (batch first), float32."""
    h_axis, w_axis = (a + 1 for a in spatial_axes(x.shape[1:]))
    out = _moved(x, h_axis, w_axis, augmentation, rng)
    n = len(x)
    per_sample = (n,) + (1,) * (x.ndim - 1)
    mean = out.reshape(n, -1).mean(1).reshape(per_sample)
    std = out.reshape(n, -1).std(1).reshape(per_sample)
    factor = rng.uniform(1 - augmentation.contrast, 1 + augmentation.contrast, n).reshape(per_sample)
    offset = rng.uniform(-augmentation.brightness, augmentation.brightness, n).reshape(per_sample) * std
    out = mean + factor * (out - mean) + offset
    if augmentation.mix and n > 1:
        mixed = rng.random(n) < augmentation.mix
        partner = (np.arange(n) + rng.integers(1, n, n)) % n  # another sample, never itself
        share = np.where(mixed, rng.uniform(0.0, 1.0, n), 1.0).reshape(per_sample)
        out = share * out + (1 - share) * out[partner]
    return out.astype(np.float32)


def _moved(x: np.ndarray, h_axis: int, w_axis: int, augmentation: Augmentation,
           rng: np.random.Generator) -> np.ndarray:
    """Each sample shifted and zoomed: every output pixel read at its source coordinates, clamped to
    the image (edges repeated) and interpolated bilinearly; an integer shift alone copies exactly."""
    sizes = (x.shape[h_axis], x.shape[w_axis])
    limits = [int(round(augmentation.max_shift * size)) for size in sizes]
    if not any(limits) and not augmentation.zoom:
        return np.array(x, dtype=np.float32)
    n = len(x)
    shifts = [rng.integers(-limit, limit + 1, n) for limit in limits]
    zooms = rng.uniform(1 - augmentation.zoom, 1 + augmentation.zoom, n) if augmentation.zoom else np.ones(n)
    out = np.empty(x.shape, dtype=np.float32)
    # one sample at a time: a moved copy of all 400 photos of 320x320 at once would be 0.7 GB
    for i in range(n):
        sample = x[i].astype(np.float32)
        for axis, size, shift in ((h_axis - 1, sizes[0], shifts[0][i]), (w_axis - 1, sizes[1], shifts[1][i])):
            centre = (size - 1) / 2
            source = np.clip((np.arange(size) - centre) / zooms[i] + centre + shift, 0, size - 1)
            low = np.floor(source).astype(np.int64)
            if not augmentation.zoom:  # whole pixels: a copy, not an interpolation (an epoch's hot path)
                sample = np.take(sample, low, axis=axis)
                continue
            high = np.minimum(low + 1, size - 1)
            shape = [1] * sample.ndim
            shape[axis] = size
            weight = (source - low).astype(np.float32).reshape(shape)
            sample = np.take(sample, low, axis=axis) * (1 - weight) + np.take(sample, high, axis=axis) * weight
        out[i] = sample
    return out
