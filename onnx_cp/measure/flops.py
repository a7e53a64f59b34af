"""Multiply-accumulate (MAC) and parameter counts of Conv, ConvTranspose, Gemm and MatMul nodes.

Shapes come from onnx shape inference after the graph inputs' symbolic dims are filled in (given
shapes, else batch 1 and 32 for other unknown dims, as everywhere in onnx-cp). When inference
cannot tell a needed shape (data-dependent Reshape and the like), the model is run once in
onnxruntime on random inputs to read it."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir

from onnx_cp.errors import OnnxCpError, first_line
from onnx_cp.graph.naming import LAYER_METADATA_KEY, layer_of
from onnx_cp.runtime.inputs import measured_shapes, random_inputs, set_input_shapes
from onnx_cp.runtime.model_io import ModelLike, has_external_data, to_ir
from onnx_cp.runtime.session import create_session, session_options

COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def count_flops(model: ModelLike, input_shapes: dict[str, list[int]] | None = None,
                *, batch: int = 1) -> dict:
    """MACs and parameters per counted node, and totals.

    Returns {"total_macs", "total_params", "counted_params", "input_shapes",
    "layers": [{"name", "layer", "op", "macs", "params", "output_shape"}]}. total_params counts
    every constant tensor of the graph (initializers and Constant nodes); counted_params only the
    weights of the counted nodes. A CP chain's nodes carry the replaced layer in "layer"."""
    ir_model = to_ir(model)
    shapes_in = measured_shapes(ir_model, input_shapes, batch)
    proto = ir.to_proto(ir_model)
    set_input_shapes(proto, shapes_in)
    constants = _constant_shapes(proto)
    shapes = _inferred_shapes(proto)
    shapes.update(constants)

    nodes = [n for n in proto.graph.node if n.op_type in COUNTED_OPS and n.domain in ("", "ai.onnx")]
    missing = {v for n in nodes for v in _needed(n) if v and shapes.get(v) is None}
    if missing:
        shapes.update(_runtime_shapes(ir_model, proto, missing, shapes_in))

    layers = []
    for index, node in enumerate(nodes):
        name = node.name or f"{node.op_type}_{index}"
        meta = {p.key: p.value for p in node.metadata_props}
        macs = _macs(node, shapes)
        params = sum(int(np.prod(constants[v])) for v in node.input[1:] if v in constants)
        layers.append({
            "name": name,
            "layer": meta.get(LAYER_METADATA_KEY) or layer_of(name),
            "op": node.op_type,
            "macs": macs,
            "params": params,
            "output_shape": list(shapes.get(node.output[0]) or []),
        })
    return {
        "kind": "flops",
        "input_shapes": shapes_in,
        "total_macs": sum(layer["macs"] for layer in layers),
        "counted_params": sum(layer["params"] for layer in layers),
        "total_params": sum(int(np.prod(s)) for s in constants.values()),
        "layers": layers,
    }


def _macs(node: onnx.NodeProto, shapes: dict) -> int:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        out, weight = shapes[node.output[0]], shapes[node.input[1]]
        # each output element: (in_channels / group) x kh x kw multiply-adds = weight[1:]
        return math.prod(out) * math.prod(weight[1:])
    if node.op_type == "ConvTranspose":
        x, weight = shapes[node.input[0]], shapes[node.input[1]]
        # each input element is scattered into (out_channels / group) x kh x kw outputs
        return math.prod(x) * math.prod(weight[1:])
    a, b = shapes[node.input[0]], shapes[node.input[1]]
    if node.op_type == "Gemm":
        m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
        n = b[0] if attrs.get("transB", 0) else b[1]
        return m * k * n
    # MatMul with numpy semantics: 1-D operands are promoted, leading dims broadcast
    a2 = [1, *a] if len(a) == 1 else list(a)
    b2 = [*b, 1] if len(b) == 1 else list(b)
    batch = np.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2]))
    return math.prod(batch) * a2[-2] * a2[-1] * b2[-1]


def _needed(node: onnx.NodeProto) -> list[str]:
    return [node.input[0], node.input[1], node.output[0]]


def _constant_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(attr.t.dims)
    return shapes


def _inferred_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - inference gives up on some models; runtime shapes fill in
        inferred = proto
    shapes: dict[str, tuple[int, ...] | None] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        shapes[value.name] = None if any(d < 0 for d in dims) else dims
    return shapes


def _runtime_shapes(ir_model: ir.Model, proto: onnx.ModelProto, names: set[str],
                    shapes_in: dict[str, list[int]]) -> dict[str, tuple[int, ...]]:
    if has_external_data(ir_model):
        ir.external_data.load_to_model(ir_model)
        proto = ir.to_proto(ir_model)
        set_input_shapes(proto, shapes_in)
    existing = {o.name for o in proto.graph.output}
    for name in sorted(names - existing):
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    try:
        session = create_session(proto.SerializeToString(), session_options(optimization="none"))
        outputs = session.run(sorted(names), random_inputs(ir_model, shapes_in))
    except Exception as exc:  # noqa: BLE001 - ORT raises several private exception types
        raise OnnxCpError(f"cannot determine layer shapes for counting FLOPs ({first_line(exc, 200)})") from None
    return {name: tuple(np.shape(value)) for name, value in zip(sorted(names), outputs)}
