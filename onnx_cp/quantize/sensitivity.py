"""Which compute nodes INT8 hurts most: the order in which they are kept float when a quantized
model misses its output-error budget.

INT8 error does not come evenly from every layer, and where it enters is not where it shows: on
NudeNet's YOLOv8n, the head's class-branch convs add the most error to their own outputs, yet
keeping them float leaves the class scores as far off (0.19); keeping model.2's first 1x1 conv
float (its input is an early, high-resolution SiLU output) takes them to 0.15 alone. So the order is
measured at the outputs: each candidate alone is kept float and the quantized model checked on a
few samples (rank_by_measured_gain). A local estimate picks the candidates when a model has more
than can be scanned: the float and the QDQ model are run side by side, and each compute node is
charged with the relative error its output gains over its input (rank_by_added_error).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnx_cp.progress import progress
from onnx_cp.quantize.mixed import COMPUTE_OPS
from onnx_cp.runtime.inputs import model_batches
from onnx_cp.runtime.tensors import iter_tensor_values, single_input

# Tensors fetched per run and samples per batch: a YOLOv8n at 320 holds 3 MB per early tensor and sample.
_TENSORS_PER_RUN = 32
_BATCH = 4


def rank_by_measured_gain(candidates: list[str], shortfall_with_float: Callable[[str], float]) -> list[str]:
    """`candidates` in the order to keep them float: the one whose float alone leaves the quantized
    model's check the least short (quantize.check.Int8Check.shortfall), which is the one that takes
    the most off it, first. Ties keep the given order."""
    shortfalls = {name: shortfall_with_float(name) for name in progress(candidates, desc="INT8 sensitivity")}
    return sorted(candidates, key=shortfalls.__getitem__)


def rank_by_added_error(prepared: ir.Model, quantized: ir.Model, inputs: np.ndarray,
                        candidates: set[str] | None = None) -> list[str]:
    """The compute nodes of `prepared` (the float model quantize_static was given) still INT8 in
    `quantized`, most error added first. `candidates` limits them (default: all)."""
    nodes = [n for n in prepared.graph if n.op_type in COMPUTE_OPS and n.inputs and n.inputs[0] is not None
             and (candidates is None or n.name in candidates)]
    if not nodes:
        return []
    input_name = single_input(prepared, "INT8 sensitivity")
    names = list(dict.fromkeys(v for n in nodes for v in (n.inputs[0].name, n.outputs[0].name)))
    available = {v.name for n in quantized.graph for v in n.outputs} | {input_name}
    names = [name for name in names if name in available]
    squares, errors = {}, {}
    for start in range(0, len(names), _TENSORS_PER_RUN):
        part = _energies(prepared, quantized, names[start:start + _TENSORS_PER_RUN], input_name, inputs)
        squares.update(part[0])
        errors.update(part[1])
    relative = {name: float(np.sqrt(errors[name] / squares[name])) if squares[name] > 0 else 0.0
                for name in names}
    added = {n.name: relative.get(n.outputs[0].name, 0.0) - relative.get(n.inputs[0].name, 0.0) for n in nodes
             if n.outputs[0].name in relative}
    return sorted(added, key=lambda name: -added[name])


def _energies(reference: ir.Model, other: ir.Model, names: list[str], input_name: str,
              inputs: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """Per tensor: the sum of squares of reference's values, and of other's minus reference's."""
    batches = model_batches(reference, input_name, inputs, _BATCH)
    squares, errors = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    runs = [iter_tensor_values(ir.to_proto(m), names, input_name, batches) for m in (reference, other)]
    for expected, actual in zip(*runs):
        for name, a, b in zip(names, expected, actual):
            squares[name] += float(np.square(a, dtype=np.float64).sum())
            errors[name] += float(np.square(b - a, dtype=np.float64).sum())
    return squares, errors
