"""The check every INT8 model passes before it is returned: its outputs against the float model's
on the calibration samples, judged per channel group and by task agreement (runtime.fidelity).

A whole-tensor error hides broken heads (YOLOv8n with every class score at 0 read 0.037), so
the check reads the worst channel group of every output (class scores apart from boxes) and the
task agreements (top-1, top-10 anchors, CTC strings, map IoU). A model that fails is an error,
not a result: nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnx_cp.errors import OnnxCpError
from onnx_cp.measure.outputs import ReferenceOutputs
from onnx_cp.runtime.model_io import ModelLike
from onnx_cp.settings import DEFAULT_INT8_MAX_ERROR

# Measured on 256 calibration samples: INT8 moves charnet's logits by 0.017 (worst group),
# models/charnet-cp.onnx's by 0.06-0.08; NudeNet's YOLOv8n class scores by 1.0 with one scale for
# its head, 0.41 with the float tail, and under 0.15 with its most sensitive layers float too.
DEFAULT_MAX_OUTPUT_ERROR = DEFAULT_INT8_MAX_ERROR
# 8 of the top-10 anchors for detectors, and as much of every task's headline agreement. Top-5
# overlap is not one: the order of unlikely classes moves (0.79 on charnet-cp, top-1 0.96).
MIN_AGREEMENT = 0.8
HEADLINE_AGREEMENTS = ("top1", "top10 anchors", "strings", "map IoU")


@dataclass(frozen=True)
class Int8Check:
    """How the INT8 model's outputs compared with the float model's on `samples` calibration inputs."""

    samples: int
    worst_group_error: float
    worst_group: str  # "output: group"
    agreement: dict[str, float] = field(default_factory=dict)  # "output: agreement" -> share in [0, 1]
    max_output_error: float = DEFAULT_MAX_OUTPUT_ERROR

    def to_json(self) -> dict:
        return {"samples": self.samples, "worst_group_error": round(self.worst_group_error, 5),
                "worst_group": self.worst_group, "agreement": {k: round(v, 4) for k, v in self.agreement.items()},
                "max_output_error": self.max_output_error}

    def shortfall(self) -> float:
        """How far the model is from passing, as one number: the largest of the worst group error over
        its limit and each headline agreement's loss over the loss allowed (1.0 or less passes)."""
        losses = [(1.0 - share) / (1.0 - MIN_AGREEMENT) for share in self.agreement.values()]
        shortfall = max([self.worst_group_error / self.max_output_error, *losses])
        return shortfall if np.isfinite(shortfall) else np.inf  # NaN outputs are as far off as it gets

    def failures(self) -> list[str]:
        found = []
        if not self.worst_group_error <= self.max_output_error:  # NaN fails too
            found.append(f"{self.worst_group} moved by {self.worst_group_error:.3g} "
                         f"(worst channel group; limit {self.max_output_error:g})")
        found += [f"{name} {share:.2f} (at least {MIN_AGREEMENT:g})"
                  for name, share in self.agreement.items() if not share >= MIN_AGREEMENT]
        return found


def check_against(expected: ReferenceOutputs, quantized: ModelLike,
                  max_output_error: float = DEFAULT_MAX_OUTPUT_ERROR) -> Int8Check:
    """Compare `quantized` with the reference outputs `expected` (computed once: the mixed-precision
    search checks many models against them; see Int8Check.failures)."""
    agreement = expected.compare(quantized)
    worst_group, worst = "", 0.0
    shares: dict[str, float] = {}
    for output in agreement.outputs:
        for group, error in output.group_errors.items():
            if not error <= worst:
                worst_group, worst = f"{output.name}: {group}", error
        shares.update({f"{output.name}: {k}": v for k, v in output.agreement.items() if k in HEADLINE_AGREEMENTS})
    return Int8Check(agreement.samples, worst, worst_group, shares, max_output_error)


def raise_if_broken(check: Int8Check, float_nodes: int) -> None:
    """One line naming what moved, when `check` failed even with `float_nodes` nodes kept float."""
    if check.failures():
        raise OnnxCpError(f"INT8 broke the model on {check.samples} calibration samples "
                          f"({float_nodes} node(s) kept float): " + "; ".join(check.failures())
                          + "; nothing written (a larger --int8-max-error accepts more)")
