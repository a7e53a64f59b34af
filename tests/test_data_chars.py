"""The synthetic character generator and `onnx-cp data chars`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from onnx_cp.cli import main
from onnx_cp.data import chars
from onnx_cp.errors import UsageError

LOW = (0.0 - chars.PIXEL_MEAN) / chars.PIXEL_STD
HIGH = (1.0 - chars.PIXEL_MEAN) / chars.PIXEL_STD


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, np.ndarray]:
    return chars.generate_chars(360, seed=7, split="train", workers=1)


def test_shapes_dtypes_and_documented_range(sample):
    x, y = sample
    assert x.shape == (360, 1, 24, 24) and x.dtype == np.float32
    assert y.shape == (360,) and y.dtype == np.int64
    assert x.min() >= LOW - 1e-6 and x.max() <= HIGH + 1e-6
    pixels = x * chars.PIXEL_STD + chars.PIXEL_MEAN
    # the documented normalisation makes the data roughly zero-mean, unit-variance
    assert abs(float(x.mean())) < 0.25 and 0.7 < float(x.std()) < 1.4
    assert 0.35 < float(pixels.mean()) < 0.65


def test_all_36_classes_balanced(sample):
    _, y = sample
    assert np.bincount(y, minlength=36).tolist() == [10] * 36
    _, y_odd = chars.generate_chars(100, seed=1, split="val", workers=1)
    counts = np.bincount(y_odd, minlength=36)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 100


def test_images_are_not_blank_and_differ(sample):
    x, _ = sample
    per_image_std = x.reshape(len(x), -1).std(axis=1)
    assert np.median(per_image_std) > 0.3  # a glyph with contrast, not a flat background
    assert len({img.tobytes() for img in x}) == len(x)


def test_deterministic_and_seeded():
    a = chars.generate_chars(50, seed=3, split="test", workers=1)
    b = chars.generate_chars(50, seed=3, split="test", workers=1)
    c = chars.generate_chars(50, seed=4, split="test", workers=1)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_same_seed_different_splits_differ():
    train = chars.generate_chars(40, seed=0, split="train", workers=1)
    val = chars.generate_chars(40, seed=0, split="val", workers=1)
    assert not np.array_equal(train[0], val[0])
    assert not np.array_equal(train[1], val[1])


def test_output_does_not_depend_on_worker_count(monkeypatch):
    monkeypatch.setattr(chars, "_CHUNK", 16)
    monkeypatch.setattr(chars, "_PARALLEL_MIN", 32)
    serial = chars.generate_chars(48, seed=5, split="val", workers=1)
    parallel = chars.generate_chars(48, seed=5, split="val", workers=2)
    assert np.array_equal(serial[0], parallel[0]) and np.array_equal(serial[1], parallel[1])


def test_splits_use_disjoint_fonts():
    fonts = {split: set(chars.split_fonts(split)) for split in chars.SPLITS}
    assert all(fonts.values())
    assert not fonts["train"] & fonts["val"]
    assert not fonts["train"] & fonts["test"]
    assert not fonts["val"] & fonts["test"]
    assert set().union(*fonts.values()) == set(chars.available_fonts())
    assert len(fonts["train"]) >= 20 and len(fonts["test"]) >= 5


def _ink(font, text: str) -> bytes:
    img = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(img).text((8, 8), text, font=font, fill=255)
    return img.tobytes()


def test_every_font_draws_every_character():
    """A font lacking a glyph would draw its 'missing' box: the class would be noise."""
    for name, path in chars.available_fonts().items():
        font = chars._font(path, 40)
        missing = _ink(font, "\ue000")  # private-use code point: no font maps it
        drawn = [_ink(font, c) for c in chars._ALNUM]
        assert all(ink != missing and any(ink) for ink in drawn), name


def test_bundled_fonts_are_small_and_licensed():
    folder = Path(chars.__file__).parent / "fonts"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 3_000_000
    for family in (p for p in folder.iterdir() if p.is_dir()):
        names = [p.name.lower() for p in family.iterdir()]
        assert any("licen" in n or "ofl" in n or "apache" in n for n in names), family.name


def test_bad_arguments_raise_usage_errors():
    with pytest.raises(UsageError, match="split"):
        chars.generate_chars(10, seed=0, split="holdout")
    with pytest.raises(UsageError):
        chars.generate_chars(-1, seed=0)


def test_cli_writes_the_generated_data(tmp_path, capsys):
    out = tmp_path / "test.npz"
    code = main(["data", "chars", "--n", "36", "--seed", "2", "--split", "test",
                 "--out", str(out), "--workers", "1"])
    assert code == 0 and out.exists()
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed into place
    with np.load(out) as data:
        assert set(data.files) == {"x", "y"}
        x_expected, y_expected = chars.generate_chars(36, seed=2, split="test", workers=1)
        assert np.array_equal(data["x"], x_expected) and np.array_equal(data["y"], y_expected)
    assert "wrote" in capsys.readouterr().out


def test_cli_data_opens_with_the_harness_reader(tmp_path):
    from onnx_cp.data import open_dataset

    out = tmp_path / "val.npz"
    assert main(["data", "chars", "--n", "20", "--split", "val", "--out", str(out), "-q"]) == 0
    dataset = open_dataset(out)
    assert len(dataset) == 20 and dataset.has_labels
    xb, yb = next(dataset.batches(8))
    assert xb.shape == (8, 1, 24, 24) and yb.dtype == np.int64


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "chars", "--n", "0", "--out", str(tmp_path / "a.npz")]) == 2
    assert main(["data", "chars", "--n", "5", "--out", str(tmp_path / "no" / "a.npz")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("onnx-cp data: error:") for line in err)
