"""Checks a rewritten model before anything is written: onnx.checker, an onnxruntime session,
and the outputs of original and rewritten models on the same random inputs."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from onnx_cp.errors import OnnxCpError, UsageError

DEFAULT_BATCH = 1
DEFAULT_OTHER_DIM = 32


def parse_input_shapes(specs: Iterable[str] | None) -> dict[str, list[int]]:
    """Parse `NAME:1,3,224,224` items (the --input-shape flag)."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        try:
            values = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            values = []
        if not sep or not name or not values or any(v <= 0 for v in values):
            raise UsageError(f"--input-shape {spec!r}: expected NAME:D1,D2,... with positive integers")
        shapes[name] = values
    return shapes


def fill_input_shapes(model: ir.Model, input_shapes: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Concrete shapes for every graph input: given ones win, symbolic dims get defaults."""
    input_shapes = dict(input_shapes or {})
    names = [v.name for v in _real_inputs(model)]
    unknown = set(input_shapes) - set(names)
    if unknown:
        raise UsageError(f"--input-shape names unknown input(s) {sorted(unknown)}; inputs are {names}")
    filled = {}
    for value in _real_inputs(model):
        if value.name in input_shapes:
            filled[value.name] = list(input_shapes[value.name])
            continue
        if value.shape is None:
            raise UsageError(f"input {value.name!r} has no shape: give it with --input-shape {value.name}:D1,D2,...")
        filled[value.name] = [
            dim if isinstance(dim, int) else (DEFAULT_BATCH if axis == 0 else DEFAULT_OTHER_DIM)
            for axis, dim in enumerate(value.shape)
        ]
    return filled


def random_inputs(model: ir.Model, input_shapes: dict[str, list[int]] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random feeds for every graph input (normal floats, zeros for integers, False for bools)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape in fill_input_shapes(model, input_shapes).items():
        value = next(v for v in _real_inputs(model) if v.name == name)
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = np.zeros(shape, dtype=dtype)
    return feeds


def _real_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs that are not initializers (old IR versions list weights as inputs)."""
    return [v for v in model.graph.inputs if v.name not in model.graph.initializers]


__all__ = ["parse_input_shapes", "fill_input_shapes", "random_inputs", "OnnxCpError"]
