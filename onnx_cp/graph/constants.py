"""Constant weights as the pass sees them: an initializer, a Constant node, or an expression of them
that folds to a constant (Cast(Constant), Reshape of an initializer, ConstantOfShape, ...); and new
ones, as initializers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

# Ops whose constant inputs we fold to find a weight. Quantize/Dequantize are left out on
# purpose: folding them would silently turn a quantized layer back into a float one.
_FOLDABLE_OPS = {
    "Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Slice",
    "Mul", "Div", "Add", "Sub", "Neg", "Split", "Gather", "Flatten", "Expand", "Tile",
    "ConstantOfShape",
}
_MAX_FOLD_DEPTH = 8


def constant_array(value: ir.Value, depth: int = 0) -> np.ndarray | None:
    """The value's array if it is an initializer, a Constant, or foldable from those."""
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is not None:
        return tensor.numpy()
    node = value.producer()
    if node is None or depth >= _MAX_FOLD_DEPTH:
        return None
    if node.domain not in ("", "ai.onnx") or node.op_type not in _FOLDABLE_OPS or node.graph is None:
        return None
    if any(attr.is_ref() for attr in node.attributes.values()):
        return None
    inputs = [constant_array(v, depth + 1) if v is not None else None for v in node.inputs]
    if any(a is None for a, v in zip(inputs, node.inputs) if v is not None):
        return None
    return _evaluate_node(node, inputs, value)


def _evaluate_node(node: ir.Node, inputs: list[np.ndarray | None], wanted: ir.Value) -> np.ndarray | None:
    names = [f"in{i}" if a is not None else "" for i, a in enumerate(inputs)]
    outputs = [f"out{i}" for i in range(len(node.outputs))]
    proto_node = onnx.helper.make_node(node.op_type, names, outputs)
    proto_node.attribute.extend(ir.serde.serialize_node(node).attribute)
    opset = node.graph.opset_imports.get("", 18) if node.graph is not None else 18
    feeds = {n: a for n, a in zip(names, inputs) if a is not None}
    try:
        results = ReferenceEvaluator(proto_node, opsets={"": opset}).run(None, feeds)
    except Exception:  # noqa: BLE001 - anything unfoldable is simply not a constant
        return None
    return np.asarray(results[list(node.outputs).index(wanted)])


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """`array` as an initializer of `graph` under `name`, made unique; its rank kept (a 0-d array
    stays a scalar, which np.ascontiguousarray would make 1-D)."""
    name = _unique_initializer_name(graph, name)
    tensor = ir.tensor(np.array(array, order="C"), name=name)
    value = ir.Value(name=name, const_value=tensor, shape=tensor.shape, type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def _unique_initializer_name(graph: ir.Graph, name: str) -> str:
    candidate, n = name, 1
    while candidate in graph.initializers:
        candidate, n = f"{name}_{n}", n + 1
    return candidate
