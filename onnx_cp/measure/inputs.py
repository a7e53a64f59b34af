"""Concrete input shapes and random feeds for measuring a model (batch size applied to dim 0)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnx_cp.errors import UsageError
from onnx_cp.verify import fill_input_shapes, random_inputs


def measured_shapes(
    model: ir.Model, input_shapes: dict[str, list[int]] | None = None, batch: int = 1
) -> dict[str, list[int]]:
    """Shapes of every graph input: given ones win; a symbolic first dim becomes `batch`."""
    if batch < 1:
        raise UsageError(f"batch {batch}: expected a positive integer")
    given = dict(input_shapes or {})
    known = {v.name for v in model.graph.inputs}
    # Several models are measured with one --input-shape list: ignore names a model lacks.
    given = {name: dims for name, dims in given.items() if name in known}
    shapes = fill_input_shapes(model, given)
    for value in model.graph.inputs:
        if value.name in given and value.shape is not None:
            _check_fixed_dims(value, given[value.name])
    for value in model.graph.inputs:
        if value.name not in shapes or value.name in given or value.shape is None:
            continue
        if len(value.shape) == 0:
            continue
        first = value.shape[0]
        if not isinstance(first, int):
            shapes[value.name][0] = batch
        elif batch != 1 and first != batch:
            raise UsageError(
                f"input {value.name!r} has a fixed batch dimension {first}; cannot run batch {batch}"
            )
    return shapes


def _check_fixed_dims(value: ir.Value, dims: list[int]) -> None:
    declared = list(value.shape)
    mismatch = len(declared) != len(dims) or any(
        isinstance(d, int) and d != g for d, g in zip(declared, dims))
    if mismatch:
        shown = ",".join(str(d) if isinstance(d, int) else "?" for d in declared)
        raise UsageError(f"--input-shape {value.name}:{','.join(map(str, dims))} does not fit the "
                         f"model's input shape [{shown}]")


def measured_feeds(
    model: ir.Model, input_shapes: dict[str, list[int]] | None = None, batch: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    return random_inputs(model, measured_shapes(model, input_shapes, batch), seed=seed)


def check_shape_names(models: list[ir.Model], input_shapes: dict[str, list[int]] | None) -> None:
    """An --input-shape name that no model has is a typo: say so."""
    names = {v.name for m in models for v in m.graph.inputs}
    unknown = sorted(set(input_shapes or {}) - names)
    if unknown:
        raise UsageError(f"--input-shape names unknown input(s) {unknown}; inputs are {sorted(names)}")
