"""What every low-rank splice shares: a replacement is a chain of Conv stages, each taking the
original Conv's strides, dilations and padding along the axes it spans, and the splice of such a
chain in place of the Conv (constant weights registered, bias on the last stage, names, metadata).

Why splitting the attributes is exact: zero padding commutes with a bias-free conv that has no
spatial extent (a 1x1 stage before the spatial ones maps zeros to zeros), and a stage spanning one
axis only (kernel 1 and stride 1 on the other) pads and strides exactly as the original along its
own axis; SAME_* auto_pad adds no padding along an axis of kernel 1 and stride 1, so it is kept on
the spatial stages as is, which stays exact with symbolic spatial sizes.

A Gemm site's chain (channel SVD, its one form) is spliced as MatMuls with (in, out) weights and
the bias added at the end instead: valid at every opset (Gemm needs its C input before opset 11),
and onnxruntime fuses the last MatMul and the Add back into a Gemm. An LSTM site's SVD factors
are its recurrence's, and its splice is the LSTM unrolled (graph/lstm.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnx_cp.graph import lstm, naming
from onnx_cp.graph.constants import new_initializer
from onnx_cp.graph.sites import ConvSite, conv_attributes

NONE, VERTICAL, HORIZONTAL, BOTH = "none", "vertical", "horizontal", "both"  # the axes a stage spans


@dataclass(frozen=True)
class StageShape:
    """One stage of a chain: a Conv (out_channels, in_per_group, kh, kw) with `group`, spanning
    `axes` of the original's spatial attributes."""

    name: str
    out_channels: int
    in_per_group: int
    kernel: tuple[int, int]
    group: int
    axes: str


def stage_attributes(attrs: dict, axes: str) -> dict:
    """The Conv attributes of a stage spanning `axes`, from the original's (conv_attributes)."""
    if axes == NONE:
        return {}
    strides, dilations, pads = list(attrs["strides"]), list(attrs["dilations"]), list(attrs["pads"])
    if axes == VERTICAL:
        strides, dilations, pads = [strides[0], 1], [dilations[0], 1], [pads[0], 0, pads[2], 0]
    elif axes == HORIZONTAL:
        strides, dilations, pads = [1, strides[1]], [1, dilations[1]], [0, pads[1], 0, pads[3]]
    return {"strides": strides, "dilations": dilations, **_padding(attrs, pads)}


def _padding(attrs: dict, explicit_pads: list[int]) -> dict:
    if attrs["auto_pad"] in ("SAME_UPPER", "SAME_LOWER"):
        return {"auto_pad": attrs["auto_pad"]}
    if attrs["auto_pad"] == "VALID" or not any(explicit_pads):
        return {}
    return {"pads": explicit_pads}


def register_weights(graph: ir.Graph, layer: str, form: str, shapes: Sequence[StageShape],
                     arrays: Sequence[np.ndarray], dtype: np.dtype, *, matrices: bool = False) -> list[ir.Value]:
    """The stages' weights as initializers of `graph` (in the kernel's dtype), uniquely named;
    `matrices`: as (in, out) MatMul weights."""
    values = []
    for shape, array in zip(shapes, arrays):
        expected = (shape.out_channels, shape.in_per_group, *shape.kernel)
        if tuple(array.shape) != expected:
            raise ValueError(f"{layer}: {form} stage {shape.name} weight {array.shape}, expected {expected}")
        if matrices:
            array = array.reshape(shape.out_channels, shape.in_per_group).T
        values.append(new_initializer(graph, naming.weight_name(layer, shape.name, form), array.astype(dtype)))
    return values


def splice(graph: ir.Graph, site: ConvSite, form: str, shapes: Sequence[StageShape],
           weights: Sequence[ir.Value]) -> None:
    """Replace the site's Conv by the chain of stages; the bias goes to the last stage and the
    Conv's output value (and so its name) is kept."""
    conv = site.node
    if site.is_lstm:
        lstm.splice_unrolled(graph, site.name, conv, site.steps, weights)
        return
    x = conv.inputs[0]
    bias = conv.inputs[2] if len(conv.inputs) > 2 else None
    stages = _matmul_stages if site.is_gemm else _conv_stages
    nodes = stages(site, form, shapes, weights, x, bias)
    ir.convenience.replace_nodes_and_values(graph, conv, [conv], nodes, [conv.outputs[0]], [nodes[-1].outputs[0]])


def _conv_stages(site: ConvSite, form: str, shapes: Sequence[StageShape], weights: Sequence[ir.Value],
                 x: ir.Value, bias: ir.Value | None) -> list[ir.Node]:
    attrs = conv_attributes(site.node)
    nodes: list[ir.Node] = []
    for index, (shape, weight) in enumerate(zip(shapes, weights)):
        inputs = [nodes[-1].outputs[0] if nodes else x, weight]
        if index == len(shapes) - 1 and bias is not None:
            inputs.append(bias)
        nodes.append(_stage_node(site, form, shape.name, "Conv", inputs,
                                 {"kernel_shape": list(shape.kernel), "group": shape.group,
                                  **stage_attributes(attrs, shape.axes)}))
    return nodes


def _matmul_stages(site: ConvSite, form: str, shapes: Sequence[StageShape], weights: Sequence[ir.Value],
                   x: ir.Value, bias: ir.Value | None) -> list[ir.Node]:
    nodes: list[ir.Node] = []
    for shape, weight in zip(shapes, weights):
        nodes.append(_stage_node(site, form, shape.name, "MatMul", [nodes[-1].outputs[0] if nodes else x, weight]))
    if bias is not None:
        nodes.append(_stage_node(site, form, "bias", "Add", [nodes[-1].outputs[0], bias]))
    return nodes


def _stage_node(site: ConvSite, form: str, stage: str, op: str, inputs: list, attributes: dict | None = None
                ) -> ir.Node:
    name = naming.node_name(site.name, stage, form)
    node = ir.node(op, inputs, attributes or {}, name=name, metadata_props={naming.LAYER_METADATA_KEY: site.name})
    node.outputs[0].name = name + ".output"
    return node


def chain_macs(site: ConvSite, shapes: Sequence[StageShape]) -> int:
    """Multiply-adds of the chain: stages before any spatial one run at input resolution, a vertical
    stage at (output rows x input columns), the rest at output resolution."""
    ho, wo = site.output_hw or (1, 1)
    hi, wi = site.input_hw or (ho, wo)
    rows, cols = hi, wi
    total = 0
    for shape in shapes:
        if shape.axes in (VERTICAL, BOTH):
            rows = ho
        if shape.axes in (HORIZONTAL, BOTH):
            cols = wo
        total += shape.out_channels * shape.in_per_group * shape.kernel[0] * shape.kernel[1] * rows * cols
    return total


def chain_params(shapes: Sequence[StageShape]) -> int:
    return sum(s.out_channels * s.in_per_group * s.kernel[0] * s.kernel[1] for s in shapes)
