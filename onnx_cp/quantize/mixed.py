"""Mixed precision: the nodes that stay float in an INT8 model, and why.

onnxruntime's QDQ quantizer gives every activation tensor one scale. Inside a network that is
what INT8 means, but at the head it can merge ranges of different scale: a YOLOv8 head
concatenates box coordinates in pixels (0..320) with sigmoid class probabilities (0..1) into
one output, and one 8-bit scale of 1.25 rounds every probability to 0 (measured on NudeNet's
YOLOv8n: class scores wiped out, while the whole-tensor error read 0.037). The same happens to
the tensor a Concat -> Split feeds into a Sigmoid or Softmax.

So the float tail - every node between the last compute nodes (Conv, Gemm, MatMul) and the
graph outputs - stays float: its Concats, Splits, reshapes, activations and box arithmetic run
in float on the dequantized outputs of the compute nodes, each of which keeps its own scale (one
branch, one range). The tail is data movement and elementwise work, so little speed is lost.
"""

from __future__ import annotations

import onnx_ir as ir

from onnx_cp.graph import lstm, naming

# Nodes whose output is a fresh mix of their inputs' channels: each gets its own output scale, and the
# walk from the outputs stops there. The rest of the tail only moves, merges or maps values.
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger"})
# A Sigmoid/Softmax in the tail is the usual sign of scores beside other values.
SCORE_OPS = frozenset({"Sigmoid", "Softmax", "LogSoftmax", "HardSigmoid"})
# These read only their input's shape: the walk does not follow them into the network.
SHAPE_OPS = frozenset({"Shape", "Size"})


def name_unnamed_nodes(model: ir.Model) -> None:
    """Give every unnamed node of the main graph a unique name: onnxruntime excludes nodes by name."""
    naming.name_unnamed_nodes(model.graph, lambda node, index: f"onnx_cp_node_{index}")


def recurrent_nodes(model: ir.Model) -> dict[str, str]:
    """The nodes of an unrolled LSTM (graph/lstm.py), which stay float: name -> why. Not measured
    in INT8: each step's state feeds every later one, so its rounding would compound over the
    sequence, and an unrolled LSTM is there for its recurrence's rank, not its precision."""
    marker = naming.separator(lstm.FORM_NAME)
    return {node.name: "an unrolled LSTM: its states feed every later step" for node in model.graph
            if marker in (node.name or "")}


def float_tail(model: ir.Model) -> dict[str, str]:
    """The nodes of `model`'s main graph that stay float: name -> why. Every node reached backwards
    from a graph output without passing through a compute node (which stays INT8)."""
    kept: dict[str, str] = {}
    pending = [value.producer() for value in model.graph.outputs]
    while pending:
        node = pending.pop()
        if (node is None or node.name in kept or node.op_type in COMPUTE_OPS | SHAPE_OPS
                or node.domain not in ("", "ai.onnx")):
            continue
        kept[node.name] = _reason(node)
        pending.extend(value.producer() for value in node.inputs if value is not None)
    return kept


def _reason(node: ir.Node) -> str:
    if node.op_type in SCORE_OPS:
        return "score activation at the head"
    if any(value in node.graph.outputs for value in node.outputs):
        return "produces a graph output"
    if node.op_type == "Concat":
        return "merges branches on the way to an output"
    return "on the way to an output"


def float_islands(model: ir.Model, compute_nodes: list[str], reason: str) -> dict[str, str]:
    """`compute_nodes` kept float with their input path: the nodes that feed them since the previous
    compute nodes (activations, residual adds, concats), and those compute nodes too. onnxruntime
    quantizes a tensor where any node reading or writing it is INT8, so a Conv excluded alone still
    reads its input through one 8-bit scale; only its weights would turn float."""
    nodes = {node.name: node for node in model.graph}
    kept: dict[str, str] = {}
    for name in compute_nodes:
        kept[name] = reason
        pending = [v.producer() for v in nodes[name].inputs if v is not None]
        while pending:
            node = pending.pop()
            if node is None or node.name in kept or node.op_type in SHAPE_OPS or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type in COMPUTE_OPS:  # writes the input path: float, but its own input stays INT8
                kept[node.name] = f"writes the input of {name}"
                continue
            kept[node.name] = f"feeds {name}"
            pending.extend(v.producer() for v in node.inputs if v is not None)
    return kept
