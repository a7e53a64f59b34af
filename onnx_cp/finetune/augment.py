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
    """Random views of image inputs: a shift of up to `max_shift` of each spatial size (edges
    repeated into the space uncovered), contrast scaled by a factor in [1 - contrast, 1 + contrast]
    about each sample's mean, and brightness moved by up to `brightness` of its standard deviation."""

    max_shift: float = 0.1
    contrast: float = 0.2
    brightness: float = 0.1

    def describe(self) -> str:
        return (f"shifts up to {self.max_shift:.0%} of each side, contrast x[{1 - self.contrast:g}, "
                f"{1 + self.contrast:g}], brightness +-{self.brightness:g} std; the teacher relabels every view")


DEFAULT_AUGMENTATION = Augmentation()


def augmentation_for(mode: str, sample_shape: tuple[int, ...], distilling: bool) -> Augmentation | None:
    """The augmentation a run uses: "auto" (the default) shifts image inputs when there is a teacher
    to relabel the views (labels alone do not follow a shifted detector box or text line); "shift"
    asks for it (an error where the input is not an image); "none" trains on the samples as given."""
    if mode not in AUGMENTATIONS:
        raise UsageError(f"augment {mode!r}: expected one of {', '.join(AUGMENTATIONS)}", option="augment")
    if mode == "none":
        return None
    axes = spatial_axes(sample_shape)
    if mode == "shift" and (axes is None or not distilling):
        why = "the input is not an image (N, C, H, W) or (N, H, W, C)" if axes is None else "there is no teacher"
        raise UsageError(f"cannot augment: {why}", option="augment")
    return DEFAULT_AUGMENTATION if axes is not None and distilling else None


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
    out = _shifted(x, h_axis, w_axis, augmentation.max_shift, rng)
    n = len(x)
    per_sample = (n,) + (1,) * (x.ndim - 1)
    mean = out.reshape(n, -1).mean(1).reshape(per_sample)
    std = out.reshape(n, -1).std(1).reshape(per_sample)
    factor = rng.uniform(1 - augmentation.contrast, 1 + augmentation.contrast, n).reshape(per_sample)
    offset = rng.uniform(-augmentation.brightness, augmentation.brightness, n).reshape(per_sample) * std
    return (mean + factor * (out - mean) + offset).astype(np.float32)


def _shifted(x: np.ndarray, h_axis: int, w_axis: int, share: float, rng: np.random.Generator) -> np.ndarray:
    limits = [int(round(share * x.shape[axis])) for axis in (h_axis, w_axis)]
    if not any(limits):
        return np.array(x, dtype=np.float32)
    # one sample padded at a time: a padded copy of all 400 photos of 320x320 would be 0.7 GB per epoch
    pad = [(0, 0)] * (x.ndim - 1)
    pad[h_axis - 1], pad[w_axis - 1] = (limits[0],) * 2, (limits[1],) * 2
    offsets = [rng.integers(0, 2 * limit + 1, len(x)) for limit in limits]
    out = np.empty(x.shape, dtype=np.float32)
    h, w = x.shape[h_axis], x.shape[w_axis]
    for i in range(len(x)):
        window = [slice(None)] * (x.ndim - 1)
        window[h_axis - 1] = slice(offsets[0][i], offsets[0][i] + h)
        window[w_axis - 1] = slice(offsets[1][i], offsets[1][i] + w)
        out[i] = np.pad(x[i], pad, mode="edge")[tuple(window)]
    return out
