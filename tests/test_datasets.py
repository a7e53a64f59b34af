"""open_dataset: npz files and image folders, preprocessing, and one-line errors on bad data."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from onnx_cp.data import Dataset, open_dataset
from onnx_cp.errors import OnnxCpError, UsageError


def _npz(path, compressed=False, **arrays):
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def _collect(dataset, batch_size):
    xs, ys = zip(*dataset.batches(batch_size))
    return np.concatenate(xs), (np.concatenate(ys) if ys[0] is not None else None)


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streams_exact_values_in_batches(tmp_path, compressed):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((23, 2, 5, 4)).astype(np.float32)
    y = rng.integers(0, 7, 23)
    data = open_dataset(_npz(tmp_path / "d.npz", compressed, x=x, y=y))
    assert isinstance(data, Dataset)
    assert len(data) == 23 and data.sample_shape == (2, 5, 4)
    assert data.has_labels and data.num_classes == int(y.max()) + 1
    sizes = [len(bx) for bx, _ in data.batches(10)]
    assert sizes == [10, 10, 3]
    got_x, got_y = _collect(data, 10)
    assert got_x.dtype == np.float32 and got_y.dtype == np.int64
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    # batches() can be called again (a new pass over the data)
    np.testing.assert_array_equal(_collect(data, 4)[0], x)


def test_npz_without_labels_limit_and_normalisation(tmp_path):
    x = np.arange(2 * 3 * 2 * 2, dtype=np.float64).reshape(2, 3, 2, 2)
    data = open_dataset(_npz(tmp_path / "d.npz", x=x), scale=2.0, mean=[1, 2, 3], std=0.5,
                        limit=1)
    assert not data.has_labels and data.num_classes is None and len(data) == 1
    got_x, got_y = _collect(data, 8)
    assert got_y is None
    expected = (x[:1] * 2 - np.array([1, 2, 3]).reshape(3, 1, 1)) / 0.5
    np.testing.assert_allclose(got_x, expected.astype(np.float32))


def test_float_labels_with_integer_values_are_accepted(tmp_path):
    data = open_dataset(_npz(tmp_path / "d.npz", x=np.zeros((3, 1, 2, 2), np.float32),
                             y=np.array([0.0, 2.0, 1.0])))
    np.testing.assert_array_equal(_collect(data, 2)[1], [0, 2, 1])


def _image(path, size=(6, 4), color=(10, 20, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)  # PIL sizes are (width, height)
    return path


def test_image_folder_labels_order_and_preprocessing(tmp_path):
    for cls, n in (("cat", 3), ("dog", 1), ("eel", 2)):
        for i in range(n):
            _image(tmp_path / cls / f"{i}.png", color=(10 * i, 100, 200))
    data = open_dataset(tmp_path)
    assert data.classes == ["cat", "dog", "eel"] and data.num_classes == 3
    assert len(data) == 6 and data.sample_shape == (3, 4, 6)
    x, y = _collect(data, 4)
    assert list(y) == [0, 1, 2, 0, 2, 0]  # round robin over classes
    np.testing.assert_allclose(x[0, :, 0, 0], np.array([0, 100, 200]) / 255, rtol=1e-6)
    # limit keeps every class; size, grayscale, mean / std
    small = open_dataset(tmp_path, limit=3, size=(8, 5), grayscale=True, mean=0.5, std=0.25)
    x, y = _collect(small, 2)
    assert list(y) == [0, 1, 2] and x.shape == (3, 1, 8, 5) and small.sample_shape == (1, 8, 5)
    gray = Image.new("RGB", (1, 1), (0, 100, 200)).convert("L").getpixel((0, 0))
    np.testing.assert_allclose(x[0, 0, 0, 0], (gray / 255 - 0.5) / 0.25, rtol=1e-5)


def test_numeric_class_folders_are_their_own_labels(tmp_path):
    for cls in ("2", "10", "0"):
        _image(tmp_path / cls / "a.png", mode="L", color=7)
    data = open_dataset(tmp_path, grayscale=True, scale=1.0)
    assert data.num_classes == 11
    assert sorted(_collect(data, 8)[1]) == [0, 2, 10]
    assert _collect(data, 8)[0].max() == 7


def _bad_npz(tmp_path, case):
    path = tmp_path / "bad.npz"
    x = np.zeros((4, 1, 3, 3), np.float32)
    arrays = {
        "missing x": {"images": x, "y": np.zeros(4, int)},
        "wrong shape": {"x": np.zeros((4, 9), np.float32)},
        "wrong dtype": {"x": x.astype(np.uint8)},
        "no samples": {"x": np.zeros((0, 1, 3, 3), np.float32)},
        "label count": {"x": x, "y": np.zeros(3, int)},
        "2-d labels": {"x": x, "y": np.zeros((4, 2), int)},
        "non-integer labels": {"x": x, "y": np.array([0, 1.5, 2, 3])},
        "string labels": {"x": x, "y": np.array(["a", "b", "c", "d"])},
        "negative labels": {"x": x, "y": np.array([0, -1, 2, 3])},
    }[case]
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case, message", [
    ("missing x", "no array 'x'.*found: images, y"),
    ("wrong shape", r"shape \(4, 9\); expected \(N, C, H, W\)"),
    ("wrong dtype", "dtype uint8; expected float32"),
    ("no samples", "no samples"),
    ("label count", "one label per sample"),
    ("2-d labels", "one label per sample"),
    ("non-integer labels", "non-integer labels"),
    ("string labels", "expected integer class labels"),
    ("negative labels", "negative label"),
])
def test_bad_npz_one_line_errors(tmp_path, case, message):
    with pytest.raises(OnnxCpError, match=message) as err:
        open_dataset(_bad_npz(tmp_path, case))
    assert "\n" not in str(err.value)


def test_bad_paths_and_folders(tmp_path):
    with pytest.raises(OnnxCpError, match="no such file"):
        open_dataset(tmp_path / "missing.npz")
    (tmp_path / "not.npz").write_text("hello")
    with pytest.raises(OnnxCpError, match="not a readable .npz"):
        open_dataset(tmp_path / "not.npz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OnnxCpError, match="no images"):
        open_dataset(empty)
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(OnnxCpError, match="no images"):
        open_dataset(tmp_path / "noimg")


def test_unreadable_and_mismatched_images(tmp_path):
    _image(tmp_path / "a" / "0.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "0.png").write_bytes(b"not a png")
    data = open_dataset(tmp_path)
    with pytest.raises(OnnxCpError, match=r"0.png: unreadable image"):
        _collect(data, 4)
    (tmp_path / "b" / "0.png").unlink()
    _image(tmp_path / "b" / "0.png", size=(9, 9))
    with pytest.raises(OnnxCpError, match="give a size"):
        _collect(open_dataset(tmp_path), 4)
    assert _collect(open_dataset(tmp_path, size=5), 4)[0].shape == (2, 3, 5, 5)


@pytest.mark.parametrize("kwargs, message", [
    ({"mean": [1, 2]}, "mean: give 1 or 3"),
    ({"std": [0, 1, 1]}, "non-zero"),
    ({"scale": 0}, "scale"),
    ({"size": (0, 4)}, "size"),
    ({"limit": 0}, "limit"),
])
def test_bad_preprocessing_options(tmp_path, kwargs, message):
    _image(tmp_path / "a" / "0.png")
    with pytest.raises(UsageError, match=message):
        open_dataset(tmp_path, **kwargs)


def test_image_options_refused_for_npz(tmp_path):
    path = _npz(tmp_path / "d.npz", x=np.zeros((1, 1, 2, 2), np.float32))
    with pytest.raises(UsageError, match="image folders"):
        open_dataset(path, grayscale=True)


def test_flat_folder_is_unlabelled_samples(tmp_path):
    for i in range(3):
        _image(tmp_path / f"{i}.png", color=(i, 0, 0))
    _image(tmp_path / ".hidden" / "x.png")  # hidden folders are not data
    data = open_dataset(tmp_path)
    assert not data.has_labels and data.num_classes is None and len(data) == 3
    x, y = _collect(data, 2)
    assert y is None
    np.testing.assert_allclose(x[:, 0, 0, 0], np.array([0, 1, 2]) / 255, rtol=1e-6)


def test_labels_false_reads_a_class_folder_as_samples(tmp_path):
    """Photos in one sub-folder are samples, not class 0, when labels are not wanted (distillation)."""
    for i in range(2):
        _image(tmp_path / "photos" / f"{i}.png")
    assert open_dataset(tmp_path).has_labels
    data = open_dataset(tmp_path, labels=False)
    assert not data.has_labels and len(data) == 2
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 1, 2, 2), np.float32), y=np.array([0, 1]))
    assert not open_dataset(tmp_path / "d.npz", labels=False).has_labels


def test_bgr_channel_order(tmp_path):
    _image(tmp_path / "a" / "0.png", color=(10, 20, 30))
    ((x, _),) = open_dataset(tmp_path, channel_order="bgr", scale=1.0).batches(1)
    assert list(x[0, :, 0, 0]) == [30, 20, 10]
    with pytest.raises(UsageError, match="channel_order"):
        open_dataset(tmp_path, channel_order="rbg")
