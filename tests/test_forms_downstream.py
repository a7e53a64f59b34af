"""What follows the splice, for chains of every form: layer-wise reconstruction and fine-tuning,
INT8 equalization, and the per-layer profile and FLOP mapping, each checked with onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import model_factory
import onnx_cp
from onnx_cp.errors import OnnxCpError
from onnx_cp.finetune.reconstruct import reconstruct_layers
from onnx_cp.graph import naming
from onnx_cp.lowrank import SPATIAL_SVD, SVD, TUCKER2
from onnx_cp.measure import count_flops, layer_profile
from onnx_cp.quantize import equalize_chains, quantize_int8
from onnx_cp.runtime import model_io
from onnx_cp.settings import FinetuneSettings, MeasureSettings, SolverSettings

torch.set_num_threads(1)
FORMS = [TUCKER2, SVD, SPATIAL_SVD]


def layer_output(model: onnx.ModelProto, name: str, x: np.ndarray) -> np.ndarray:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=name))
    return ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run([name], {"x": x})[0]


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def original():
    return model_factory.tiny_cnn(seed=3)


def rewrite(original, form: str, rank: int = 4) -> onnx.ModelProto:
    return onnx_cp.optimize(original, rank, solver=SolverSettings(workers=1, decomposition=form)).model


@pytest.mark.parametrize("form", [TUCKER2, SPATIAL_SVD])  # SVD's in -> out is Tucker-2's without a core
def test_reconstruction_fits_chains_of_every_form(original, form):
    rewritten = rewrite(original, form)
    assert set(naming.chain_forms(rewritten.graph.node).values()) == {form}
    model, fits = reconstruct_layers(rewritten, original, model_factory.smooth_inputs(128, seed=0), steps=40, seed=0)
    assert [f.layer for f in fits] == ["conv1", "conv2"] and all(f.status == "fitted" for f in fits)
    held_out = model_factory.smooth_inputs(128, seed=1)
    for output in ("c1", "c2"):
        target = layer_output(original, output, held_out)
        before = relative_error(layer_output(rewritten, output, held_out), target)
        after = relative_error(layer_output(model, output, held_out), target)
        assert after < 0.9 * before, (form, output, before, after)
    changed = {t.name for t, u in zip(model.graph.initializer, rewritten.graph.initializer)
               if not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(u))}
    chain_inputs = {name for n in model.graph.node if f"/{form}/" in n.name for name in n.input[1:]}
    assert changed and changed <= chain_inputs  # only chain weights (and the bias they carry) move


def test_optimize_reconstructs_and_finetunes_an_svd_model(original):
    x = model_factory.smooth_inputs(128, seed=0)
    result = onnx_cp.optimize(original, 4, solver=SolverSettings(workers=1, decomposition=SVD),
                              finetune=FinetuneSettings(x, teacher_from_input=True, epochs=1, lr=0.01,
                                                        reconstruct_steps=40),
                              measure=MeasureSettings(verify=False))
    fits = result.report["reconstruction"]["layers"]
    assert [f["layer"] for f in fits] == ["conv1", "conv2", "fc"]  # fc: its Gemm as two MatMuls
    assert [f["status"] for f in fits] == ["fitted", "fitted", "fitted"]
    assert all(f["error_after"] < f["error_before"] for f in fits)
    assert "finetune" in result.report
    assert set(naming.chain_forms(result.model.graph.node).values()) == {SVD}


def loud_quiet_model(form: str) -> onnx.ModelProto:
    """One chain of `form` whose intermediate channels span 10^3 in range, compensated afterwards."""
    rng = np.random.default_rng(0)
    r, c, t = 8, 4, 6
    gain = (10.0 ** np.linspace(-1.5, 1.5, r)).astype(np.float32)
    if form == TUCKER2:
        shapes = {"in": (r, c, 1, 1), "core": (r, r, 3, 3), "out": (t, r, 1, 1)}
        pads = {"core": [1, 1, 1, 1]}
    elif form == SVD:
        shapes = {"in": (r, c, 3, 3), "out": (t, r, 1, 1)}
        pads = {"in": [1, 1, 1, 1]}
    else:
        shapes = {"vertical": (r, c, 3, 1), "horizontal": (t, r, 1, 3)}
        pads = {"vertical": [1, 0, 1, 0], "horizontal": [0, 1, 0, 1]}
    stages = list(shapes)
    weights = {s: rng.standard_normal(shape) for s, shape in shapes.items()}
    weights[stages[0]] *= gain[:, None, None, None]
    weights[stages[1]] /= gain[None, :, None, None]  # the quiet channels matter as much downstream
    nodes, inits, previous = [], [], "x"
    for stage in stages:
        name, weight = naming.node_name("conv", stage, form), naming.weight_name("conv", stage, form)
        inits.append(numpy_helper.from_array(weights[stage].astype(np.float32), weight))
        inputs = [previous, weight] + (["b"] if stage == stages[-1] else [])
        output = "y" if stage == stages[-1] else f"{name}.output"
        extra = {"pads": pads[stage]} if stage in pads else {}
        nodes.append(helper.make_node("Conv", inputs, [output], name=name, kernel_shape=list(shapes[stage][2:]),
                                      **extra))
        previous = output
    inits.append(numpy_helper.from_array(rng.standard_normal(t).astype(np.float32), "b"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return model_factory.make_model(graph)


def run(model, x):
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("form", FORMS)
def test_equalization_of_every_form_keeps_the_function_and_helps_int8(form):
    chain = loud_quiet_model(form)
    rng = np.random.default_rng(1)
    calibration, x = (rng.standard_normal((n, 4, 10, 10)).astype(np.float32) for n in (64, 16))
    model = model_io.to_ir(chain)
    assert equalize_chains(model, iter([calibration])) == ["conv"]
    assert relative_error(run(model, x), run(chain, x)) < 1e-5
    first = naming.node_name("conv", naming.FORM_STAGES[form][0], form) + ".output"
    inner = layer_output(ir.to_proto(model), first, x)
    rms = np.sqrt(np.square(inner).mean(axis=(0, 2, 3)))
    assert rms.max() / rms.min() < 1.5  # was 10^3
    expected = run(chain, x)
    # every stage quantized, on any CPU: what equalization is for (a float tail or float islands
    # would hide the quiet channels)
    plain = {"target": "portable", "keep_float_tail": False, "max_output_error": 10.0}
    try:
        naive = relative_error(run(quantize_int8(chain, calibration, equalize=False, **plain), x), expected)
    except OnnxCpError as error:  # the INT8 check refuses the unequalized chain: broken, as expected
        assert "INT8 broke the model" in str(error)
        naive = float("inf")
    equalized = relative_error(run(quantize_int8(chain, calibration, **plain), x), expected)
    assert equalized < naive / 3, (naive, equalized)


@pytest.mark.parametrize("form", FORMS)
def test_profile_and_flops_count_every_form_under_the_layer_it_replaced(original, form):
    rewritten = rewrite(original, form)
    assert any(f"/{form}/" in n.name for n in rewritten.graph.node)
    names = [layer.name for layer in layer_profile(rewritten, runs=2, warmup=1).layers]
    assert names[:2] == ["conv1", "conv2"] and not any(f"/{form}/" in name for name in names)
    flops = count_flops(rewritten, {"x": [1, 3, 16, 16]})
    convs = [row for row in flops["layers"] if row["op"] == "Conv"]
    assert {row["layer"] for row in convs} == {"conv1", "conv2"}
    assert all(f"/{form}/" in row["name"] for row in convs)
