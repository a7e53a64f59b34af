"""Bad input models and data are refused before any work, with one line naming the problem (and the
cases benchmarks/fuzz.py found); models that are odd but valid still work."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import model_factory
from onnx_cp import cli
from onnx_cp.cli import main


def _run(capfd, *argv):
    """main() in-process: exit code and the non-empty stderr lines (fd 2 too: onnxruntime's C++ logs)."""
    code = main([str(a) for a in argv])
    err = capfd.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def _optimize(capfd, tmp_path, proto, *extra, name="in.onnx"):
    path = tmp_path / name
    if isinstance(proto, bytes):
        path.write_bytes(proto)
    else:
        onnx.save(proto, str(path))
    before = path.read_bytes()
    out = tmp_path / "out.onnx"
    code, lines = _run(capfd, "optimize", path, out, "-q", "--workers", "1", "--rank", "3",
                       "--report", tmp_path / "r.json", *extra)
    assert path.read_bytes() == before
    if code:
        assert len(lines) == 1, lines
        assert lines[0].startswith("onnx-cp optimize: error: ")
        assert "(rerun with --debug)" not in lines[0]
        assert not out.exists() and not (tmp_path / "r.json").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx-cp-") or p.suffix == ".tmp"]
    return code, lines, out


def _init(proto, name):
    return next(t for t in proto.graph.initializer if t.name == name)


def _refused(capfd, tmp_path, proto, expected, code=1):
    got, lines, _ = _optimize(capfd, tmp_path, proto)
    assert got == code, lines
    assert expected in lines[0], lines
    return lines[0]


def _outputs(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


X = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)


# --- structure ----------------------------------------------------------------------------------


def test_duplicate_initializer_is_refused(capfd, tmp_path):
    """W and 2W under one name: onnx-cp used to pick one and compute another function (exit 0)."""
    proto = model_factory.tiny_cnn()
    w = numpy_helper.to_array(_init(proto, "conv2.weight"))
    proto.graph.initializer.append(numpy_helper.from_array(2 * w, "conv2.weight"))
    line = _refused(capfd, tmp_path, proto, "duplicate initializer name 'conv2.weight'")
    assert str(tmp_path / "in.onnx") in line


def test_value_produced_twice_is_refused(capfd, tmp_path):
    proto = model_factory.tiny_cnn()
    proto.graph.node[1].output[0] = "c1"
    proto.graph.node[2].input[0] = "c1"
    _refused(capfd, tmp_path, proto, "value 'c1' is produced twice")


def test_dangling_input_is_refused(capfd, tmp_path):
    proto = model_factory.tiny_cnn()
    proto.graph.node[2].input[0] = "nothing"
    _refused(capfd, tmp_path, proto, "input 'nothing' of node 'conv2' is produced by no node")


def test_cycle_is_refused(capfd, tmp_path):
    proto = model_factory.tiny_cnn()
    proto.graph.node[0].input[0] = "r1"
    _refused(capfd, tmp_path, proto, "the graph has a cycle")


def test_duplicate_node_names_are_refused(capfd, tmp_path):
    """onnxruntime refuses them too; found by the fuzzer as an IndexError in the splice."""
    proto = model_factory.tiny_cnn()
    proto.graph.node[1].name = "conv1"
    _refused(capfd, tmp_path, proto, "two nodes are named 'conv1'")


def test_checker_findings_are_refused_with_its_first_line(capfd, tmp_path):
    proto = model_factory.tiny_cnn()
    conv = proto.graph.node[0]
    pads = next(a for a in conv.attribute if a.name == "pads")
    pads.type = onnx.AttributeProto.FLOAT  # pads as a float
    _refused(capfd, tmp_path, proto, "not a valid ONNX model (type field and data field mismatch in attribute pads")


def test_unsorted_graph_is_sorted_not_refused(capfd, tmp_path):
    proto = model_factory.tiny_cnn()
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(nodes))
    code, lines, out = _optimize(capfd, tmp_path, proto)
    assert code == 0, lines
    onnx.checker.check_model(str(out))
    reference = model_factory.tiny_cnn()
    onnx.save(reference, str(tmp_path / "ref.onnx"))
    error = np.linalg.norm(_outputs(out, X) - _outputs(tmp_path / "ref.onnx", X)) / np.linalg.norm(
        _outputs(tmp_path / "ref.onnx", X))
    assert error < 3 * json.loads((tmp_path / "r.json").read_text())["verification"]["max_rel_error"] + 1e-3


# --- weights that are graph inputs --------------------------------------------------------------


def test_weight_that_is_also_a_graph_input_is_left_alone(capfd, tmp_path):
    """IR >= 4: an initializer listed as a graph input is a default the caller can override."""
    proto = model_factory.tiny_cnn()
    w = _init(proto, "conv2.weight")
    proto.graph.input.append(helper.make_tensor_value_info("conv2.weight", TensorProto.FLOAT, list(w.dims)))
    code, lines, out = _optimize(capfd, tmp_path, proto)
    assert code == 0, lines
    written = onnx.load(str(out))
    assert [i.name for i in written.graph.input] == ["x", "conv2.weight"]
    layers = {row["name"]: row for row in json.loads((tmp_path / "r.json").read_text())["layers"]}
    assert layers["conv2"]["status"] == "skipped"
    assert layers["conv2"]["reason"] == "weight is also a graph input (can be overridden at run time)"
    assert layers["conv1"]["status"] == "decomposed"
    # Overriding the weight still works on the written model.
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    zero = np.zeros(list(w.dims), np.float32)
    logits = session.run(None, {"x": X, "conv2.weight": zero})[0]
    bias = numpy_helper.to_array(_init(proto, "conv2.bias"))
    fc_w, fc_b = (numpy_helper.to_array(_init(proto, n)) for n in ("fc.weight", "fc.bias"))
    np.testing.assert_allclose(logits, np.maximum(bias, 0) @ fc_w.T + fc_b + 0 * logits, rtol=1e-4, atol=1e-5)


def test_ir3_weights_listed_as_inputs_are_still_decomposed(capfd, tmp_path):
    """IR 3 lists every initializer as an input (not overridable): nothing to refuse there."""
    proto = model_factory.tiny_cnn()
    proto.ir_version = 3
    del proto.opset_import[:]
    proto.opset_import.append(helper.make_opsetid("", 8))
    for t in proto.graph.initializer:
        proto.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    code, lines, out = _optimize(capfd, tmp_path, proto)
    assert code == 0, lines
    layers = json.loads((tmp_path / "r.json").read_text())["layers"]
    assert [row["status"] for row in layers] == ["decomposed", "decomposed", "skipped"]  # fc: CP does not apply
    onnx.checker.check_model(str(out))


# --- versions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version, expected", [(0, "ir_version is not set"),
                                               (99, "ir_version 99 is outside what onnxruntime runs")])
def test_ir_version_outside_onnxruntime_is_refused(capfd, tmp_path, version, expected):
    proto = model_factory.tiny_cnn()
    proto.ir_version = version
    _refused(capfd, tmp_path, proto, expected)


@pytest.mark.parametrize("opset", [0, 50])
def test_opset_outside_supported_range_is_refused(capfd, tmp_path, opset):
    proto = model_factory.tiny_cnn()
    proto.opset_import[0].version = opset
    _refused(capfd, tmp_path, proto, f"opset {opset} of the default ONNX domain is outside")


# --- tensors and inputs -------------------------------------------------------------------------


def _external(tmp_path, key, value):
    path = tmp_path / "in.onnx"
    onnx.save(model_factory.tiny_cnn(), str(path), save_as_external_data=True, location="in.data",
              size_threshold=0)
    stored = onnx.load(str(path), load_external_data=False)
    tensor = _init(stored, "conv2.weight")
    entries = {e.key: e for e in tensor.external_data}
    if key in entries:
        entries[key].value = value
    else:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return stored.SerializeToString()


@pytest.mark.parametrize("key, value, expected", [
    ("offset", str(10**6), "external data of tensor 'conv2.weight': offset+length beyond the end of in.data"),
    ("length", str(10**6), "offset+length beyond the end of in.data"),
    ("length", "8", "needs 51200 bytes"),
    ("length", "51196", "length 51196 but its shape"),  # found by the fuzzer: onnxruntime refused it
    ("offset", "abc", "offset/length are not integers"),
])
def test_external_data_past_its_file_is_refused(capfd, tmp_path, key, value, expected):
    _refused(capfd, tmp_path, _external(tmp_path, key, value), expected)


def test_raw_data_not_matching_shape_and_type_is_refused(capfd, tmp_path):
    """Found by the fuzzer: float64 bytes labelled bfloat16 crashed with a reshape ValueError."""
    proto = model_factory.tiny_cnn()
    _init(proto, "conv2.weight").data_type = TensorProto.BFLOAT16
    _refused(capfd, tmp_path, proto, "tensor 'conv2.weight' holds 51200 bytes but its shape")


@pytest.mark.parametrize("dims, elem_type, expected", [
    ([-3, 3, 16, 16], TensorProto.FLOAT, "graph input 'x' has a negative dimension"),
    ([2**40, 3, 16, 16], TensorProto.FLOAT, "too large to run"),
    (["N", 3, 16, 16], TensorProto.UNDEFINED, "graph input 'x' has no element type"),
])
def test_bad_graph_inputs_are_refused(capfd, tmp_path, dims, elem_type, expected):
    """Found by the fuzzer: ValueError / MemoryError / TypeError fallbacks."""
    proto = model_factory.tiny_cnn()
    proto.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", elem_type, dims))
    _refused(capfd, tmp_path, proto, expected)


def test_a_dimension_of_minus_one_is_a_free_one(tmp_path):
    """Older paddle2onnx writes -1 for a free dimension; onnxruntime runs such a model, so onnx-cp
    reads it as unknown (the file is left as it was)."""
    proto = model_factory.tiny_cnn()
    proto.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, -1, -1]))
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(proto, source)
    before = source.read_bytes()
    assert main(["optimize", str(source), str(out), "--rank", "4", "--input-shape", "x:2,3,16,16", "-q"]) == 0
    assert source.read_bytes() == before
    dims = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [0, 3, 0, 0] and not any(d.HasField("dim_value") and d.dim_value < 0
                                                                   for d in dims)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": x})[0].shape[0] == 2


def test_conv_with_malformed_pads_is_not_spliced(capfd, tmp_path):
    """Found by the fuzzer: pads with 2 values made the splice raise IndexError; now the Conv is left
    alone and onnxruntime's refusal of the input model is the one line."""
    proto = model_factory.tiny_cnn()
    conv = proto.graph.node[0]
    for i, attr in enumerate(conv.attribute):
        if attr.name == "pads":
            del conv.attribute[i]
    conv.attribute.append(helper.make_attribute("pads", [1, 1]))
    _refused(capfd, tmp_path, proto, "onnxruntime cannot run the input model")


def test_malformed_conv_attributes_have_reasons():
    import onnx_ir as ir

    from onnx_cp.graph.sites import find_conv_sites

    cases = {"strides": ([0, 1], "values must be positive"), "kernel_shape": ([5, 5], "does not match"),
             "dilations": ([1], "needs 2 values"), "auto_pad": ("MAYBE", "invalid auto_pad")}
    for name, (value, expected) in cases.items():
        proto = model_factory.tiny_cnn()
        conv = proto.graph.node[0]
        for i, attr in enumerate(conv.attribute):
            if attr.name == name:
                del conv.attribute[i]
        conv.attribute.append(helper.make_attribute(name, value))
        sites = find_conv_sites(ir.serde.deserialize_model(proto))
        assert expected in sites[0].refusal, (name, sites[0].refusal)


# --- NaN / Inf ----------------------------------------------------------------------------------


def _with_nonfinite(name, index=0):
    proto = model_factory.tiny_cnn()
    tensor = _init(proto, name)
    array = numpy_helper.to_array(tensor).copy()
    array.reshape(-1)[index] = np.nan
    tensor.CopyFrom(numpy_helper.from_array(array, name))
    return proto


@pytest.mark.parametrize("name", ["conv2.weight", "fc.bias"])
def test_nan_in_input_model_is_not_blamed_on_the_rewrite(capfd, tmp_path, name):
    """The input model already produces NaN on random inputs: the run says so and compares where its
    outputs are finite (it used to refuse: "the rewritten model produces NaN")."""
    code, lines, out = _optimize(capfd, tmp_path, _with_nonfinite(name))
    assert code == 0, lines
    report = json.loads((tmp_path / "r.json").read_text())
    notes = report["verification"]["notes"]
    assert any("the input model already produces NaN or infinity on random inputs" in n for n in notes)
    layers = {row["name"]: row for row in report["layers"]}
    if name == "conv2.weight":
        assert layers["conv2"]["reason"] == "weight holds NaN or infinity"


def test_rewrite_producing_nan_is_still_refused():
    from onnx_cp.errors import OnnxCpError
    from onnx_cp.runtime.verify import compare_outputs

    outputs = compare_outputs([np.ones(3)], [np.array([1.0, np.nan, 1.0])], ["y"])
    assert outputs["y"]["finite"] is False
    partial = compare_outputs([np.array([np.nan, 1.0])], [np.array([np.nan, 1.5])], ["y"])
    assert partial["y"]["finite"] is True and partial["y"]["input_finite"] is False
    assert partial["y"]["max_abs_error"] == 0.5
    assert OnnxCpError  # the raise itself is in verify_rewrite


def test_eval_refuses_nan_samples(capfd, tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(model_factory.tiny_cnn(), str(model))
    x = np.random.default_rng(0).random((20, 3, 16, 16)).astype(np.float32)
    x[7, 0, 1, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(20) % 10)
    code, lines = _run(capfd, "eval", model, "--data", tmp_path / "nan.npz", "-q")
    assert code == 1
    assert lines == [f"onnx-cp eval: error: {tmp_path / 'nan.npz'}: sample 7 of x holds NaN or infinity"]


def test_nan_mean_is_a_usage_error(capfd, tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(model_factory.tiny_cnn(), str(model))
    np.savez(tmp_path / "ok.npz", x=np.zeros((4, 3, 16, 16), np.float32), y=np.arange(4))
    code, lines = _run(capfd, "eval", model, "--data", tmp_path / "ok.npz", "--mean", "nan", "-q")
    assert code == 2 and len(lines) == 1 and "must be finite" in lines[0]


# --- stderr hygiene, interrupts, memory ---------------------------------------------------------


def test_onnxruntime_logs_do_not_precede_the_error_line(capfd, tmp_path):
    """Found by the fuzzer: a Gemm with a bad bias shape printed onnxruntime's coloured ERROR line."""
    proto = model_factory.tiny_cnn()
    bias = _init(proto, "fc.bias")
    bias.CopyFrom(numpy_helper.from_array(np.zeros((10, 1), np.float32), "fc.bias"))
    _refused(capfd, tmp_path, proto, "onnxruntime cannot run the input model")


def test_unused_initializer_prints_no_warning(capfd, tmp_path):
    proto = model_factory.tiny_cnn()
    proto.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "unused"))
    code, lines, _ = _optimize(capfd, tmp_path, proto)
    assert code == 0 and lines == []


def test_ctrl_c_while_building_the_parser_is_one_line(capfd, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    code, lines = _run(capfd, "optimize", "a", "b")
    assert code == 130 and lines == ["onnx-cp: interrupted"]


def test_memory_error_is_one_line(capfd, tmp_path, monkeypatch):
    from onnx_cp.runtime import model_io

    def exhausted(path):
        raise MemoryError("Unable to allocate 6.00 PiB")

    monkeypatch.setattr(model_io, "load_model", exhausted)
    code, lines, _ = _optimize(capfd, tmp_path, model_factory.tiny_cnn())
    assert code == 1
    assert lines == ["onnx-cp optimize: error: out of memory (Unable to allocate 6.00 PiB)"]


def test_names_that_are_not_utf8_are_refused(capfd, tmp_path):
    """Found by the fuzzer (corrupted bytes): protobuf returned a node name as bytes and onnx_ir
    failed to write the model again (SerdeError fallback)."""
    data = model_factory.conv_model(model_factory.low_rank_kernel(8, 4, 3, 3, 2)).SerializeToString()
    assert data.count(b"\x12\x04conv") >= 1
    data = data.replace(b"\x12\x04conv", b"\x12\x04con\xbf", 1)  # the graph's name field
    line = _refused(capfd, tmp_path, data, "is not UTF-8 text")
    assert "not a valid ONNX model" in line


def test_external_string_tensor_is_refused(capfd, tmp_path):
    """Found by the fuzzer: a STRING initializer stored as external data raised onnx_ir's TypeError."""
    data = _external(tmp_path, "location", "in.data")
    stored = onnx.ModelProto.FromString(data)
    _init(stored, "fc.bias").data_type = TensorProto.STRING
    _refused(capfd, tmp_path, stored.SerializeToString(), "type STRING cannot be stored as external data")


def test_graph_without_outputs_is_refused(capfd, tmp_path):
    """Found by the fuzzer: eval on it raised IndexError."""
    proto = model_factory.tiny_cnn()
    del proto.graph.output[:]
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 16, 16), np.float32), y=np.arange(4))
    code, lines = _run(capfd, "eval", path, "--data", tmp_path / "d.npz", "-q")
    assert code == 1 and lines == [f"onnx-cp eval: error: {path}: the graph has no outputs"]


def test_auto_pad_that_is_not_utf8_is_a_refusal_reason():
    """Found by the fuzzer (corrupted bytes): onnx_ir's as_string() raised TypeError in _inspect."""
    import onnx_ir as ir

    from onnx_cp.graph.sites import find_conv_sites

    proto = model_factory.conv_model(model_factory.low_rank_kernel(8, 4, 3, 3, 2), auto_pad="SAME_UPPER")
    attr = next(a for a in proto.graph.node[0].attribute if a.name == "auto_pad")
    attr.s = b"SAME_UP\x8eER"
    sites = find_conv_sites(ir.serde.deserialize_model(proto))
    assert "invalid auto_pad attribute" in sites[0].refusal
