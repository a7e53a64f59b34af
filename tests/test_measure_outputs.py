"""Outputs compared on sample data (measure.outputs), batch-1 sequence models included."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnx_cp.measure.outputs import compare_on_data


def sequence_model(scale: float = 1.0) -> onnx.ModelProto:
    """A fixed-batch-1 'recogniser': x [1, C, T] -> scores (T, 1, C), as CRNN exports often are."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[2, 0, 1]),
             helper.make_node("Mul", ["t", "s"], ["scores"])]
    graph = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", 1, [1, 5, 12])],
                              [helper.make_tensor_value_info("scores", 1, [12, 1, 5])],
                              [helper.make_tensor("s", 1, [], [scale])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def test_batch_one_sequences_are_run_sample_by_sample_and_decoded():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 12)).astype(np.float32)
    same = compare_on_data(sequence_model(), sequence_model(), x)
    assert same.samples == 3 and same.worst_group_error == 0.0
    (output,) = same.outputs
    assert output.kind == "sequence" and output.agreement["strings"] == 1.0
    flipped = compare_on_data(sequence_model(-1.0), sequence_model(), x)
    assert flipped.outputs[0].agreement["strings"] < 1.0 and flipped.worst_group_error > 1.0
