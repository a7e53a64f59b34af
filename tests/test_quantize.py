"""INT8 quantization: 7-bit portable weights, CP chain equalization, the recorded scheme and check."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import model_factory
from onnx_cp.errors import OnnxCpError
from onnx_cp.graph import naming as chain_names
from onnx_cp.quantize import equalize_chains, int8_scheme, quantize_int8
from onnx_cp.runtime import model_io

RANK, CHANNELS, KERNEL = 8, 4, 3
# Channel r of the chain is 10^(3r/7 - 1.5) times louder inside the chain and as much quieter in the
# out stage: the output mixes all channels equally, but one per-tensor scale cannot serve them all.
CHANNEL_GAIN = 10.0 ** np.linspace(-1.5, 1.5, RANK)


def cp_chain_model(seed: int = 0) -> onnx.ModelProto:
    """x (N, 4, 10, 10) -> one CP chain (rank 8, 3x3) named like onnx-cp's -> y (N, 6, 10, 10)."""
    rng = np.random.default_rng(seed)
    gain = CHANNEL_GAIN.astype(np.float32)
    weights = {
        "in": rng.standard_normal((RANK, CHANNELS, 1, 1)) * gain[:, None, None, None],
        "vertical": rng.standard_normal((RANK, 1, KERNEL, 1)),
        "horizontal": rng.standard_normal((RANK, 1, 1, KERNEL)),
        "out": rng.standard_normal((6, RANK, 1, 1)) / gain[None, :, None, None],
    }
    attrs = {"in": {}, "vertical": {"group": RANK, "pads": [1, 0, 1, 0]},
             "horizontal": {"group": RANK, "pads": [0, 1, 0, 1]}, "out": {}}
    nodes, initializers, previous = [], [], "x"
    for stage in chain_names.STAGES:
        name, weight = chain_names.node_name("conv", stage), chain_names.weight_name("conv", stage)
        initializers.append(numpy_helper.from_array(weights[stage].astype(np.float32), weight))
        inputs = [previous, weight] + (["conv.bias"] if stage == "out" else [])
        output = "y" if stage == "out" else f"{name}.output"
        kernel = list(weights[stage].shape[2:])
        nodes.append(helper.make_node("Conv", inputs, [output], name=name, kernel_shape=kernel, **attrs[stage]))
        previous = output
    initializers.append(numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "conv.bias"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    return model_factory.make_model(graph)


def inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, CHANNELS, 10, 10)).astype(np.float32)


def run(model: ir.Model | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.fixture(scope="module")
def chain() -> onnx.ModelProto:
    return cp_chain_model()


def test_equalization_keeps_the_float_function(chain):
    model = model_io.to_ir(chain)
    assert equalize_chains(model, iter([inputs(32, seed=1)])) == ["conv"]
    x = inputs(16, seed=2)
    assert relative_error(run(model, x), run(chain, x)) < 1e-5
    # ...and really moved the weights: the channels of the in stage's output now have equal RMS.
    assert not np.allclose(model.graph.initializers["conv/cp/in.weight"].const_value.numpy(),
                           numpy_helper.to_array(chain.graph.initializer[0]))
    probe = onnx.ModelProto()
    probe.CopyFrom(ir.to_proto(model))
    probe.graph.output.append(helper.make_tensor_value_info("conv/cp/in.output", TensorProto.FLOAT, None))
    inner = ort.InferenceSession(probe.SerializeToString()).run(["conv/cp/in.output"], {"x": x})[0]
    rms = np.sqrt(np.square(inner).mean(axis=(0, 2, 3)))
    assert rms.max() / rms.min() < 1.5  # was 10^3 before


def test_equalization_leaves_the_callers_model_alone(chain):
    original = model_io.to_ir(chain)
    before = original.graph.initializers["conv/cp/in.weight"].const_value.numpy().copy()
    quantize_int8(original, inputs(32, seed=1), samples=32)
    assert np.array_equal(original.graph.initializers["conv/cp/in.weight"].const_value.numpy(), before)


def test_equalized_int8_chain_stays_close_where_naive_int8_is_far_off(chain, monkeypatch):
    calibration, x = inputs(64, seed=1), inputs(16, seed=2)
    expected = run(chain, x)
    monkeypatch.setattr("onnx_cp.quantize.check.MIN_AGREEMENT", 0.0)  # let the naive model through the check
    naive = relative_error(run(quantize_int8(chain, calibration, equalize=False, keep_float_tail=False,
                                             max_output_error=100.0), x), expected)
    equalized = relative_error(run(quantize_int8(chain, calibration), x), expected)
    assert naive > 0.2  # the quiet channels are rounded away
    assert equalized < 0.05
    assert equalized < naive / 5


def test_scheme_is_recorded_and_survives_saving(chain, tmp_path):
    quantized = quantize_int8(chain, inputs(32, seed=1), samples=32, target="portable")
    scheme = int8_scheme(quantized)
    assert scheme is not None
    assert (scheme.weights, scheme.weight_bits, scheme.samples, scheme.target) == ("int8", 7, 32, "portable")
    assert scheme.equalized_layers == ("conv",)
    assert "7-bit" in scheme.describe() and "1 CP chain(s) equalized" in scheme.describe()
    assert "target portable" in scheme.describe()
    assert scheme.check["samples"] == 32 and 0 < scheme.check["worst_group_error"] < 0.05
    model_io.save_model(quantized, tmp_path / "q.onnx")
    assert int8_scheme(tmp_path / "q.onnx") == scheme
    assert int8_scheme(chain) is None


def int8_weights(model: ir.Model) -> list[np.ndarray]:
    return [v.const_value.numpy() for v in model.graph.initializers.values()
            if v.const_value is not None and v.const_value.dtype == ir.DataType.INT8]


def test_portable_weights_use_seven_bits():
    """8-bit weights saturate onnxruntime's int16 accumulation on AVX2 CPUs without VNNI."""
    model = model_factory.tiny_cnn()
    x = np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32)
    seven = int8_weights(quantize_int8(model, x, target="portable"))
    assert seven and max(int(np.abs(w.astype(np.int32)).max()) for w in seven) <= 64
    eight = quantize_int8(model, x, reduce_range=False)
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in int8_weights(eight)) > 64
    assert int8_scheme(eight).weight_bits == 8


def test_plain_cnn_is_not_equalized_and_stays_close():
    model = model_factory.tiny_cnn()
    rng = np.random.default_rng(0)
    calibration, x = (rng.standard_normal((n, 3, 16, 16)).astype(np.float32) for n in (64, 16))
    quantized = quantize_int8(model, calibration)
    assert int8_scheme(quantized).equalized_layers == ()
    assert relative_error(run(quantized, x), run(model, x)) < 0.05


def test_unknown_options_are_refused(chain):
    with pytest.raises(OnnxCpError, match="weights"):
        quantize_int8(chain, inputs(8, seed=1), weights="int4")
    with pytest.raises(OnnxCpError, match="calibration_method"):
        quantize_int8(chain, inputs(8, seed=1), calibration_method="mse")
    with pytest.raises(OnnxCpError, match="int8_target"):
        quantize_int8(chain, inputs(8, seed=1), target="avx2")
    with pytest.raises(OnnxCpError, match="int8_max_error"):
        quantize_int8(chain, inputs(8, seed=1), max_output_error=0)


def test_a_model_with_a_fixed_batch_of_one_from_an_old_opset_is_quantized():
    """An exported CRNN takes exactly one sample and is opset 12: calibration feeds it one sample at
    a time, and the model is converted to opset 13, where per-channel DequantizeLinear exists."""
    model = model_factory.tiny_cnn()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 12))
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((20, 3, 16, 16)).astype(np.float32)
    quantized = quantize_int8(model, calibration)
    assert ir.to_proto(quantized).opset_import[0].version >= 13
    assert any(n.op_type == "DequantizeLinear" for n in quantized.graph)
    x = calibration[:1]
    assert relative_error(run(quantized, x), run(model, x)) < 0.05
