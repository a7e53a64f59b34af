"""Labelled (or unlabelled) image data for evaluation and fine-tuning, read in streaming batches.

Two formats:
- ``.npz`` with ``x`` (N, C, H, W floating point; used as float32) and optional ``y`` (N,) integer
  class labels. Arrays are streamed from the archive, so a large file is never loaded whole.
- an image folder with one sub-folder per class (``DATA/cat/001.png``). Labels: when every
  sub-folder name is a non-negative integer, that integer is the label ("7/" holds class 7);
  otherwise the sorted sub-folder names are numbered 0, 1, ... (as torchvision's ImageFolder).
  Images are listed class by class in round-robin order, so `limit` keeps every class.
- a flat folder of images (``DATA/001.jpg``, no class sub-folders), or any folder opened with
  ``labels=False``: unlabelled samples (every image below it, in sorted order), which is what
  distillation, reconstruction, calibration and error budgets need.

Preprocessing, in this order: convert to RGB (or one channel with ``grayscale``; ``channel_order
"bgr"`` swaps to the BGR order OpenCV-trained models expect), resize to ``size`` (H, W; bilinear)
when given, multiply by ``scale`` (default 1/255 for images, 1 for npz), then ``(x - mean) / std``
per channel when given. Images of one folder must share a size unless ``size`` is given. ``size``,
``grayscale`` and ``channel_order`` apply to image folders only.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnx_cp.errors import OnnxCpError, UsageError, first_line

CHANNEL_ORDERS = ("rgb", "bgr")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm"}


class Dataset:
    """Samples x (float32, C x H x W) with optional integer labels, read in batches."""

    path: str
    has_labels: bool
    num_classes: int | None
    sample_shape: tuple[int, ...]
    classes: list[str] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Yield (x float32 N x C x H x W, y int64 (N,) or None) in dataset order."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}, n={len(self)}, sample_shape={self.sample_shape}, "
                f"num_classes={self.num_classes})")


@dataclass(frozen=True)
class Preprocessing:
    """How images become model inputs, applied the same way in every stage that reads data (see the
    module docstring); `.npz` files are used as stored unless scale, mean or std is given."""

    size: tuple[int, int] | None = None
    grayscale: bool = False
    scale: float | None = None
    mean: Sequence[float] | float | None = None
    std: Sequence[float] | float | None = None
    channel_order: str = "rgb"

    def __post_init__(self) -> None:
        if self.channel_order not in CHANNEL_ORDERS:
            raise UsageError(f"expected one of {', '.join(CHANNEL_ORDERS)}, got {self.channel_order!r}",
                             option="channel_order")
        if self.size is not None:
            _size(self.size)

    def open(self, source, *, labels: bool = True, limit: int | None = None):
        """A Dataset for a path (a Dataset or arrays pass through unchanged)."""
        if not isinstance(source, (str, os.PathLike)):
            return source
        return open_dataset(source, size=self.size, grayscale=self.grayscale, scale=self.scale, mean=self.mean,
                            std=self.std, channel_order=self.channel_order, labels=labels, limit=limit)


def open_dataset(
    path: str | os.PathLike,
    *,
    size: Sequence[int] | int | None = None,
    grayscale: bool = False,
    scale: float | None = None,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    limit: int | None = None,
    channel_order: str = "rgb",
    labels: bool = True,
) -> Dataset:
    """Open an .npz file or an image folder (see the module docstring for formats and
    preprocessing); labels=False ignores labels and class folders. Raises OnnxCpError with a
    one-line message when the data is unusable."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise UsageError(f"expected a positive integer, got {limit}", option="limit")
    if channel_order not in CHANNEL_ORDERS:
        raise UsageError(f"expected one of {', '.join(CHANNEL_ORDERS)}, got {channel_order!r}", option="channel_order")
    if not path.exists():
        raise OnnxCpError(f"{path}: no such file or folder")
    if path.is_dir():
        return ImageFolder(path, size=_size(size), grayscale=grayscale, bgr=channel_order == "bgr",
                           scale=1 / 255 if scale is None else scale, mean=mean, std=std, limit=limit,
                           labels=labels)
    if size is not None or grayscale or channel_order != "rgb":
        raise UsageError(f"{path}: size, grayscale and channel order apply to image folders, not to .npz files",
                         option="size")
    return NpzDataset(path, scale=1.0 if scale is None else scale, mean=mean, std=std, limit=limit,
                      labels=labels)


# ----------------------------------------------------------------------------------------- npz

class NpzDataset(Dataset):
    def __init__(self, path: Path, *, scale: float, mean, std, limit: int | None, labels: bool = True):
        self.path = str(path)
        try:
            with zipfile.ZipFile(path) as archive:
                members = {Path(n).stem: n for n in archive.namelist() if n.endswith(".npy")}
                if "x" not in members:
                    found = ", ".join(sorted(members)) or "nothing"
                    raise OnnxCpError(f"{path}: no array 'x' in the .npz (found: {found})")
                self._x_member = members["x"]
                x_shape, x_dtype = _npy_header(archive, self._x_member, path)
                y = _read_npy(archive, members["y"], path) if labels and "y" in members else None
        except zipfile.BadZipFile:
            raise OnnxCpError(f"{path}: not a readable .npz file (expected an archive with x and y)") \
                from None
        except OSError as exc:
            raise OnnxCpError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if len(x_shape) != 4:
            raise OnnxCpError(f"{path}: x has shape {tuple(x_shape)}; expected (N, C, H, W)")
        if not np.issubdtype(x_dtype, np.floating):
            raise OnnxCpError(f"{path}: x has dtype {x_dtype}; expected float32 "
                              f"(convert first, e.g. x.astype('float32') / 255)")
        if x_shape[0] == 0:
            raise OnnxCpError(f"{path}: x holds no samples")
        self._n_total = int(x_shape[0])
        self._dtype = x_dtype
        self.sample_shape = tuple(int(d) for d in x_shape[1:])
        self._n = min(self._n_total, limit) if limit else self._n_total
        self._normalize = _Normalizer(scale, mean, std, self.sample_shape[0], path)
        self.has_labels = y is not None
        self.labels = _check_labels(y, self._n_total, path)[: self._n] if y is not None else None
        self.num_classes = int(self.labels.max()) + 1 if self.labels is not None else None

    def __len__(self) -> int:
        return self._n

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        _check_batch_size(batch_size)
        sample_bytes = int(np.prod(self.sample_shape)) * self._dtype.itemsize
        with zipfile.ZipFile(self.path) as archive, archive.open(self._x_member) as stream:
            _skip_npy_header(stream)
            for start in range(0, self._n, batch_size):
                count = min(batch_size, self._n - start)
                raw = stream.read(count * sample_bytes)
                if len(raw) != count * sample_bytes:
                    raise OnnxCpError(f"{self.path}: x is truncated (sample {start + len(raw) // sample_bytes})")
                x = np.frombuffer(raw, dtype=self._dtype).reshape((count, *self.sample_shape))
                _check_finite(x, self.path, start, "holds")
                y = self.labels[start:start + count] if self.labels is not None else None
                x = self._normalize(x.astype(np.float32))
                _check_finite(x, self.path, start, "becomes, after --scale/--mean/--std,")
                yield x, y


def _npy_header(archive: zipfile.ZipFile, member: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    with archive.open(member) as stream:
        shape, fortran, dtype = _read_header(stream, path, member)
    if fortran and len(shape) > 1:
        raise OnnxCpError(f"{path}: {Path(member).stem} is stored in Fortran order; save it C-ordered "
                          f"(np.ascontiguousarray)")
    return shape, dtype


def _read_header(stream, path: Path, member: str):
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(stream)
        return np.lib.format.read_array_header_2_0(stream)
    except ValueError as exc:
        raise OnnxCpError(f"{path}: {Path(member).stem} is not a plain numeric array ({exc})") from None


def _skip_npy_header(stream) -> None:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        np.lib.format.read_array_header_1_0(stream)
    else:
        np.lib.format.read_array_header_2_0(stream)


def _read_npy(archive: zipfile.ZipFile, member: str, path: Path) -> np.ndarray:
    with archive.open(member) as stream:
        try:
            return np.lib.format.read_array(stream, allow_pickle=False)
        except ValueError as exc:
            raise OnnxCpError(f"{path}: {Path(member).stem} is not a plain numeric array ({exc})") from None


def _check_labels(y: np.ndarray, n: int, path) -> np.ndarray:
    if y.ndim != 1 or y.shape[0] != n:
        raise OnnxCpError(f"{path}: y has shape {tuple(y.shape)}; expected ({n},), one label per sample")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise OnnxCpError(f"{path}: y holds non-integer labels (dtype {y.dtype}); expected class indices")
    elif not np.issubdtype(y.dtype, np.integer):
        raise OnnxCpError(f"{path}: y has dtype {y.dtype}; expected integer class labels")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise OnnxCpError(f"{path}: y holds a negative label ({int(y.min())}); labels must be 0, 1, ...")
    return y


# ------------------------------------------------------------------------------- image folder

class ImageFolder(Dataset):
    def __init__(self, path: Path, *, size, grayscale: bool, bgr: bool, scale: float, mean, std,
                 limit: int | None, labels: bool):
        self.path = str(path)
        self._size = size
        self._grayscale = grayscale
        self._bgr = bgr and not grayscale
        class_dirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.has_labels = labels and bool(class_dirs)
        self._items = self._labelled_items(path, class_dirs) if self.has_labels else self._unlabelled_items(path)
        if limit:
            self._items = self._items[:limit]
        first = self._load_raw(self._items[0][0])
        channels = 1 if grayscale else 3
        self.sample_shape = (channels, *first.shape[:2])
        self.num_classes = max(label for _, label in self._items) + 1 if self.has_labels else None
        if not self.has_labels:
            self.classes = None
        self._normalize = _Normalizer(scale, mean, std, channels, path)

    def _labelled_items(self, path: Path, class_dirs: list[Path]) -> list[tuple[Path, int]]:
        self.classes, labels = _class_labels(class_dirs)
        per_class = [sorted(p for p in d.rglob("*") if _is_image(p)) for d in class_dirs]
        if not any(per_class):
            raise OnnxCpError(f"{path}: no images in its {len(class_dirs)} class sub-folder(s) "
                              f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        # Round-robin over classes: a `limit` or a partial run still sees every class.
        items: list[tuple[Path, int]] = []
        for i in range(max(len(files) for files in per_class)):
            for files, label in zip(per_class, labels):
                if i < len(files):
                    items.append((files[i], label))
        return items

    @staticmethod
    def _unlabelled_items(path: Path) -> list[tuple[Path, int]]:
        files = sorted(p for p in path.rglob("*") if _is_image(p) and not _hidden(p.relative_to(path)))
        if not files:
            raise OnnxCpError(f"{path}: no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        return [(file, -1) for file in files]

    def __len__(self) -> int:
        return len(self._items)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        _check_batch_size(batch_size)
        for start in range(0, len(self._items), batch_size):
            chunk = self._items[start:start + batch_size]
            x = np.stack([self._load(file) for file, _ in chunk])
            y = np.array([label for _, label in chunk], dtype=np.int64) if self.has_labels else None
            x = self._normalize(x)
            bad = _first_nonfinite(x)
            if bad is not None:
                raise OnnxCpError(f"{chunk[bad][0]}: becomes NaN or infinity after --scale/--mean/--std")
            yield x, y

    def _load(self, file: Path) -> np.ndarray:
        pixels = self._load_raw(file)
        if pixels.shape[:2] != self.sample_shape[1:]:
            h, w = self.sample_shape[1:]
            raise OnnxCpError(f"{file}: image is {pixels.shape[0]}x{pixels.shape[1]} but the first image "
                              f"is {h}x{w}; give a size (H,W) to resize all images")
        return pixels.transpose(2, 0, 1)

    def _load_raw(self, file: Path) -> np.ndarray:
        """H x W x C float32 pixels, converted and resized, before scaling."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(file) as image:
                image = image.convert("L" if self._grayscale else "RGB")
                if self._size is not None:
                    h, w = self._size
                    image = image.resize((w, h), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32)
                if self._bgr:
                    pixels = pixels[:, :, ::-1]
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            reason = first_line(exc)
            raise OnnxCpError(f"{file}: unreadable image ({reason[:150]})") from None
        return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _class_labels(class_dirs: list[Path]) -> tuple[list[str], list[int]]:
    names = [d.name for d in class_dirs]
    if all(name.isdigit() for name in names):
        labels = [int(name) for name in names]
        if len(set(labels)) != len(labels):
            raise OnnxCpError(f"{class_dirs[0].parent}: two class folders name the same label "
                              f"({', '.join(names)})")
        classes = [""] * (max(labels) + 1)
        for name, label in zip(names, labels):
            classes[label] = name
        return classes, labels
    return names, list(range(len(names)))


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


# ----------------------------------------------------------------------------- shared helpers

class _Normalizer:
    """x * scale, then (x - mean) / std per channel."""

    def __init__(self, scale: float, mean, std, channels: int, path):
        if not np.isfinite(scale) or scale == 0:
            raise UsageError(f"scale {scale}: expected a finite, non-zero number")
        self.scale = np.float32(scale)
        self.mean = _per_channel(mean, channels, "mean", path)
        self.std = _per_channel(std, channels, "std", path)
        if self.std is not None and np.any(self.std == 0):
            raise UsageError("std: values must be non-zero")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = x * self.scale
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        return np.ascontiguousarray(x, dtype=np.float32)


def _first_nonfinite(x: np.ndarray) -> int | None:
    """The index in the batch of the first sample holding NaN or infinity (None if all are finite)."""
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        return int(np.argmin(np.isfinite(x).reshape(len(x), -1).all(axis=1)))
    return None


def _check_finite(x: np.ndarray, path, start: int, verb: str) -> None:
    """Samples with NaN/Inf would make every accuracy, loss and output error meaningless."""
    bad = _first_nonfinite(x)
    if bad is not None:
        raise OnnxCpError(f"{path}: sample {start + bad} of x {verb} NaN or infinity")


def _per_channel(values, channels: int, what: str, path) -> np.ndarray | None:
    if values is None:
        return None
    array = np.atleast_1d(np.asarray(values, dtype=np.float32))
    if not np.all(np.isfinite(array)):
        raise UsageError(f"{what}: values must be finite numbers, got {values!r}")
    if array.ndim != 1 or array.size not in (1, channels):
        raise UsageError(f"{what}: give 1 or {channels} values (the data of {path} has {channels} "
                         f"channel(s)), got {array.size}")
    return array.reshape(-1, 1, 1)


def _size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    dims = [size, size] if isinstance(size, int) else list(size)
    if len(dims) == 1:  # one number: a square
        dims = dims * 2
    if len(dims) != 2 or any(int(d) < 1 for d in dims):
        raise UsageError(f"size {size}: expected H,W (positive integers)")
    return int(dims[0]), int(dims[1])


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UsageError(f"batch size {batch_size}: expected a positive integer")


def first_inputs(data, n: int, batch_size: int = 64) -> np.ndarray:
    """The first `n` input samples (float32) of a dataset path, a Dataset, an (x, y) pair or an
    x array: what calibration and reconstruction need, without loading the rest."""
    if isinstance(data, tuple):
        data = data[0]
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data[:n], dtype=np.float32)
    dataset = open_dataset(data) if isinstance(data, (str, os.PathLike)) else data
    parts, seen = [], 0
    for x, _ in dataset.batches(batch_size):
        parts.append(x[: n - seen])
        seen += len(parts[-1])
        if seen >= n:
            break
    if not parts:
        raise OnnxCpError(f"{getattr(dataset, 'path', 'the data')}: no samples")
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
