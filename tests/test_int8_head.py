"""A detector head that concatenates boxes in pixels with sigmoid class scores: INT8 must keep the
scores (the float tail), and a quantized model that breaks is an error, not a result."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import model_factory
from onnx_cp import api
from onnx_cp.cli import main
from onnx_cp.errors import OnnxCpError
from onnx_cp.quantize import int8_scheme, quantize_int8
from onnx_cp.quantize.mixed import float_tail
from onnx_cp.runtime import model_io
from onnx_cp.runtime.fidelity import compare_output
from onnx_cp.settings import LayerSelection, QuantizeSettings

CLASSES, SIZE = 3, 16


def head_model(seed: int = 0) -> onnx.ModelProto:
    """x (N, 3, 16, 16) -> Conv 3x3 + Relu -> [Conv 1x1 -> boxes: 160 + 100 * b (pixels)]
    + [Conv 1x1 -> Sigmoid (scores in 0..1)] -> Concat -> Reshape -> y (N, 4 + 3, 256), YOLOv8's layout."""
    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("w0", 16, 3, 3, 3), init("b0", 16), init("wb", 4, 16, 1, 1), init("wc", CLASSES, 16, 1, 1),
             init("bc", CLASSES, scale=1.0),
             numpy_helper.from_array(np.array(100.0, np.float32), "gain"),
             numpy_helper.from_array(np.array(160.0, np.float32), "offset"),
             numpy_helper.from_array(np.array([0, 4 + CLASSES, -1], np.int64), "shape")]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["f0"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["f0"], ["f"], name="stem_relu"),
        helper.make_node("Conv", ["f", "wb"], ["b_raw"], name="box_conv"),
        helper.make_node("Mul", ["b_raw", "gain"], ["b_scaled"], name="box_gain"),
        helper.make_node("Add", ["b_scaled", "offset"], ["boxes"], name="box_offset"),
        helper.make_node("Conv", ["f", "wc", "bc"], ["logits"], name="cls_conv"),
        helper.make_node("Sigmoid", ["logits"], ["scores"], name="cls_sigmoid"),
        helper.make_node("Concat", ["boxes", "scores"], ["head"], name="head_concat", axis=1),
        helper.make_node("Reshape", ["head", "shape"], ["y"], name="head_reshape"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4 + CLASSES, SIZE * SIZE])
    graph = helper.make_graph(nodes, "head", [x], [y], inits)
    return model_factory.make_model(graph)


def inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def run(model, x: np.ndarray) -> np.ndarray:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def head() -> onnx.ModelProto:
    return head_model()


def test_the_float_tail_is_what_lies_between_the_last_convs_and_the_output(head):
    kept = float_tail(model_io.to_ir(head))
    assert set(kept) == {"box_gain", "box_offset", "cls_sigmoid", "head_concat", "head_reshape"}
    assert kept["cls_sigmoid"] == "score activation at the head"
    assert kept["head_reshape"] == "produces a graph output"


def test_int8_keeps_the_scores_beside_pixel_boxes(head):
    x = inputs(32, seed=2)
    expected = run(head, x)
    assert expected[:, :4].max() > 100 and expected[:, 4:].max() <= 1.0  # two ranges in one tensor
    quantized = quantize_int8(head, inputs(64, seed=1))
    fidelity = compare_output("y", expected, run(quantized, x))
    assert fidelity.kind == "detections"
    assert fidelity.group_errors["class scores"] < 0.05
    assert fidelity.agreement["top10 anchors"] >= 0.8
    scheme = int8_scheme(quantized)
    # onnxruntime's pre-processing folds box_gain into box_conv; the rest of the tail stays float.
    assert set(scheme.float_nodes) == {"box_offset", "cls_sigmoid", "head_concat", "head_reshape"}
    assert scheme.check["worst_group_error"] < 0.05
    # ...and the convs are INT8 still: their weights are stored as 8-bit integers.
    graph = ir.to_proto(quantized).graph
    int8_weights = {t.name for t in graph.initializer
                    if t.data_type == TensorProto.INT8 and t.name.endswith("_quantized")}
    assert len(int8_weights) == 3
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert producers["y"] == "Reshape" and producers["head"] == "Concat" and producers["scores"] == "Sigmoid"


def test_one_scale_for_the_head_wipes_the_scores_and_is_refused(head):
    # Without the float tail the concatenated output gets one scale of about 1 pixel: every score
    # rounds to 0 while the whole-tensor error stays small. The check says so, in one line.
    with pytest.raises(OnnxCpError, match=r"class scores moved by 0\.9\d*|class scores moved by 1") as info:
        quantize_int8(head, inputs(64, seed=1), keep_float_tail=False)
    assert "\n" not in str(info.value) and "nothing written" in str(info.value)


def cli(*args) -> int:
    return main([str(a) for a in args])


def test_cli_refuses_a_broken_int8_model_and_writes_nothing(head, tmp_path, capsys):
    source, out, data = tmp_path / "head.onnx", tmp_path / "out.onnx", tmp_path / "calib.npz"
    onnx.save(head, source)
    np.savez(data, x=inputs(32, seed=1))
    code = cli("optimize", source, out, "--quantize", "int8", "--calibration-data", data, "--int8-max-error", "1e-6",
               "--report", tmp_path / "r.json", "-q")
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert "\n" not in err and "INT8 broke the model" in err and "moved by" in err
    assert not out.exists() and not (tmp_path / "r.json").exists()


def test_cli_records_target_bits_and_check(head, tmp_path, capsys):
    source, out, data, report = tmp_path / "head.onnx", tmp_path / "out.onnx", tmp_path / "c.npz", tmp_path / "r.json"
    onnx.save(head, source)
    np.savez(data, x=inputs(32, seed=1))
    code = cli("optimize", source, out, "--quantize", "int8", "--calibration-data", data, "--int8-target", "portable",
               "--report", report, "-q")
    assert code == 0, capsys.readouterr().err
    quantize = json.loads(report.read_text())["quantize"]
    assert quantize["target"] == "portable" and quantize["weight_bits"] == 7
    # the float tail: the scores' Sigmoid, Concat, Reshape (the box scale and offset are folded into box_conv)
    assert quantize["float_nodes"] == 3 and quantize["check"]["worst_group_error"] < 0.05
    assert int8_scheme(out).weight_bits == 7
    x = inputs(8, seed=3)
    assert compare_output("y", run(head, x), run(onnx.load(out), x)).group_errors["class scores"] < 0.05


def test_int8_options_without_quantize_are_a_usage_error(head, tmp_path, capsys):
    source = tmp_path / "head.onnx"
    onnx.save(head, source)
    assert cli("optimize", source, tmp_path / "o.onnx", "--int8-target", "portable") == 2
    assert "--quantize int8" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def loud_channel_model() -> onnx.ModelProto:
    """x -> conv_a -> Relu -> conv_b -> Relu -> conv1 -> Relu -> conv2 -> y (1x1 convs, 8 channels).
    conv1's channel 0 is 1000x louder than the others and conv2 reads it 1000x quieter: the output
    depends on all channels alike, but one 8-bit scale for conv1's output rounds the quiet ones away."""
    rng = np.random.default_rng(0)
    loud = np.ones((8, 1, 1, 1), np.float32)
    loud[0] = 1000.0
    weights = {"conv_a": rng.standard_normal((8, 3, 1, 1)), "conv_b": rng.standard_normal((8, 8, 1, 1)) / 3,
               "conv1": rng.standard_normal((8, 8, 1, 1)) / 3 * loud,
               "conv2": rng.standard_normal((4, 8, 1, 1)) / 3 / loud.reshape(1, 8, 1, 1)}
    nodes, previous = [], "x"
    for i, name in enumerate(weights):
        out = "y" if name == "conv2" else f"{name}_out"
        nodes.append(helper.make_node("Conv", [previous, f"{name}.w"], [out], name=name))
        if name != "conv2":
            nodes.append(helper.make_node("Relu", [out], [f"{name}_relu"], name=f"relu{i}"))
            previous = f"{name}_relu"
    inits = [numpy_helper.from_array(w.astype(np.float32), f"{name}.w") for name, w in weights.items()]
    graph = helper.make_graph(nodes, "loud", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    return model_factory.make_model(graph)


def test_the_layer_int8_hurts_most_is_kept_float_with_its_input_path():
    model = loud_channel_model()
    calibration = np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)
    x = np.random.default_rng(2).standard_normal((16, 3, 8, 8)).astype(np.float32)
    with pytest.raises(OnnxCpError, match="INT8 broke the model"):  # no search without the float tail
        quantize_int8(model, calibration, keep_float_tail=False)
    quantized = quantize_int8(model, calibration)
    scheme = int8_scheme(quantized)
    assert set(scheme.float_nodes) == {"conv2", "relu2", "conv1"}  # conv_a, conv_b stay INT8
    expected = run(model, x)
    fidelity = compare_output("y", expected, run(quantized, x))
    assert fidelity.worst_group_error < 0.15 and scheme.check["worst_group_error"] < 0.15
    weights = {t.name for t in ir.to_proto(quantized).graph.initializer
               if t.data_type == TensorProto.INT8 and t.name.endswith("_quantized")}
    assert weights == {"conv_a.w_quantized", "conv_b.w_quantized"}


def conv_chain_model(convs: int = 8) -> onnx.ModelProto:
    """x -> (Conv 1x1 -> Relu) x convs -> y, 8 channels."""
    rng = np.random.default_rng(0)
    nodes, inits, previous = [], [], "x"
    for i in range(convs):
        inits.append(numpy_helper.from_array((rng.standard_normal((8, 8 if i else 3, 1, 1)) / 3).astype(np.float32),
                                             f"w{i}"))
        nodes += [helper.make_node("Conv", [previous, f"w{i}"], [f"c{i}"], name=f"conv{i}"),
                  helper.make_node("Relu", [f"c{i}"], ["y" if i == convs - 1 else f"r{i}"], name=f"relu{i}")]
        previous = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])], inits)
    return model_factory.make_model(graph)


def test_mixed_precision_keeps_as_few_layers_float_as_the_check_allows(monkeypatch):
    """The check passes once the 3 layers INT8 hurts most are float: doubling finds 4, a bisection 3
    (each kept float with the Conv that writes its input, see float_islands)."""
    from onnx_cp.quantize import check, int8

    ranking = [f"conv{i}" for i in (5, 2, 6, 1, 0, 3, 4, 7)]
    monkeypatch.setattr(int8, "_sensitivity_rankings", lambda *args, **kw: iter([ranking]))

    def float_convs(model) -> set[str]:
        dequantized = {n.outputs[0].name for n in model.graph if n.op_type == "DequantizeLinear"}
        return {n.name for n in model.graph if n.op_type == "Conv" and n.inputs[1].name not in dequantized}

    tried = []

    def fake_check(expected, quantized, max_output_error):
        floats = float_convs(model_io.to_ir(quantized))
        tried.append(len(floats))
        error = 0.01 if set(ranking[:3]) <= floats else 0.5
        return check.Int8Check(len(expected.inputs), error, "y: mean channel", {}, max_output_error)

    monkeypatch.setattr(int8, "check_against", fake_check)
    calibration = np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32)
    scheme = int8_scheme(quantize_int8(conv_chain_model(), calibration))
    kept = {name for name in scheme.float_nodes if name.startswith("conv")}
    # counts 1, 2, 4 (each with the convs writing their inputs), then 3: fewer float convs than 4's
    assert len(tried) == 5 and tried[-1] < tried[-2] and len(kept) == tried[-1] and set(ranking[:3]) <= kept


def two_branch_model(loud_q: float = 1000.0) -> onnx.ModelProto:
    """y = q2(relu(q1(x))) + 0.001 * p2(relu(p1(x))), 1x1 convs of 8 channels. Both branches have one
    loud channel that the next conv reads back quietly (as in loud_channel_model), so INT8 rounds the
    quiet channels of q1's and p1's outputs away; but branch p barely reaches y."""
    rng = np.random.default_rng(0)

    def loud(factor: float) -> np.ndarray:
        gains = np.ones(8, np.float32)
        gains[0] = factor
        return gains

    weights = {"q1": rng.standard_normal((8, 3, 1, 1)) * loud(loud_q).reshape(8, 1, 1, 1),
               "q2": rng.standard_normal((8, 8, 1, 1)) / 3 / loud(loud_q).reshape(1, 8, 1, 1),
               "p1": rng.standard_normal((8, 3, 1, 1)) * loud(1e4).reshape(8, 1, 1, 1),
               "p2": rng.standard_normal((8, 8, 1, 1)) / 3 / loud(1e4).reshape(1, 8, 1, 1)}
    inits = [numpy_helper.from_array(w.astype(np.float32), f"{name}.w") for name, w in weights.items()]
    inits.append(numpy_helper.from_array(np.array(1e-3, np.float32), "quiet"))
    nodes = []
    for branch in "qp":
        nodes += [helper.make_node("Conv", ["x", f"{branch}1.w"], [f"{branch}1"], name=f"{branch}1"),
                  helper.make_node("Relu", [f"{branch}1"], [f"{branch}r"], name=f"relu_{branch}"),
                  helper.make_node("Conv", [f"{branch}r", f"{branch}2.w"], [f"{branch}2"], name=f"{branch}2")]
    nodes += [helper.make_node("Mul", ["p2", "quiet"], ["p_quiet"], name="mul"),
              helper.make_node("Add", ["q2", "p_quiet"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "branches",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])], inits)
    return model_factory.make_model(graph)


def test_layers_are_kept_float_by_their_measured_effect_on_the_outputs_not_by_their_own_error():
    """Branch p's second conv loses the most of its own output to INT8, and a local estimate ranks it
    first; but only branch q moves y. Measured at the outputs, q2 alone is kept float."""
    from onnx_cp.quantize import int8
    from onnx_cp.quantize.sensitivity import rank_by_added_error

    model = two_branch_model()
    calibration = np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)
    tail_only = int8.quantize_for_timing(model, calibration)  # every conv INT8, unchecked
    prepared = int8._prepared(model_io.to_ir(model))
    assert rank_by_added_error(prepared, tail_only, calibration[:8])[0] == "p2"  # the local estimate's pick

    quantized = quantize_int8(model, calibration)
    scheme = int8_scheme(quantized)
    assert {"q2", "relu_q"} <= set(scheme.float_nodes) and not {"p1", "p2"} & set(scheme.float_nodes)
    x = np.random.default_rng(2).standard_normal((16, 3, 8, 8)).astype(np.float32)
    assert compare_output("y", run(model, x), run(quantized, x)).worst_group_error < 0.15
    assert compare_output("y", run(model, x), run(tail_only, x)).worst_group_error > 0.15


def test_when_the_measured_order_misses_the_check_the_local_estimates_order_is_tried(monkeypatch):
    """Error that falls only once several nodes are float together defeats one-at-a-time gains
    (PP-OCRv4's detector): the local estimate's order is tried next, as before measured gains."""
    from onnx_cp.quantize import int8

    tried = []

    def useless_order(candidates, shortfall_with_float):
        tried.append(list(candidates))
        return list(reversed(candidates))  # the least sensitive first

    monkeypatch.setattr(int8, "rank_by_measured_gain", useless_order)
    model = loud_channel_model()
    calibration = np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)
    scheme = int8_scheme(quantize_int8(model, calibration))
    assert tried and set(scheme.float_nodes) == {"conv2", "relu2", "conv1"}
    assert scheme.check["worst_group_error"] < 0.15


def cancelling_chain_model() -> onnx.ModelProto:
    """x -> stem (1x1, 3 -> 3) -> Relu -> a/tucker2/{in, core, out} + b/tucker2/{in, core, out} -> y,
    1x1 convs. Chain a computes its small result as differences of large, nearly equal channels
    (in: pairs 100 u.x + v.x and 100 u.x; core: identity; out: the pair's difference), as a
    degenerate low-rank fit does: one 8-bit scale per tensor rounds the difference away in every
    tensor between its stages, so no one stage kept float repairs it. Chain b is benign."""
    rng = np.random.default_rng(0)
    u, v = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    a_in = np.stack([row for k in range(4) for row in (100 * u[k] + v[k], 100 * u[k])])[:, :, None, None]
    a_out = np.zeros((4, 8, 1, 1))
    for k in range(4):
        a_out[k, 2 * k], a_out[k, 2 * k + 1] = 1.0, -1.0
    weights = {"stem": rng.standard_normal((3, 3, 1, 1)),
               "a/tucker2/in": a_in, "a/tucker2/core": np.eye(8)[:, :, None, None], "a/tucker2/out": a_out,
               "b/tucker2/in": rng.standard_normal((4, 3, 1, 1)), "b/tucker2/core": rng.standard_normal((4, 4, 1, 1)),
               "b/tucker2/out": rng.standard_normal((4, 4, 1, 1)) / 2}
    inits = [numpy_helper.from_array(w.astype(np.float32), f"{name}.weight") for name, w in weights.items()]
    nodes = [helper.make_node("Conv", ["x", "stem.weight"], ["s"], name="stem"),
             helper.make_node("Relu", ["s"], ["r"], name="stem_relu")]
    for chain in "ab":
        previous = "r"
        for stage in ("in", "core", "out"):
            name = f"{chain}/tucker2/{stage}"
            nodes.append(helper.make_node("Conv", [previous, f"{name}.weight"], [name], name=name))
            previous = name
    nodes.append(helper.make_node("Add", ["a/tucker2/out", "b/tucker2/out"], ["y"], name="add"))
    graph = helper.make_graph(nodes, "chains", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    return model_factory.make_model(graph)


def test_a_decomposed_layers_chain_is_kept_float_as_one_unit(monkeypatch):
    from onnx_cp.quantize import int8, sensitivity

    model = cancelling_chain_model()
    assert int8._float_units(int8._prepared(model_io.to_ir(model))) == {
        "stem": ["stem"], "a": [f"a/tucker2/{s}" for s in ("in", "core", "out")],
        "b": [f"b/tucker2/{s}" for s in ("in", "core", "out")]}
    scanned = []

    def spy(candidates, shortfall_with_float):
        scanned.append(list(candidates))
        return sensitivity.rank_by_measured_gain(candidates, shortfall_with_float)

    monkeypatch.setattr(int8, "rank_by_measured_gain", spy)
    calibration = np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)
    x = np.random.default_rng(2).standard_normal((16, 3, 8, 8)).astype(np.float32)
    assert compare_output("y", run(model, x), run(int8.quantize_for_timing(model, calibration), x)
                          ).worst_group_error > 0.15  # every chain in INT8
    quantized = quantize_int8(model, calibration)
    kept = set(int8_scheme(quantized).float_nodes)
    assert scanned and set(scanned[0]) <= {"stem", "a", "b"}  # units, not their stages
    assert {"a/tucker2/in", "a/tucker2/core", "a/tucker2/out"} <= kept
    assert not {"b/tucker2/in", "b/tucker2/core"} & kept  # (stem is float: it writes a's input)
    assert "a" in int8_scheme(quantized).float_units and "b" not in int8_scheme(quantized).float_units
    assert compare_output("y", run(model, x), run(quantized, x)).worst_group_error < 0.15


def test_a_chain_the_plan_keeps_float_is_float_from_the_start(monkeypatch):
    from onnx_cp.quantize import int8

    scanned = []
    monkeypatch.setattr(int8, "rank_by_measured_gain", lambda candidates, _: scanned.append(candidates) or candidates)
    model = cancelling_chain_model()
    calibration = np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)
    x = np.random.default_rng(2).standard_normal((16, 3, 8, 8)).astype(np.float32)
    quantized = quantize_int8(model, calibration, keep_float={"a"})
    assert {"a/tucker2/in", "a/tucker2/core", "a/tucker2/out"} <= set(int8_scheme(quantized).float_nodes)
    assert not scanned and int8_scheme(quantized).float_units == ("a",)  # passed at once: no search
    assert compare_output("y", run(model, x), run(quantized, x)).worst_group_error < 0.15


@pytest.mark.parametrize("int8_speedup, warned", [(0.5, True), (2.0, False)])
def test_int8_asked_for_is_timed_against_float_and_a_slower_one_is_said(head, monkeypatch, int8_speedup, warned):
    """Explicit ranks with --quantize int8 write INT8 as asked, and say when it measured slower than
    the float model (the timing is faked: tests do not measure speed)."""
    monkeypatch.setattr(api._Run, "speedups_of", lambda self, models: [1.0, int8_speedup][:len(models)])
    result = api.optimize(head, 4, layers=LayerSelection(include="^stem$"),
                          quantize=QuantizeSettings(calibration_data=inputs(16, seed=1)))
    assert result.report["quantize"]["speedup_over_float"] == int8_speedup
    assert int8_scheme(model_io.to_ir(result.model)) is not None  # written in INT8 either way
    said = [w for w in result.report.get("warnings", []) if "the speed of the float model" in w]
    assert bool(said) == warned
