"""Exact rewrites that onnxruntime's CPU provider leaves undone, made before any layer is decomposed.

Models from other toolchains carry elementwise work that onnxruntime runs node by node, each node
a pass over a whole feature map (and, between NCHWc Convs, a layout reorder): paddle2onnx's
PP-OCRv4 scales and shifts Conv outputs by learnable scalars (Mul, Add) and spells HardSwish as
Add, Clip, Mul and Div; YOLOv8's box decoder takes a Softmax over axis 1, which onnxruntime runs
far slower than one over the last axis. Each rule removes such work and computes the same function
(up to float rounding: on PP-OCRv4's detector the output moved by 1e-6 relative, less than
onnxruntime's own graph optimizations move it, 2e-6 to 4e-6):

- scale_shift_into_conv: Conv -> Mul/Add/Sub/Div by a constant scalar or per-channel vector:
  folded into the Conv's weight and bias.
- shift_into_next_convs: an Add of a scalar whose only users are Convs without padding: folded into
  their biases (a padded Conv would see the shift in its border but not its zeros).
- scale_into_next_convs: a Mul by a nonzero scalar whose only users are Convs: folded into their
  weights (zero padding commutes with scaling); x * s + b feeding padded Convs becomes
  (x + b / s) * s first, so that the scale goes.
- hardswish: x * Clip(x + 3, 0, 6) / 6 -> HardSwish (opset 14 and later) or x * HardSigmoid(x).
- softmax_last_axis: Softmax or LogSoftmax (opset 13 and later) over an axis other than the last:
  the same over the last axis, between two Transposes.

The pass reports how often each rule was applied; whether the result is faster is measured by the
caller (the speed search times the rewritten model against the input).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnx_cp.graph.constants import constant_array, new_initializer
from onnx_cp.graph.passes import remove_dead_values

_AFFINE = {"Mul", "Add", "Sub", "Div"}


@dataclass(frozen=True)
class _Context:
    opset: int  # of the default domain
    shapes: Mapping[str, Sequence[int]]


@dataclass
class FusionResult(ir.passes.PassResult):
    """The pass result with the number of times each rule was applied."""

    applied: Counter = field(default_factory=Counter)


class FusionPass(ir.passes.InPlacePass):
    """Apply every rule of this module until none applies (top-level graph only).

    `shapes`: concrete shapes of values by name (shape inference under the run's input shapes),
    which tell a Softmax's rank where the model declares none."""

    def __init__(self, shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        super().__init__()
        self.shapes = shapes or {}

    def call(self, model: ir.Model) -> FusionResult:
        applied: Counter = Counter()
        context = _Context(model.graph.opset_imports.get("", model.opset_imports.get("", 1)), self.shapes)
        changed = True
        while changed:
            changed = False
            for node in list(model.graph):
                if node.graph is not model.graph or node.domain not in ("", "ai.onnx"):
                    continue  # removed by an earlier rewrite of this sweep, or not an ONNX op
                for name, rule in RULES:
                    if rule(model.graph, node, context):
                        applied[name] += 1
                        changed = True
                        break
        return FusionResult(model, modified=bool(applied), applied=applied)


def fuse(model: ir.Model, shapes: Mapping[str, Sequence[int]] | None = None) -> Counter:
    """Rewrite `model` in place; the number of times each rule was applied."""
    return FusionPass(shapes)(model).applied


# --- Conv -> Mul/Add/Sub/Div by a constant ----------------------------------------------------


def _scale_shift_into_conv(graph: ir.Graph, node: ir.Node, _: _Context) -> bool:
    if node.op_type not in _AFFINE or len(node.inputs) != 2:
        return False
    for position, value in enumerate(node.inputs):
        conv = value.producer() if value is not None else None
        if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in ("Sub", "Div") and position != 0:
            return False  # c - conv and c / conv are not affine in the Conv's output
        weight, bias = _conv_weights(conv)
        constant = _channel_vector(node.inputs[1 - position], weight)
        if constant is None or len(value.uses()) != 1 or value in graph.outputs:
            return False
        if node.op_type in ("Mul", "Div"):
            scale = constant if node.op_type == "Mul" else 1 / constant
            if node.op_type == "Div" and not np.all(np.isfinite(scale)):
                return False
            weight, bias = weight * scale.reshape(-1, *[1] * (weight.ndim - 1)), bias * scale
        else:  # Add or Sub
            bias = bias + (constant if node.op_type == "Add" else -constant)
        _set_conv_weights(graph, conv, weight, bias)
        _bypass(graph, node, conv.outputs[0])
        return True
    return False


def _conv_weights(conv: ir.Node) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The Conv's constant weight and bias (zeros when it has none), or (None, None)."""
    if len(conv.inputs) < 2 or conv.inputs[1] is None:
        return None, None
    weight = constant_array(conv.inputs[1])
    if weight is None or weight.dtype.kind != "f" or weight.ndim < 3:
        return None, None
    has_bias = len(conv.inputs) > 2 and conv.inputs[2] is not None
    bias = constant_array(conv.inputs[2]) if has_bias else np.zeros(weight.shape[0], weight.dtype)
    return (weight, bias) if bias is not None else (None, None)


def _channel_vector(value: ir.Value | None, weight: np.ndarray | None) -> np.ndarray | None:
    """The constant as one value per output channel, if it is a scalar or broadcasts along the
    channel axis alone (so the result keeps the Conv output's shape)."""
    array = constant_array(value) if value is not None and weight is not None else None
    if array is None or array.dtype.kind != "f":
        return None
    channels, rank = weight.shape[0], weight.ndim
    if array.size == 1 and array.ndim <= rank:
        return np.full(channels, array.reshape(-1)[0], dtype=weight.dtype)
    shape = [1] * (rank - array.ndim) + list(array.shape)
    if array.ndim > rank or shape[1] != channels or any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return array.reshape(-1).astype(weight.dtype)


# --- a scalar shift or scale before Convs ------------------------------------------------------


def _shift_into_next_convs(graph: ir.Graph, node: ir.Node, _: _Context) -> bool:
    shift, x = _scalar_operand(node, "Add")
    users = _conv_users(graph, node)
    if shift is None or users is None or not all(_unpadded(conv) for conv, _, _ in users):
        return False
    for conv, weight, bias in users:
        _set_conv_weights(graph, conv, weight, bias + shift * weight.sum(axis=tuple(range(1, weight.ndim)),
                                                                          dtype=np.float64))
    _bypass(graph, node, x)
    return True


def _scale_into_next_convs(graph: ir.Graph, node: ir.Node, _: _Context) -> bool:
    if node.op_type == "Add":
        return _swap_scale_after_shift(graph, node)
    scale, x = _scalar_operand(node, "Mul")
    users = _conv_users(graph, node)
    if scale is None or users is None:
        return False
    for conv, weight, bias in users:
        _set_conv_weights(graph, conv, weight * scale, bias)
    _bypass(graph, node, x)
    return True


def _swap_scale_after_shift(graph: ir.Graph, add: ir.Node) -> bool:
    """(x * s) + b, whose users are all Convs, -> (x + b / s) * s; the scale then folds forward."""
    shift, product = _scalar_operand(add, "Add")
    multiply = product.producer() if product is not None else None
    if shift is None or multiply is None or _conv_users(graph, add) is None or len(product.uses()) != 1:
        return False
    scale, x = _scalar_operand(multiply, "Mul")
    if scale is None or scale == 0 or product in graph.outputs:
        return False
    with np.errstate(over="ignore"):
        moved_shift = shift / scale
    if not np.isfinite(moved_shift):
        return False
    moved = new_initializer(graph, f"{add.name or 'shift'}_before_scale", moved_shift)
    scale_value = multiply.inputs[1] if multiply.inputs[0] is x else multiply.inputs[0]
    shifted = ir.node("Add", [x, moved], name=add.name)
    scaled = ir.node("Mul", [shifted.outputs[0], scale_value], name=multiply.name)
    graph.insert_before(add, [shifted, scaled])
    _bypass(graph, add, scaled.outputs[0])
    return True


def _scalar_operand(node: ir.Node, op_type: str) -> tuple[np.ndarray | None, ir.Value | None]:
    """(the constant scalar, as a 0-d array of its dtype, and the other input) of a binary
    `op_type` node, or (None, None)."""
    if node.op_type != op_type or len(node.inputs) != 2 or None in node.inputs:
        return None, None
    for constant, other in (node.inputs, node.inputs[::-1]):
        array = constant_array(constant)
        if array is not None and array.dtype.kind == "f" and array.size == 1 and constant_array(other) is None:
            return array.reshape(()), other
    return None, None


def _conv_users(graph: ir.Graph, node: ir.Node) -> list[tuple[ir.Node, np.ndarray, np.ndarray]] | None:
    """(Conv, weight, bias) of each Conv reading the node's output as its data input, if those are
    its only users and have constant float weights; else None."""
    output = node.outputs[0]
    if output in graph.outputs or not output.uses():
        return None
    users = []
    for use in output.uses():
        if use.idx != 0 or use.node.op_type != "Conv" or use.node.domain not in ("", "ai.onnx"):
            return None
        weight, bias = _conv_weights(use.node)
        if weight is None:
            return None
        users.append((use.node, weight, bias))
    return users


def _unpadded(conv: ir.Node) -> bool:
    pads = conv.attributes.get("pads")
    auto_pad = conv.attributes.get("auto_pad")
    return (pads is None or not any(pads.as_ints())) and \
        (auto_pad is None or auto_pad.as_string() in ("NOTSET", "VALID"))


# --- HardSwish -------------------------------------------------------------------------------


def _hardswish(graph: ir.Graph, node: ir.Node, context: _Context) -> bool:
    """x * Clip(x + 3, 0, 6) / 6, as Div(Mul(x, clip), 6), Mul(Mul(x, clip), 1/6) or
    Mul(x, Div(clip, 6)); every value inside used once."""
    x, inner = _hardswish_parts(node)
    if x is None or any(len(n.outputs[0].uses()) != 1 or n.outputs[0] in graph.outputs for n in inner):
        return False
    if context.opset >= 14:
        nodes = [ir.node("HardSwish", [x], name=node.name)]
    else:
        sigmoid = ir.node("HardSigmoid", [x], {"alpha": 1 / 6, "beta": 0.5}, name=f"{node.name}_hardsigmoid")
        nodes = [sigmoid, ir.node("Mul", [x, sigmoid.outputs[0]], name=node.name)]
    graph.insert_before(node, nodes)
    _bypass(graph, node, nodes[-1].outputs[0])  # the inner nodes go with it, as dead values
    return True


def _hardswish_parts(node: ir.Node) -> tuple[ir.Value | None, list[ir.Node]]:
    """(x, the nodes between x and `node`, outermost first) if `node` ends a HardSwish."""
    if _is_sixth(node):
        product = node.inputs[0] if node.op_type == "Div" else _non_constant(node)
        multiply = product.producer() if product is not None else None
        if multiply is not None and multiply.op_type == "Mul" and len(multiply.inputs) == 2:
            for x, clipped in (multiply.inputs, multiply.inputs[::-1]):
                clip_nodes = _clip_of_x_plus_3(clipped, x)
                if clip_nodes:
                    return x, [multiply, *clip_nodes]
    if node.op_type == "Mul" and len(node.inputs) == 2:
        for x, scaled in (node.inputs, node.inputs[::-1]):
            sixth = scaled.producer() if scaled is not None else None
            if sixth is not None and _is_sixth(sixth):
                clipped = sixth.inputs[0] if sixth.op_type == "Div" else _non_constant(sixth)
                clip_nodes = _clip_of_x_plus_3(clipped, x)
                if clip_nodes:
                    return x, [sixth, *clip_nodes]
    return None, []


def _is_sixth(node: ir.Node) -> bool:
    """Div by 6 or Mul by 1/6 (as float32 rounds it)."""
    if len(node.inputs) != 2 or None in node.inputs:
        return False
    if node.op_type == "Div":
        return _equals(node.inputs[1], 6.0)
    return node.op_type == "Mul" and any(_equals(v, np.float32(1 / 6)) for v in node.inputs)


def _clip_of_x_plus_3(value: ir.Value | None, x: ir.Value) -> list[ir.Node]:
    """[Clip, Add] if `value` is Clip(x + 3, 0, 6), else []."""
    clip = value.producer() if value is not None else None
    if clip is None or clip.op_type != "Clip" or not clip.inputs or clip.inputs[0] is None:
        return []
    low, high = _clip_bounds(clip)
    add = clip.inputs[0].producer()
    if low != 0 or high != 6 or add is None or add.op_type != "Add" or x not in add.inputs:
        return []
    other = add.inputs[1] if add.inputs[0] is x else add.inputs[0]
    return [clip, add] if _equals(other, 3.0) else []


def _clip_bounds(clip: ir.Node) -> tuple[float | None, float | None]:
    """Clip's (min, max): attributes before opset 11, constant inputs since (None where absent)."""
    def bound(name: str, index: int) -> float | None:
        if name in clip.attributes:
            return clip.attributes[name].as_float()
        value = clip.inputs[index] if len(clip.inputs) > index else None
        array = constant_array(value) if value is not None else None
        return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None

    return bound("min", 1), bound("max", 2)


def _equals(value: ir.Value | None, number: float) -> bool:
    array = constant_array(value) if value is not None else None
    return array is not None and array.size == 1 and float(array.reshape(-1)[0]) == float(number)


def _non_constant(node: ir.Node) -> ir.Value | None:
    rest = [v for v in node.inputs if v is not None and constant_array(v) is None]
    return rest[0] if len(rest) == 1 else None


# --- Softmax over the last axis ----------------------------------------------------------------


def _softmax_last_axis(graph: ir.Graph, node: ir.Node, context: _Context) -> bool:
    # before opset 13 the axis meant "flatten from here": a different function, left alone
    if node.op_type not in ("Softmax", "LogSoftmax") or context.opset < 13 or not node.inputs:
        return False
    x = node.inputs[0]
    rank = _rank(x, context.shapes)
    axis_attribute = node.attributes.get("axis")
    axis = axis_attribute.as_int() if axis_attribute is not None else -1
    if rank is None or axis in (-1, rank - 1) or not -rank <= axis < rank:
        return False
    axis %= rank
    perm = list(range(rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    to_last = ir.node("Transpose", [x], {"perm": perm}, name=f"{node.name}_to_last_axis")
    softmax = ir.node(node.op_type, [to_last.outputs[0]], {"axis": -1}, name=node.name)
    back = ir.node("Transpose", [softmax.outputs[0]], {"perm": perm}, name=f"{node.name}_back")
    graph.insert_before(node, [to_last, softmax, back])
    _bypass(graph, node, back.outputs[0])
    return True


def _rank(value: ir.Value, shapes: Mapping[str, Sequence[int]]) -> int | None:
    if value.name in shapes:
        return len(shapes[value.name])
    return len(value.shape) if value.shape is not None else None


# --- graph edits -------------------------------------------------------------------------------


def _bypass(graph: ir.Graph, node: ir.Node, replacement: ir.Value) -> None:
    """Remove `node`; its users (and the graph output, under its name) read `replacement` instead,
    and the values only it read go with it."""
    output = node.outputs[0]
    replacement.shape = replacement.shape or output.shape
    replacement.type = replacement.type or output.type
    if output in graph.outputs:
        name = output.name
        graph.outputs[graph.outputs.index(output)] = replacement
        output.name = None
        replacement.name = name
    ir.convenience.replace_all_uses_with(output, replacement)
    dropped = [v for v in node.inputs if v is not None]
    graph.remove(node, safe=True)
    remove_dead_values(graph, dropped)


def _set_conv_weights(graph: ir.Graph, conv: ir.Node, weight: np.ndarray, bias: np.ndarray) -> None:
    old = [v for v in conv.inputs[1:3] if v is not None]
    name = conv.name or "conv"
    conv.replace_input_with(1, new_initializer(graph, f"{name}_fused_weight", weight))
    if len(conv.inputs) < 3:
        conv.resize_inputs(3)
    conv.replace_input_with(2, new_initializer(graph, f"{name}_fused_bias", bias.astype(weight.dtype)))
    remove_dead_values(graph, old)




# in the order they are tried on each node; a rule that applies ends that node's turn in the sweep
RULES: tuple[tuple[str, Callable[[ir.Graph, ir.Node, _Context], bool]], ...] = (
    ("scale_shift_into_conv", _scale_shift_into_conv),
    ("shift_into_next_convs", _shift_into_next_convs),
    ("scale_into_next_convs", _scale_into_next_convs),
    ("hardswish", _hardswish),
    ("softmax_last_axis", _softmax_last_axis),
)
