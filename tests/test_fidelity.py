"""Output fidelity judges outputs the way their task reads them (runtime.fidelity)."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_cp.runtime.fidelity import (
    CLASS_SCORES,
    DETECTIONS,
    MAP,
    SEQUENCE,
    compare_output,
    ctc_greedy,
    output_kind,
)


def yolo_head(rng, anchors=2100, classes=80) -> np.ndarray:
    """(1, 4 + K, A): pixel boxes beside class probabilities, as YOLOv8 exports them."""
    boxes = rng.uniform(0, 640, (1, 4, anchors))
    scores = rng.uniform(0, 0.05, (1, classes, anchors))
    scores[0, 3, rng.choice(anchors, 12, replace=False)] = rng.uniform(0.6, 0.9, 12)  # a few detections
    return np.concatenate([boxes, scores], axis=1)


@pytest.mark.parametrize(("shape", "kind", "axis"), [
    ((8, 36), CLASS_SCORES, 1), ((1, 84, 8400), DETECTIONS, 1), ((1, 25200, 85), DETECTIONS, 2),
    ((1, 40, 97), SEQUENCE, 2), ((40, 1, 97), SEQUENCE, 2), ((1, 1, 160, 160), MAP, 1),
])
def test_output_kinds_from_shapes(shape, kind, axis):
    assert output_kind(shape) == (kind, axis)


def test_collapsed_detector_scores_are_not_hidden_by_the_boxes():
    rng = np.random.default_rng(0)
    head = yolo_head(rng)
    collapsed = head.copy()
    collapsed[:, 4:] = 0.05  # every class score flattened, boxes untouched
    result = compare_output("output0", head, collapsed)
    assert result.kind == DETECTIONS
    assert result.rel_error < 0.05  # what a whole-tensor error reports
    assert result.group_errors["class scores"] > 0.5 and result.worst_group_error > 0.5
    assert result.agreement["top10 anchors"] < 0.5


def test_a_faithful_detector_keeps_its_anchors():
    rng = np.random.default_rng(1)
    head = yolo_head(rng)
    noisy = head * (1 + 1e-4 * rng.standard_normal(head.shape))
    result = compare_output("output0", head, noisy)
    assert result.worst_group_error < 1e-3 and result.agreement["top10 anchors"] == 1.0


def test_class_scores_agreement():
    scores = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    swapped = np.array([[0.1, 0.9, 0.0], [0.1, 0.8, 0.1]])
    result = compare_output("logits", scores, swapped)
    assert result.agreement["top1"] == 0.5


def test_greedy_ctc_merges_repeats_and_drops_blanks_in_both_layouts():
    steps = [1, 1, 0, 1, 2, 2, 0, 0, 3]  # -> 1 1 2 3
    scores = np.eye(4)[steps][None]  # (1, T, C)
    assert ctc_greedy(scores) == [(1, 1, 2, 3)]
    assert ctc_greedy(np.swapaxes(scores, 0, 1)) == [(1, 1, 2, 3)]  # (T, 1, C)
    other = scores.copy()
    other[0, 8] = np.eye(4)[2]
    assert compare_output("probs", scores, other).agreement["strings"] == 0.0


def test_small_map_channels_count_as_much_as_large_ones():
    rng = np.random.default_rng(2)
    maps = np.stack([1000 * rng.random((16, 16)), rng.random((16, 16))])[None]  # (1, 2, 16, 16)
    broken = maps.copy()
    broken[0, 1] = 0  # the small channel is lost
    result = compare_output("maps", maps, broken)
    assert result.rel_error < 0.01
    assert result.group_errors["channel 1"] == pytest.approx(1.0) and result.worst_group_error == pytest.approx(1.0)


def test_a_ctc_sequence_with_many_classes_is_not_read_as_a_detector_head():
    """(N, T, C) with few time steps and many classes has a detector head's shape; its values (logits,
    or probabilities everywhere) are not a head's (pixel boxes beside scores in [0, 1])."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 8, 400)) * 4
    assert output_kind(logits.shape) == (DETECTIONS, 1)  # the shape alone is ambiguous
    assert output_kind(logits.shape, logits) == (SEQUENCE, 2)
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert output_kind(probabilities.shape, probabilities) == (SEQUENCE, 2)
    stacked = np.moveaxis(logits, 0, 1).repeat(50, axis=1)  # (T, N, C) with N stacked samples
    assert output_kind(stacked.shape, stacked) == (SEQUENCE, 2)
    head = np.concatenate([rng.uniform(0, 320, (3, 4, 400)), rng.uniform(0, 1, (3, 18, 400))], axis=1)
    assert output_kind(head.shape, head) == (DETECTIONS, 1)
    assert output_kind(head.transpose(0, 2, 1).shape, head.transpose(0, 2, 1)) == (DETECTIONS, 2)
    fidelity = compare_output("seq", logits, logits + 0.01)
    assert fidelity.kind == SEQUENCE and fidelity.agreement["strings"] == 1.0
