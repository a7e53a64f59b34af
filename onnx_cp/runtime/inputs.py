"""Concrete input shapes and seeded random feeds: symbolic dimensions get the given shapes, else batch 1
and 32 for the others (as everywhere in onnx-cp)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir

from onnx_cp.errors import UsageError

# A graph input with more elements than this (its fixed dims, or a given shape) cannot be fed random
# inputs on any machine onnx-cp targets (8 GiB of float32): refused up front rather than by a
# MemoryError (or the OOM killer) later.
MAX_INPUT_ELEMENTS = 2**31

DEFAULT_BATCH = 1
DEFAULT_OTHER_DIM = 32


def parse_input_shapes(specs: Iterable[str] | None) -> dict[str, list[int]]:
    """Parse `NAME:1,3,224,224` items (the CLI's --input-shape)."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        try:
            values = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            values = []
        if not sep or not name or not values or any(v <= 0 for v in values):
            raise UsageError(f"{spec!r}: expected NAME:D1,D2,... with positive integers", option="input_shapes")
        if math.prod(values) > MAX_INPUT_ELEMENTS:
            raise UsageError(f"{spec!r}: {math.prod(values)} elements, more than one input can hold "
                             f"({MAX_INPUT_ELEMENTS})", option="input_shapes")
        if shapes.get(name, values) != values:
            raise UsageError(f"{name!r} given twice with different shapes", option="input_shapes")
        shapes[name] = values
    return shapes


def fill_input_shapes(model: ir.Model, input_shapes: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Concrete shapes for every graph input: given ones win, symbolic dims get defaults."""
    input_shapes = dict(input_shapes or {})
    names = [v.name for v in real_inputs(model)]
    unknown = set(input_shapes) - set(names)
    if unknown:
        raise UsageError(f"unknown input(s) {sorted(unknown)}; inputs are {names}", option="input_shapes")
    filled = {}
    for value in real_inputs(model):
        if value.name in input_shapes:
            filled[value.name] = list(input_shapes[value.name])
            continue
        if value.shape is None:
            raise UsageError(f"input {value.name!r} has no shape: give its dimensions ({value.name}:D1,D2,...)",
                             option="input_shapes")
        filled[value.name] = [
            dim if isinstance(dim, int) else (DEFAULT_BATCH if axis == 0 else DEFAULT_OTHER_DIM)
            for axis, dim in enumerate(value.shape)
        ]
    return filled


def set_input_shapes(proto: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    """Write concrete shapes into a ModelProto's graph inputs (before shape inference)."""
    for value in proto.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[value.name]:
                dims.add().dim_value = d


def pin_input_shapes(model: ir.Model, shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """Give the model's real inputs these concrete shapes (onnxruntime then refuses any other);
    returns the shapes written."""
    fixed = {}
    for value in real_inputs(model):
        dims = shapes.get(value.name)
        if dims and all(isinstance(d, int) and d > 0 for d in dims):
            value.shape = ir.Shape(list(dims))
            fixed[value.name] = list(dims)
    return fixed


def random_inputs(
    model: ir.Model, input_shapes: dict[str, list[int]] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded random feeds for every graph input (normal floats, zeros for integers, False for bools)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape in fill_input_shapes(model, input_shapes).items():
        value = next(v for v in real_inputs(model) if v.name == name)
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = np.zeros(shape, dtype=dtype)
    return feeds


def fixed_batch(model: ir.Model, input_name: str) -> int | None:
    """The batch size the model's input is fixed to (an exported CRNN often takes exactly 1), or
    None when it is free."""
    value = next(v for v in model.graph.inputs if v.name == input_name)
    if value.shape is None or len(value.shape) == 0:
        return None
    first = value.shape[0]
    return first if isinstance(first, int) and first > 0 else None


def model_batches(model: ir.Model, input_name: str, data: np.ndarray, size: int) -> list[np.ndarray]:
    """`data` in batches of `size`, or of the model's fixed batch size, the last one then padded
    with copies of its last sample."""
    fixed = fixed_batch(model, input_name)
    step = fixed or size
    batches = [data[i:i + step] for i in range(0, len(data), step)]
    if fixed and batches and len(batches[-1]) < fixed:
        batches[-1] = np.concatenate([batches[-1], np.repeat(batches[-1][-1:], fixed - len(batches[-1]), 0)])
    return batches


def real_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs that are not initializers (old IR versions list weights as inputs)."""
    return [v for v in model.graph.inputs if v.name not in model.graph.initializers]


def measured_shapes(
    model: ir.Model, input_shapes: dict[str, list[int]] | None = None, batch: int = 1
) -> dict[str, list[int]]:
    """Shapes of every graph input: given ones win; a symbolic first dim becomes `batch`."""
    if batch < 1:
        raise UsageError(f"batch {batch}: expected a positive integer")
    given = dict(input_shapes or {})
    known = {v.name for v in model.graph.inputs}
    # Several models are measured with one list of shapes: ignore names a model lacks.
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
        raise UsageError(f"{value.name}:{','.join(map(str, dims))} does not fit the model's input shape "
                         f"[{shown}]", option="input_shapes")


def measured_feeds(
    model: ir.Model, input_shapes: dict[str, list[int]] | None = None, batch: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    return random_inputs(model, measured_shapes(model, input_shapes, batch), seed=seed)


def check_shape_names(models: list[ir.Model], input_shapes: dict[str, list[int]] | None) -> None:
    """An input shape for a name no model has is a typo: say so."""
    names = {v.name for m in models for v in m.graph.inputs}
    unknown = sorted(set(input_shapes or {}) - names)
    if unknown:
        raise UsageError(f"unknown input(s) {unknown}; inputs are {sorted(names)}", option="input_shapes")
