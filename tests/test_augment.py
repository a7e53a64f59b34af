"""Consistent augmentation for distillation (onnx_cp.finetune.augment): random views of image inputs,
relabelled by the teacher every epoch."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from test_distill import SGD, classifier, detector_model, group_errors, images, outputs, perturbed  # noqa: F401 - images is a fixture

from onnx_cp.errors import UsageError
from onnx_cp.finetune import distributed, finetune
from onnx_cp.finetune.augment import MIXED_AUGMENTATION, Augmentation, augmentation_for, augmented, spatial_axes
from onnx_cp.finetune.train import _prepare_data, _Views

SHIFT_ONLY = Augmentation(max_shift=0.25, contrast=0.0, brightness=0.0)


@pytest.mark.parametrize("shape, axes", [((3, 16, 16), (1, 2)), ((1, 24, 24), (1, 2)), ((16, 20, 20), (1, 2)),
                                         ((32, 32, 3), (0, 1)), ((64, 256, 1), (0, 1)),
                                         ((8,), None), ((32, 8210), None), ((3, 4, 4), None)])
def test_the_spatial_axes_of_an_input_are_found_in_either_layout(shape, axes):
    assert spatial_axes(shape) == axes


def test_a_shifted_view_is_each_sample_moved_whole_with_its_edges_repeated():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 2, 8, 12)).astype(np.float32)
    out = augmented(x, SHIFT_ONLY, np.random.default_rng(1))
    assert out.shape == x.shape and out.dtype == np.float32
    padded = np.pad(x, [(0, 0), (0, 0), (2, 2), (3, 3)], mode="edge")  # 25% of 8 and of 12
    moved = 0
    for i in range(len(x)):
        windows = [(dy, dx) for dy in range(5) for dx in range(7)
                   if np.allclose(out[i], padded[i, :, dy:dy + 8, dx:dx + 12], atol=1e-6)]
        assert windows, f"sample {i} is not a shifted copy of itself"
        moved += windows[0] != (2, 3)
    assert moved >= 4  # random offsets, not the identity


def test_contrast_and_brightness_keep_a_sample_affine_to_itself_and_the_views_are_seeded():
    x = np.random.default_rng(0).standard_normal((4, 1, 16, 16)).astype(np.float32)
    jitter = Augmentation(max_shift=0.0, contrast=0.2, brightness=0.1)
    out = augmented(x, jitter, np.random.default_rng(3))
    for i in range(len(x)):
        slope, intercept = np.polyfit(x[i].ravel(), out[i].ravel(), 1)
        assert 0.8 - 1e-4 <= slope <= 1.2 + 1e-4
        np.testing.assert_allclose(out[i].ravel(), slope * x[i].ravel() + intercept, atol=1e-4)
    np.testing.assert_array_equal(out, augmented(x, jitter, np.random.default_rng(3)))
    assert not np.array_equal(out, augmented(x, jitter, np.random.default_rng(4)))


def test_a_zoomed_view_of_a_ramp_is_the_ramp_scaled_about_its_centre_with_edges_repeated():
    width = 33
    x = np.broadcast_to(np.arange(width, dtype=np.float32), (6, 1, 12, width)).copy()
    zoom = Augmentation(max_shift=0.0, contrast=0.0, brightness=0.0, zoom=0.25)
    out = augmented(x, zoom, np.random.default_rng(2))
    centre = (width - 1) / 2
    factors = []
    for i in range(len(x)):
        assert np.allclose(out[i], out[i, :, :1])  # constant down the columns stays constant
        row = out[i, 0, 0]
        factor = 1 / np.polyfit(np.arange(13, 20), row[13:20], 1)[0]  # the slope near the centre
        expected = np.clip((np.arange(width) - centre) / factor + centre, 0, width - 1)
        np.testing.assert_allclose(row, expected, atol=1e-3)
        factors.append(factor)
    assert all(0.75 - 1e-3 <= f <= 1.25 + 1e-3 for f in factors) and np.ptp(factors) > 0.05


def test_mixed_views_blend_each_sample_with_another_sample():
    x = np.random.default_rng(0).standard_normal((8, 3, 10, 10)).astype(np.float32)
    mix_all = Augmentation(max_shift=0.0, contrast=0.0, brightness=0.0, mix=1.0)
    out = augmented(x, mix_all, np.random.default_rng(5))
    for i in range(len(x)):
        fits = []
        for j in range(len(x)):
            if j != i:  # out_i - x_j = l (x_i - x_j)
                d, t = (x[i] - x[j]).ravel(), (out[i] - x[j]).ravel()
                share = float(d @ t / (d @ d))
                fits.append((np.abs(share * d - t).max(), share))
        residual, share = min(fits)
        assert residual < 1e-4 and -1e-6 <= share <= 1 + 1e-6
    assert "mixup" in MIXED_AUGMENTATION.describe()


def test_auto_augments_only_images_that_a_teacher_relabels():
    assert augmentation_for("auto", (3, 16, 16), distilling=True) is not None
    assert augmentation_for("auto", (3, 16, 16), distilling=False) is None  # labels do not follow a shift
    assert augmentation_for("auto", (32, 8210), distilling=True) is None
    assert augmentation_for("none", (3, 16, 16), distilling=True) is None
    assert augmentation_for("mix", (3, 16, 16), distilling=True) == MIXED_AUGMENTATION
    with pytest.raises(UsageError, match="not an image"):
        augmentation_for("shift", (8,), distilling=True)
    with pytest.raises(UsageError, match="no teacher"):
        augmentation_for("shift", (3, 16, 16), distilling=False)
    with pytest.raises(UsageError, match="expected one of"):
        augmentation_for("flip", (3, 16, 16), distilling=True)


@pytest.mark.parametrize("make", [detector_model, lambda: classifier(1)], ids=["detector", "fixed-batch-1"])
def test_each_epochs_targets_are_the_teachers_outputs_on_that_epochs_views(images, make):  # noqa: F811
    xt, _ = images
    teacher = make()
    world = distributed.World()
    data = _prepare_data(ir.from_proto(teacher), "x", xt[:40], None, teacher, world)
    views = _Views(data, augmentation_for("auto", xt.shape[1:], distilling=True), seed=0)
    x1, _, rows1, targets1 = views.of_epoch(1)
    x2, _, _, _ = views.of_epoch(2)
    assert not np.allclose(x1, xt[:40]) and not np.allclose(x1, x2)  # fresh views every epoch
    expected = outputs(teacher, x1[rows1])
    name = next(iter(expected))
    np.testing.assert_allclose(targets1[0], expected[name], rtol=1e-4, atol=1e-5)
    assert views.of_epoch(2)[0] is x2  # the probe trains epoch 1 once per rate: a view is made once


def test_distillation_on_views_reports_them_and_still_recovers_the_teacher(images):  # noqa: F811
    xt, xv = images
    teacher = detector_model()
    student = perturbed(teacher, {"conv1.w", "head.w"}, scale=1.5)
    before = group_errors(teacher, student, xv)["output0"]
    result = finetune(student, xt, val=xv, teacher=teacher, lr=0.03, epochs=6, batch_size=16)  # AdamW
    after = group_errors(teacher, result.model, xv)["output0"]
    assert result.augmentation and "shift" in result.augmentation
    assert after["class scores"] < 0.5 * before["class scores"] and after["boxes"] < before["boxes"]
    plain = finetune(student, xt, val=xv, teacher=teacher, **{**SGD, "epochs": 1}, augment="none")
    assert plain.augmentation is None
