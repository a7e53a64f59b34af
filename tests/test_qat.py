"""Quantization-aware fine-tuning: the interpreter's QDQ operators against onnxruntime, the trainable
form and its way back, and QAT as the last stage of optimize."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import model_factory
from onnx_cp import optimize
from onnx_cp.finetune.interpreter import to_torch
from onnx_cp.quantize import quantize_for_timing, quantize_int8
from onnx_cp.quantize.qat import quantized, trainable
from onnx_cp.settings import FinetuneSettings, MeasureSettings, QuantizeSettings


def run_ort(model, x: np.ndarray) -> np.ndarray:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def int8_model():
    x = model_factory.smooth_inputs(32, seed=0)
    return quantize_int8(model_factory.tiny_cnn(), x), x


def initializers(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}


def test_the_interpreter_runs_a_qdq_model_as_onnxruntime_does(int8_model):
    model, x = int8_model
    with torch.no_grad():
        ours = to_torch(model).eval()(torch.from_numpy(x)).numpy()
    expected = run_ort(model, x)
    # onnxruntime fuses the QDQ pattern into integer kernels; the values agree to rounding
    assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max()


def test_the_trainable_form_computes_the_same_and_folds_back_exactly(int8_model):
    model, x = int8_model
    form, weights = trainable(model)
    assert len(weights) == 3  # conv1, conv2, fc: every int8 weight, not the int32 biases
    assert np.array_equal(run_ort(form, x), run_ort(model, x))
    module = to_torch(form)
    assert {name.split("/")[0] for name in module.onnx_parameters()} == {w.integer_name for w in weights}
    back = quantized(form, weights)
    expected, folded = initializers(model), initializers(back)
    assert set(folded) == set(expected) and all(np.array_equal(folded[k], expected[k]) for k in expected)
    assert [n.op_type for n in back.graph] == [n.op_type for n in model.graph]


def test_trained_weights_fold_to_their_rounded_integers_within_range(int8_model):
    model, _ = int8_model
    form, weights = trainable(model)
    weight = weights[0]
    fake = next(n for n in form.graph if n.name == weight.quantize_node)
    floats = fake.inputs[0].const_value.numpy()
    scale = fake.inputs[1].const_value.numpy().reshape(-1, *[1] * (floats.ndim - 1))
    moved = floats + scale * np.where(np.arange(floats.size).reshape(floats.shape) % 2, 0.6, -1e6)
    fake.inputs[0].const_value = ir.tensor(moved.astype(np.float32))
    folded = quantized(form, weights).graph.initializers[weight.integer_name].const_value.numpy()
    original = model.graph.initializers[weight.integer_name].const_value.numpy().astype(int)
    odd = np.arange(floats.size).reshape(floats.shape) % 2 == 1
    assert np.all(folded[~odd] == weight.low)  # pushed far below: clamped to the range
    up = odd & (original < weight.high)
    assert np.all(folded[up].astype(int) - original[up] == 1)  # +0.6 of a step rounds up by one
    assert np.all(folded[odd & ~up] == weight.high)


def test_timing_quantization_keeps_the_named_layers_and_their_chains_float():
    x = model_factory.smooth_inputs(16, seed=0)
    decomposed = optimize(model_factory.tiny_cnn(), 4, measure=MeasureSettings(verify=False)).model
    timed = quantize_for_timing(decomposed, x[:8], keep_float=frozenset({"conv1"}))
    dequantized = {n.outputs[0].name for n in timed.graph if n.op_type == "DequantizeLinear"}
    float_weights = {n.name for n in timed.graph if n.op_type == "Conv" and n.inputs[1].name not in dequantized}
    assert float_weights and all(name.startswith("conv1/") for name in float_weights)
    assert any(n.name.startswith("conv2/") for n in timed.graph if n.op_type == "Conv")  # the rest is INT8


def test_timing_quantization_reads_no_layer_into_an_empty_float_node_name():
    """An unnamed node kept float by a check names no layer: before, every node outside a chain
    matched it, and the CRNN's INT8 candidates were timed nearly all float (1-3% faster, where the
    written INT8 model measured 2.4x)."""
    x = model_factory.smooth_inputs(16, seed=0)
    timed = quantize_for_timing(model_factory.tiny_cnn(), x[:8], keep_float=frozenset({""}))
    dequantized = {n.outputs[0].name for n in timed.graph if n.op_type == "DequantizeLinear"}
    assert all(n.inputs[1].name in dequantized for n in timed.graph if n.op_type == "Conv")


def test_int8_preparation_names_the_nodes_an_opset_conversion_adds():
    from onnx import TensorProto, helper

    from onnx_cp.quantize.int8 import _prepared

    kernel = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    weight = onnx.numpy_helper.from_array(kernel, "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c"], ["m"], name="mean", axes=[2, 3], keepdims=0),
             helper.make_node("Unsqueeze", ["m"], ["u"], name="unsqueeze", axes=[2]),  # axes become inputs at 13
             helper.make_node("Squeeze", ["u"], ["y"], name="squeeze", axes=[2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    prepared = _prepared(ir.from_proto(model_factory.make_model(graph, opset=12)))
    names = [n.name for n in prepared.graph]
    assert prepared.opset_imports[""] >= 13 and len(names) > len(nodes)
    assert all(names) and len(set(names)) == len(names)


def test_optimize_ends_with_quantization_aware_fine_tuning_kept_only_when_better(tmp_path):
    proto = model_factory.tiny_cnn()
    x = model_factory.smooth_inputs(64, seed=1)
    np.savez(tmp_path / "val.npz", x=x, y=run_ort(proto, x).argmax(1))
    result = optimize(proto, 4, finetune=FinetuneSettings(x, teacher_from_input=True, epochs=1, lr=0.01,
                                                          reconstruct_steps=0),
                      quantize=QuantizeSettings(), measure=MeasureSettings(eval_data=str(tmp_path / "val.npz")))
    qat = result.report["qat"]
    assert qat["weights"] >= 3 and qat["kept"] in ("qat", "ptq") and qat["judged_by"].startswith("output fidelity")
    errors = qat["output_error"]
    assert (qat["kept"] == "qat") == (errors["qat"] < errors["ptq"])
    ops = {n.op_type for n in result.model.graph.node}
    assert "QuantizeLinear" in ops  # a valid QDQ model either way, weights as int8 initializers
    int8_weights = [t for t in result.model.graph.initializer if t.data_type == 3]
    assert len(int8_weights) >= 3
    stages = list(result.report["accuracy"])
    assert stages[:3] == ["original", "decomposed", "finetuned"] and "finetuned+int8" in stages


def test_a_failed_quantization_aware_run_leaves_the_calibrated_model(monkeypatch):
    import onnx_cp.finetune
    from onnx_cp.errors import OnnxCpError

    real = onnx_cp.finetune.finetune
    calls = []

    def failing_second(*args, **kwargs):  # the float fine-tuning runs, the QAT one fails
        calls.append(1)
        if len(calls) > 1:
            raise OnnxCpError("write-back check failed: for the test")
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_cp.finetune, "finetune", failing_second)
    x = model_factory.smooth_inputs(32, seed=1)
    result = optimize(model_factory.tiny_cnn(), 4,
                      finetune=FinetuneSettings(x, teacher_from_input=True, epochs=1, lr=0.01, reconstruct_steps=0),
                      quantize=QuantizeSettings())
    assert result.report["qat"]["kept"] == "ptq" and "for the test" in result.report["qat"]["failed"]
    assert any("quantization-aware fine-tuning failed" in w for w in result.report["warnings"])
    assert "QuantizeLinear" in {n.op_type for n in result.model.graph.node}


def test_seven_bit_weights_fold_back_to_the_full_span_of_reduce_range():
    """Portable (7-bit) weights span onnxruntime's reduce_range [-64, 64] on every CPU; folding them
    back must not clip the 64s (an AVX2 machine's native weights are 7-bit)."""
    x = model_factory.smooth_inputs(32, seed=0)
    model = quantize_int8(model_factory.tiny_cnn(), x, target="portable")
    expected = initializers(model)
    assert max(int(np.abs(q.astype(np.int16)).max()) for q in expected.values() if q.dtype == np.int8) == 64
    form, weights = trainable(model)
    folded = initializers(quantized(form, weights))
    assert all(np.array_equal(folded[k], expected[k]) for k in expected)


def test_int8_alone_is_trained_at_a_set_rate_without_a_probe():
    """Nothing fine-tuned in float, no rate given: QAT starts from the calibrated model at QAT_LR_ALONE
    (a probe tried five rates first, each a tenth of the run)."""
    from onnx_cp.api import QAT_LR_ALONE
    from onnx_cp.settings import LayerSelection

    x = model_factory.smooth_inputs(64, seed=1)
    result = optimize(model_factory.tiny_cnn(), 4, layers=LayerSelection(include="^$"),
                      finetune=FinetuneSettings(x, teacher_from_input=True, epochs=1), quantize=QuantizeSettings())
    assert result.report["totals"]["decomposed"] == 0 and "finetune" not in result.report
    assert result.report["qat"]["lr"] == pytest.approx(QAT_LR_ALONE)
