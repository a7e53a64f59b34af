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


def test_many_samples_of_a_many_class_sequence_are_decoded_one_by_one():
    """(T, 1, C) outputs with few steps and many classes (a CRNN's 32 x 8210), stacked over many
    samples, are compared sample by sample: the strings agreement is the share of samples whose own
    greedy decoding is unchanged."""
    import onnxruntime as ort

    from onnx_cp.runtime.fidelity import ctc_greedy

    steps, classes = 8, 400
    boost = np.zeros((steps, 1, classes), np.float32)
    boost[0, 0, 7] = 2.0

    def model(extra: np.ndarray | None) -> onnx.ModelProto:
        nodes = [helper.make_node("Transpose", ["x"], ["scores" if extra is None else "t"], perm=[2, 0, 1])]
        inits = []
        if extra is not None:
            nodes.append(helper.make_node("Add", ["t", "b"], ["scores"]))
            inits.append(onnx.numpy_helper.from_array(extra, "b"))
        graph = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", 1, [1, classes, steps])],
                                  [helper.make_tensor_value_info("scores", 1, [steps, 1, classes])], inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = 10
        return proto

    x = np.random.default_rng(0).standard_normal((64, classes, steps)).astype(np.float32)
    original, boosted = model(None), model(boost)
    result = compare_on_data(boosted, original, x)
    (output,) = result.outputs
    assert output.kind == "sequence"
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for m in (original, boosted)]
    decoded = [[ctc_greedy(s.run(None, {"x": x[i:i + 1]})[0])[0] for i in range(len(x))] for s in sessions]
    expected = float(np.mean([a == b for a, b in zip(*decoded)]))
    assert 0 < expected < 1
    assert output.agreement["strings"] == expected


def test_task_loss_reads_strings_where_the_scores_barely_move():
    """A recogniser whose scores move by a small relative amount can still change its decoded
    lines: the task loss that weighs a speed search's layers is then the share of lines changed, not
    the small score error; where nothing the task reads changes, it is the score error."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 5, 12)).astype(np.float32)
    x[:, 1] = x[:, 2] + 1e-3  # classes 1 and 2 nearly tie at every step: a 1% change flips them
    nudged = compare_on_data(sequence_model(1.01), sequence_model(), x)  # same argmax: strings kept
    assert nudged.outputs[0].agreement["strings"] == 1.0
    assert nudged.task_loss == nudged.worst_group_error > 0

    # classes 1 and 2 exchanged: the scores move by ~1e-3, wherever the line reads 1 or 2 it changes
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[2, 0, 1]),
             helper.make_node("Gather", ["t", "order"], ["scores"], axis=2)]
    graph = helper.make_graph(nodes, "swap", [helper.make_tensor_value_info("x", 1, [1, 5, 12])],
                              [helper.make_tensor_value_info("scores", 1, [12, 1, 5])],
                              [helper.make_tensor("order", 7, [5], [0, 2, 1, 3, 4])])
    swapped = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    swapped.ir_version = 10
    changed = compare_on_data(swapped, sequence_model(), x)
    strings = changed.outputs[0].agreement["strings"]
    assert strings < 0.9 and changed.worst_group_error < 0.01
    assert changed.task_loss == 1.0 - strings


def test_outputs_on_data_do_not_depend_on_the_thread_count():
    """Runs on data use every usable core (the search's sensitivities, evaluations): a conv net's
    outputs on one thread and on all of them are the same numbers."""
    import model_factory
    from onnx_cp.measure.outputs import ReferenceOutputs
    from onnx_cp.runtime.session import usable_cores

    x = np.random.default_rng(0).standard_normal((6, 3, 16, 16)).astype(np.float32)
    one = ReferenceOutputs(model_factory.tiny_cnn(), x, threads=1).expected
    every = ReferenceOutputs(model_factory.tiny_cnn(), x).expected
    assert usable_cores() >= 1 and one.keys() == every.keys()
    assert all(np.array_equal(one[name], every[name]) for name in one)
