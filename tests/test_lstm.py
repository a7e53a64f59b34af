"""LSTM sites: the unrolled splice is exact, the joint recurrence and the states it reads."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnx_cp.graph import lstm
from onnx_cp.graph.forms import macs_after


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


@pytest.mark.parametrize("within_directions", [True, False])
def test_factors_within_directions_take_a_product_per_direction_and_others_the_joint_one(within_directions):
    """The SVD of the block-diagonal recurrence keeps each component in one direction: the splice
    then multiplies each direction's states by its own V_d (H x r_d) and U_d (r_d x 4H) and drops
    the joint factors, half of each zeros.
    Factors that span directions keep the joint product. Both equal the numpy LSTM."""
    model = lstm_model("bidirectional", steps=4, batch=2, initial=False)
    v, u = exact_factors(model)
    left, s, right = np.linalg.svd(u.T @ v.T, full_matrices=False)  # the joint matrix (4DH, DH)
    rank = 5
    factors = ((right[:rank].T * s[:rank]), left[:, :rank].T)  # V (DH, r), U (r, 4DH)
    if not within_directions:
        factors = (factors[0] + 0.1 * np.random.default_rng(0).standard_normal(factors[0].shape), factors[1])
    split = lstm.direction_factors(*factors, 2)
    assert (split is not None) == within_directions
    proto = unrolled(model, factors)
    names = {n.name for n in proto.graph.node}
    initializers = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    if within_directions:
        assert {"rnn/lstm/step1/out0", "rnn/lstm/step1/out1"} <= names and not {"u", "v"} & set(initializers)
        assert sorted(initializers[f"rnn/lstm/u{k}"][0] for k in (0, 1)) == sorted(f[0].shape[1] for f in split)
        assert sum(initializers[f"rnn/lstm/u{k}"][0] for k in (0, 1)) == rank
        assert all(initializers[f"rnn/lstm/u{k}"][1] == 4 * 4 for k in (0, 1))  # 4H, hidden 4
        # each V_d reads only its own direction's H states: no zero block of the joint V is read
        assert [initializers[f"rnn/lstm/v{k}"] for k in (0, 1)] == [(4, initializers[f"rnn/lstm/u{k}"][0])
                                                                    for k in (0, 1)]
    else:
        assert "rnn/lstm/step1/out0" not in names and initializers["u"] == (rank, 4 * 2 * 4)
    x = feeds(model)["x"]
    (got, *_) = run(proto, {"x": x})
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


def _sites(model):
    """The model's sites, with the shapes inference gives (as optimize finds them)."""
    from onnx_cp.graph import find_conv_sites

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input]}
    ir_model = ir.from_proto(model)
    return ir_model, find_conv_sites(ir_model, shapes)


def test_an_lstm_is_a_site_whose_kernel_is_its_joint_recurrence():
    model = lstm_model("bidirectional", steps=5, batch=2, inputs=3, hidden=4)
    _, (site,) = _sites(model)
    r = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "R"))
    assert site.eligible and site.is_lstm and site.steps == 5
    assert site.kernel.shape == (2 * 4 * 4, 2 * 4, 1, 1)
    np.testing.assert_array_equal(site.kernel[:4, :4, 0, 0], r[0, :4])  # input gate, forward block
    assert not site.kernel[:4, 4:].any()  # no coupling between the directions
    assert site.macs_before() == 5 * 2 * 2 * 16 * 4  # T N D 4H H
    # rank 3: each component reads its own direction's H states and feeds its own direction's 4H gates
    assert macs_after(site, "svd", 3) == 5 * 2 * (4 * 3 + 3 * 16)
    assert site.refusal_for("cp") and site.refusal_for("svd") is None


@pytest.mark.parametrize("change, reason", [
    (lambda m: m.graph.input[0].type.tensor_type.shape.dim[0].ClearField("dim_value"), "sequence length"),
    (lambda m: m.graph.node[0].attribute.append(helper.make_attribute("clip", 3.0)), "clip"),
    (lambda m: m.graph.node[0].attribute.append(
        helper.make_attribute("activations", ["Sigmoid", "Tanh", "Relu"] * 2)), "activations"),
    (lambda m: m.graph.node[0].input.__setitem__(4, "x"), "sequence_lens"),
])
def test_lstms_that_cannot_be_unrolled_say_why(change, reason):
    model = lstm_model("bidirectional")
    change(model)
    _, (site,) = _sites(model)
    assert not site.eligible and reason in site.refusal


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_the_pass_splices_an_lstm_svd_plan_exactly_at_full_rank_and_drops_its_weights(direction):
    from onnx_cp.graph import CPConvPass, plan_with
    from onnx_cp.lowrank import channel_svd

    model = lstm_model(direction, initial=False)
    ir_model, sites = _sites(model)
    full = sites[0].kernel.shape[1]
    plan = plan_with(sites, lambda site: full, lambda k, r: channel_svd(k, r).factors, form="svd")
    result = CPConvPass(plan, sites=sites)(ir_model)
    (outcome,) = result.outcomes
    assert outcome.status == "decomposed" and outcome.op == "LSTM" and outcome.rel_error < 1e-6
    proto = ir.to_proto(ir_model)
    assert "LSTM" not in {n.op_type for n in proto.graph.node}
    assert not {"W", "R", "B"} & {i.name for i in proto.graph.initializer}
    feed = feeds(model)
    for expected, got in zip(run(model, feed), run(proto, feed)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_layer_output_error_reads_the_states_the_recurrence_multiplies():
    """On data, an option's error is ||(K - K') h|| / ||K h|| over the states h the LSTM really
    reads, and the Gram matrix behind the data-aware solve is theirs. The model reads sequences
    batch first, one at a time (a CRNN's fixed batch of 1), so the states come batch by batch."""
    from onnx_cp.ranks.forms import solve_form
    from onnx_cp.ranks.output_error import OutputError

    model = lstm_model("bidirectional", steps=6, batch=1, initial=False, outputs=("y",))
    model.graph.input[0].name = "batch_first"
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value, dims[1].dim_value = 1, 6
    model.graph.node.insert(0, helper.make_node("Transpose", ["batch_first"], ["x"], perm=[1, 0, 2]))
    ir_model, sites = _sites(model)
    site = next(s for s in sites if s.is_lstm)
    xs = np.random.default_rng(3).standard_normal((10, 6, 3)).astype(np.float32)  # (samples, T, I)
    errors = OutputError(ir_model, [site], xs)
    states = np.concatenate([lstm.joint_previous_states(run(model, {"batch_first": x[None]})[0], [False, True])
                             for x in xs])
    assert states.shape == (10 * 5, 8)
    (gram,) = errors.grams(site)
    full = states.T.astype(np.float64) @ states
    np.testing.assert_allclose(gram, lstm.within_directions(full, 2), rtol=1e-4)
    assert np.abs(full[:4, 4:]).max() > 0 and not gram[:4, 4:].any()  # the blocks between directions are left out
    result = solve_form(site, "svd", 3, grams=[gram])[0]
    k = site.kernel[:, :, 0, 0].astype(np.float64)
    approx = result.factors[0] @ result.factors[1].reshape(3, -1)
    expected = np.linalg.norm(states @ (k - approx).T) / np.linalg.norm(states @ k.T)
    assert errors(site, [result]) == pytest.approx(expected, rel=1e-4)


def test_a_model_whose_lstm_is_unrolled_takes_only_the_input_shape_it_was_unrolled_for(tmp_path):
    """The sequence length is symbolic in the model and fixed by --input-shape; unrolled, the model
    would misread any other length, so its input is pinned and onnxruntime refuses the rest."""
    from onnx_cp import optimize
    from onnx_cp.ranks.policy import ExplicitRanks
    from onnx_cp.settings import MeasureSettings, SolverSettings

    model = lstm_model("bidirectional", steps=6, batch=1, initial=False, outputs=("y",))
    model.graph.input[0].name = "batch_first"
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value, dims[1].dim_param = 1, "T"
    model.graph.node.insert(0, helper.make_node("Transpose", ["batch_first"], ["x"], perm=[1, 0, 2]))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", 1, ["T", 2, 1, 4]))
    path = tmp_path / "rnn.onnx"
    onnx.save(model, path)
    result = optimize(str(path), ExplicitRanks(per_layer={"rnn": 4}),
                      solver=SolverSettings(decomposition="svd", workers=1),
                      measure=MeasureSettings(input_shapes={"batch_first": [1, 6, 3]}))
    (row,) = [r for r in result.report["layers"] if r["name"] == "rnn"]
    assert row["status"] == "decomposed" and row["op"] == "LSTM" and row["inputs_fixed"] == {"batch_first": [1, 6, 3]}
    written = ir.to_proto(result.model)
    session = ort.InferenceSession(written.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 6, 3)).astype(np.float32)
    assert session.run(None, {"batch_first": x})[0].shape == (6, 2, 1, 4)
    with pytest.raises(Exception, match="dimensions"):
        session.run(None, {"batch_first": np.zeros((1, 7, 3), np.float32)})


def test_int8_leaves_an_unrolled_lstm_float_and_quantizes_the_rest():
    """A conv before the LSTM is quantized; the unrolled steps, whose states feed every later
    step, stay float."""
    from onnx_cp.graph import CPConvPass, plan_with
    from onnx_cp.lowrank import channel_svd
    from onnx_cp.quantize import quantize_int8

    rng = np.random.default_rng(0)
    model = lstm_model("bidirectional", steps=6, batch=1, inputs=8, hidden=4, initial=False, outputs=("y",))
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("img", 1, [1, 4, 1, 6]))
    model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((8, 4, 1, 1)).astype(np.float32), "K"))
    model.graph.node.insert(0, helper.make_node("Conv", ["img", "K"], ["c"], name="conv"))
    model.graph.node.insert(1, helper.make_node("Transpose", ["c"], ["t"], perm=[3, 0, 1, 2]))  # (6, 1, 8, 1)
    model.graph.node.insert(2, helper.make_node("Reshape", ["t", "shape"], ["x"]))
    model.graph.initializer.append(numpy_helper.from_array(np.array([6, 1, 8], np.int64), "shape"))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", 1, [6, 2, 1, 4]))
    ir_model, sites = _sites(model)
    lstm_site = next(s for s in sites if s.is_lstm)
    plan = plan_with([lstm_site], lambda site: 4, lambda k, r: channel_svd(k, r).factors, form="svd")
    CPConvPass(plan, sites=[lstm_site])(ir_model)
    quantized = ir.to_proto(quantize_int8(ir_model, rng.standard_normal((32, 4, 1, 6)).astype(np.float32),
                                          max_output_error=10.0))
    producers = {o: n for n in quantized.graph.node for o in n.output}
    unrolled = [n for n in quantized.graph.node if "/lstm/" in n.name and n.op_type == "MatMul"]
    floats = {i.name for i in quantized.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert unrolled and all(n.input[1] in floats for n in unrolled)  # float weights, no DequantizeLinear
    steps = [n for n in unrolled if "/step" in n.name]
    assert not any(producers[n.input[0]].op_type == "DequantizeLinear" for n in steps)  # states stay float
    conv = next(n for n in quantized.graph.node if n.op_type == "Conv")
    assert producers[conv.input[0]].op_type == "DequantizeLinear"
