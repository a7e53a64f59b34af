"""Output fidelity: how far a rewritten model's outputs are from the original's, judged the way the
task reads them.

One whole-tensor relative error is ruled by an output's largest values: a YOLO-style head holds box
coordinates in pixels beside class probabilities in one tensor, so the error of the boxes hides
scores that collapsed to zero. So each output is compared per channel group, every group normalised
by its own norm (a small-valued channel counts as much as a large one), and, where the output's kind
is recognisable from its shape, by what its task reads:

- class scores (N, C): top-1 agreement and top-5 overlap;
- detector heads (N, 4 + K, A) or (N, A, 4 + K) with many anchors A: box rows and class-score rows as
  two groups, and the share of the original's top-10 anchors (by best class score) that stay top-10;
- sequences (N, T, C) or (T, N, C): greedy CTC decoding (blank 0) and the share of strings unchanged;
- maps (N, C, H, W): per channel, and the IoU of the maps thresholded at half their original range.

Pure numpy: verification, reports, budgets and searches all use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

CLASS_SCORES, DETECTIONS, SEQUENCE, MAP, OTHER = "class scores", "detections", "sequence", "map", "other"
BOX_ROWS = 4
TOP_ANCHORS = 10
MIN_ANCHORS_PER_ROW = 4  # a detector head has many more anchors than rows (YOLOv8n at 320: 84 x 2100)
# A channel whose norm is below this share of the output's mean channel norm is judged against that
# floor, so that near-silent channels do not turn rounding noise into huge relative errors.
CHANNEL_FLOOR = 1e-3


@dataclass(frozen=True)
class OutputFidelity:
    """The comparison of one output. `worst_group_error` is the headline: the largest relative error
    of any channel group, each normalised by its own norm."""

    name: str
    kind: str
    rel_error: float  # whole tensor, ||a - b|| / ||a||
    worst_group_error: float
    group_errors: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)  # task agreements in [0, 1]

    def to_json(self) -> dict:
        return {"kind": self.kind, "rel_error": self.rel_error, "worst_group_error": self.worst_group_error,
                "group_errors": self.group_errors, "agreement": self.agreement}


def output_kind(shape: Sequence[int], values: np.ndarray | None = None) -> tuple[str, int | None]:
    """The kind of an output from its shape, and its channel axis (None when it has none).

    A 3-D shape alone cannot tell a detector head (N, 4 + K, A) from a CTC sequence (N, T, C) with
    few time steps and many classes (a CRNN's (N, 32, 8210)), so with `values` a head must also
    look like one: class scores within [0, 1], box coordinates beyond it (pixels)."""
    shape = tuple(shape)
    if len(shape) == 2:
        return CLASS_SCORES, 1
    if len(shape) == 4:
        return MAP, 1
    if len(shape) == 3:
        rows, cols = shape[1], shape[2]
        for axis, (boxes_and_scores, anchors) in ((1, (rows, cols)), (2, (cols, rows))):
            if boxes_and_scores > BOX_ROWS and anchors >= MIN_ANCHORS_PER_ROW * boxes_and_scores \
                    and (values is None or _looks_like_head(values, axis)):
                return DETECTIONS, axis
        return SEQUENCE, 2
    return OTHER, (1 if len(shape) > 1 else None)


def _looks_like_head(values: np.ndarray, axis: int) -> bool:
    rows = np.moveaxis(values, axis, 0)
    scores, boxes = rows[BOX_ROWS:], rows[:BOX_ROWS]
    return bool(scores.min() >= 0 and scores.max() <= 1 and np.abs(boxes).max() > 1)


def compare_output(name: str, expected: np.ndarray, actual: np.ndarray) -> OutputFidelity:
    a = np.asarray(expected, np.float64)
    b = np.asarray(actual, np.float64)
    kind, axis = output_kind(a.shape, a)
    groups = _group_errors(a, b, kind, axis)
    agreement = _agreement(a, b, kind, axis)
    return OutputFidelity(name, kind, _relative(a, b), max(groups.values(), default=_relative(a, b)), groups,
                          agreement)


def _relative(a: np.ndarray, b: np.ndarray, floor: float = 0.0) -> float:
    norm = max(float(np.linalg.norm(a)), floor)
    if norm == 0:
        return 0.0 if not np.any(b) else float("inf")
    return float(np.linalg.norm(a - b)) / norm


def _group_errors(a: np.ndarray, b: np.ndarray, kind: str, axis: int | None) -> dict[str, float]:
    if axis is None or a.size == 0:
        return {}
    a, b = np.moveaxis(a, axis, 0), np.moveaxis(b, axis, 0)
    if kind == DETECTIONS:
        return {"boxes": _relative(a[:BOX_ROWS], b[:BOX_ROWS]),
                "class scores": _relative(a[BOX_ROWS:], b[BOX_ROWS:])}
    if kind in (CLASS_SCORES, SEQUENCE):
        return {"all": _relative(a, b)}  # one softmax-like group: the class axis is compared whole
    norms = np.sqrt((a.reshape(len(a), -1) ** 2).sum(axis=1))
    floor = CHANNEL_FLOOR * float(norms.mean()) if norms.size else 0.0
    errors = [_relative(ac, bc, floor) for ac, bc in zip(a, b)]
    worst = int(np.argmax(errors))
    return {"mean channel": float(np.mean(errors)), f"channel {worst}": errors[worst]}


def _agreement(a: np.ndarray, b: np.ndarray, kind: str, axis: int | None) -> dict[str, float]:
    if a.size == 0:
        return {}
    if kind == CLASS_SCORES:
        return {"top1": float(np.mean(a.argmax(1) == b.argmax(1))), "top5 overlap": _topk_overlap(a, b, 5)}
    if kind == DETECTIONS:
        scores_a = np.moveaxis(a, axis, 1)[:, BOX_ROWS:].max(axis=1)  # (N, anchors): best class score
        scores_b = np.moveaxis(b, axis, 1)[:, BOX_ROWS:].max(axis=1)
        return {f"top{TOP_ANCHORS} anchors": _topk_overlap(scores_a, scores_b, TOP_ANCHORS)}
    if kind == SEQUENCE:
        return {"strings": float(np.mean([x == y for x, y in zip(ctc_greedy(a), ctc_greedy(b))]))}
    if kind == MAP:
        threshold = 0.5 * (a.min() + a.max())
        return {"map IoU": _iou(a > threshold, b > threshold)}
    return {}


def _topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """The mean share of each row's top-k entries in `a` that are top-k in `b` too."""
    k = min(k, a.shape[1])
    top_a = np.argpartition(-a, k - 1, axis=1)[:, :k]
    top_b = np.argpartition(-b, k - 1, axis=1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(top_a, top_b)]))


def ctc_greedy(scores: np.ndarray, blank: int = 0) -> list[tuple[int, ...]]:
    """Greedy CTC decoding of (N, T, C) scores (or (T, N, C) when axis 1 is the batch of 1 and
    axis 0 is longer): best class per step, repeats merged, blanks dropped."""
    if scores.shape[1] == 1 and scores.shape[0] > 1:
        scores = np.swapaxes(scores, 0, 1)  # (T, 1, C) -> (1, T, C)
    strings = []
    for best in scores.argmax(axis=2):
        merged = [c for i, c in enumerate(best) if i == 0 or c != best[i - 1]]
        strings.append(tuple(int(c) for c in merged if c != blank))
    return strings


def _iou(x: np.ndarray, y: np.ndarray) -> float:
    union = np.logical_or(x, y).sum()
    return float(np.logical_and(x, y).sum() / union) if union else 1.0
