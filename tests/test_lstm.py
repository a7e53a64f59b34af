"""LSTM sites: the unrolled splice is exact, the joint recurrence and the states it reads."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnx_cp.graph import lstm


def lstm_model(direction="bidirectional", steps=5, batch=2, inputs=3, hidden=4, *, initial=True, bias=True,
               outputs=("y", "y_h", "y_c"), opset=18, seed=0):
    rng = np.random.default_rng(seed)
    d = 2 if direction == "bidirectional" else 1
    inits = [numpy_helper.from_array(rng.standard_normal((d, 4 * hidden, inputs)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((d, 4 * hidden, hidden)).astype(np.float32) * 0.5, "R")]
    names = ["x", "W", "R"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal((d, 8 * hidden)).astype(np.float32), "B"))
    names.append("B" if bias else "")
    graph_inputs = [helper.make_tensor_value_info("x", 1, [steps, batch, inputs])]
    if initial:
        names += ["", "h0", "c0"]
        graph_inputs += [helper.make_tensor_value_info(n, 1, [d, batch, hidden]) for n in ("h0", "c0")]
    node_outputs = [n if n in outputs else "" for n in ("y", "y_h", "y_c")]
    while node_outputs and not node_outputs[-1]:
        node_outputs.pop()
    node = helper.make_node("LSTM", names, node_outputs, name="rnn", direction=direction, hidden_size=hidden)
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_tensor_value_info(n, 1, None) for n in outputs],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def feeds(model, seed=1):
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


def run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def unrolled(model: onnx.ModelProto, rank_factors) -> onnx.ModelProto:
    ir_model = ir.from_proto(model)
    node = next(n for n in ir_model.graph if n.op_type == "LSTM")
    v, u = rank_factors
    values = []
    for name, array in (("v", v), ("u", u)):
        tensor = ir.tensor(np.ascontiguousarray(array, np.float32), name=name)
        value = ir.Value(name=name, const_value=tensor, shape=tensor.shape, type=ir.TensorType(tensor.dtype))
        ir_model.graph.register_initializer(value)
        values.append(value)
    steps = lstm.sequence_length(node, {})
    lstm.splice_unrolled(ir_model.graph, "rnn", node, steps, values)
    return ir.to_proto(ir_model)


def exact_factors(model):
    r = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "R"))
    joint = lstm.joint_recurrence(r.astype(np.float64))
    return np.eye(joint.shape[1]), joint.T  # h V U = h joint^T


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("initial", [True, False])
@pytest.mark.parametrize("opset", [12, 18])
def test_the_unrolled_lstm_with_its_own_recurrence_is_the_lstm(direction, initial, opset):
    model = lstm_model(direction, initial=initial, opset=opset)
    feed = feeds(model)
    for expected, got in zip(run(model, feed), run(unrolled(model, exact_factors(model)), feed)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("outputs", [("y",), ("y_h",), ("y_c", "y")])
def test_only_the_outputs_the_model_reads_are_built_and_keep_their_names(outputs):
    model = lstm_model(bias=False, outputs=outputs, steps=1)
    feed = feeds(model)
    result = unrolled(model, exact_factors(model))
    assert [o.name for o in result.graph.output] == list(outputs)
    for expected, got in zip(run(model, feed), run(result, feed)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_low_rank_factors_of_the_joint_recurrence_are_what_the_unrolled_lstm_computes():
    """Any factors are exact: the unrolled model equals a numpy LSTM whose recurrence is V U."""
    model = lstm_model("bidirectional", steps=4, batch=1, initial=False)
    v, u = exact_factors(model)
    rank = 3
    left, s, right = np.linalg.svd(u.T @ v.T, full_matrices=False)  # the joint matrix (4DH, DH)
    factors = ((right[:rank].T * s[:rank]), left[:, :rank].T)  # V (DH, r), U (r, 4DH)
    x = feeds(model)["x"]
    (got, *_) = run(unrolled(model, factors), {"x": x})
    np.testing.assert_allclose(got, _numpy_lstm(model, x, factors[0] @ factors[1]), rtol=1e-4, atol=1e-5)


def _numpy_lstm(model, x, joint_t):
    arrays = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    w_t, bias = lstm.joint_input_weights(arrays["W"], arrays["B"])
    d, hidden = w_t.shape[0], w_t.shape[2] // 4
    steps = x.shape[0]
    xw = [x.astype(np.float64) @ w_t[j] for j in range(d)]
    xw[1] = xw[1][::-1]
    joint_x = np.stack([p.reshape(steps, -1, 4, hidden) for p in xw], axis=3).reshape(steps, -1, 4 * d * hidden)
    h = np.zeros((x.shape[1], d * hidden))
    c = np.zeros_like(h)
    hs = []
    for k in range(steps):
        g = joint_x[k] + bias + h @ joint_t
        i, o, f, cc = np.split(g, 4, axis=1)
        sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
        c = sig(f) * c + sig(i) * np.tanh(cc)
        h = sig(o) * np.tanh(c)
        hs.append(h.reshape(-1, d, hidden))
    y = np.stack(hs)  # (T, N, D, H)
    y[:, :, 1] = y[::-1, :, 1]
    return y.transpose(0, 2, 1, 3)


def test_the_states_the_recurrence_reads_come_from_y_in_each_directions_order():
    y = np.arange(3 * 2 * 1 * 2, dtype=float).reshape(3, 2, 1, 2)  # T=3, D=2, N=1, H=2
    rows = lstm.joint_previous_states(y, [False, True])
    # step 1 reads the forward state at time 0 and the reverse state at time 2; step 2: times 1 and 1
    np.testing.assert_array_equal(rows, [[*y[0, 0, 0], *y[2, 1, 0]], [*y[1, 0, 0], *y[1, 1, 0]]])
