"""Peer test suites shipped with the onnx package, through `optimize`:
- the Conv node cases of the ONNX backend tests, checked against their reference outputs;
- the backend's "light" real architectures (AlexNet with grouped convs, SqueezeNet, ShuffleNet,
  ...), IR version 3 / opset 9, whose weights are ConstantOfShape nodes (so every kernel is
  constant, hence exactly rank 1), checked against their reference outputs."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import model_factory
from onnx_cp import optimize
from onnx_cp.cp import decompose
from onnx_cp.graph import CPConvPass, find_conv_sites, plan_with
from onnx_cp.settings import SolverSettings

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def conv_node_cases() -> dict[str, tuple]:
    """The Conv cases of onnx.backend.test.case.node.conv, generated in memory."""
    import onnx.backend.test.case.node as node_cases
    from onnx.backend.test.case.node.conv import Conv

    node_cases._NodeTestCases.clear()
    node_cases._existing_names.clear()
    for name, method in inspect.getmembers(Conv, inspect.isfunction):
        if name.startswith("export"):
            try:
                method()
            except ValueError:  # a case already exported by another method
                pass
    cases = {c.name: (c.model, c.data_sets[0]) for c in node_cases._NodeTestCases}
    node_cases._NodeTestCases.clear()
    node_cases._existing_names.clear()
    return cases


CONV_CASES = conv_node_cases()


def full_rank(kernel_shape) -> int:
    _, s, kh, kw = kernel_shape
    return s * kh * kw


def backend_model(name):
    """An ONNX backend Conv case with W made a weight (the backend feeds it as an input), as in a
    trained model: (model, inputs, outputs)."""
    model, (inputs, outputs) = CONV_CASES[name]
    model = onnx.ModelProto.FromString(model.SerializeToString())
    weight_name = model.graph.input[1].name
    model.graph.initializer.append(numpy_helper.from_array(inputs[1], weight_name))
    del model.graph.input[1]
    model.ir_version = 10
    return model, inputs, outputs


@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_backend_conv_case(name):
    model, inputs, outputs = backend_model(name)
    # These 1-channel 3x3 convs gain nothing from CP (optimize would leave them alone), so the
    # pass is run directly, with the solver, at a rank where the CP solution can be exact.
    ir_model = ir.from_proto(model)
    plan = plan_with(find_conv_sites(ir_model), lambda site: full_rank(site.kernel.shape),
                     lambda kernel, rank: decompose(kernel, rank, seed=0))
    result = CPConvPass(plan)(ir_model)
    assert result.modified
    layer, = result.outcomes
    assert layer.rel_error < 1e-5, layer
    rewritten = ir.to_proto(ir_model)
    # one input channel: the 1x1 input stage is folded into the vertical one
    stages = [n.name.rpartition("/cp/")[2] for n in rewritten.graph.node if n.op_type == "Conv"]
    assert stages == ["vertical", "horizontal", "out"]
    session = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    actual, = session.run(None, {model.graph.input[0].name: inputs[0]})
    np.testing.assert_allclose(actual, outputs[0], rtol=1e-3, atol=1e-3 * np.abs(outputs[0]).max())


@pytest.mark.parametrize("name", ["bvlc_alexnet", "squeezenet", "shufflenet", "zfnet512"])
def test_light_real_architecture(name):
    path = LIGHT / f"light_{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not shipped by this onnx version")
    result = optimize(path, 1)
    report = result.report
    assert report["totals"]["decomposed"] >= 1
    assert report["verification"]["checker"] == "passed"
    expected = numpy_helper.to_array(onnx.load_tensor(str(LIGHT / f"light_{name}_output_0.pb")))
    session = ort.InferenceSession(ir.to_proto(result.model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: np.ones(session.get_inputs()[0].shape, np.float32)}
    # The shipped reference outputs are for an all-ones input... check shape and finiteness,
    # and agreement with the original model on the same feed.
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual, = session.run(None, feeds)
    reference, = original.run(None, feeds)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, reference, rtol=1e-3, atol=1e-5)
    grouped = [r for r in report["layers"] if r["group"] > 1 and r["status"] == "decomposed"]
    if name == "bvlc_alexnet":
        assert grouped, "AlexNet's grouped convs must be decomposed per group"



LIGHT_MODELS = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


@pytest.mark.parametrize("name", ["light_inception_v1", "light_inception_v2"])
def test_onnx_light_inception_models_optimize_with_defaults(name):
    """ConstantOfShape weights: kernels of different shapes hold the same bytes (192x64x3x3 and
    128x96x3x3), which once crossed their factors."""
    result = optimize(LIGHT_MODELS / f"{name}.onnx", solver=SolverSettings(workers=1))
    assert result.report["totals"]["decomposed"] >= 20
    assert result.report["verification"]["max_rel_error"] < 1e-4


def test_equal_byte_kernels_of_different_shapes_keep_their_own_factors():
    rng = np.random.default_rng(0)
    values = rng.standard_normal(8 * 4 * 3 * 3).astype(np.float32)
    first = numpy_helper.from_array(values.reshape(8, 4, 3, 3), "W1")
    second = numpy_helper.from_array(values.reshape(4, 8, 3, 3), "W2")  # the same bytes
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="first", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "W2"], ["y"], name="second", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "equal_bytes", [helper.make_tensor_value_info("x", 1, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", 1, [None] * 4)], [first, second])
    model = model_factory.make_model(graph)
    rows = optimize(model, 4, solver=SolverSettings(workers=1)).report["layers"]
    assert [(row["status"], row["kernel_shape"]) for row in rows] == [("decomposed", [8, 4, 3, 3]),
                                                                     ("decomposed", [4, 8, 3, 3])]
    for row, kernel in zip(rows, (values.reshape(8, 4, 3, 3), values.reshape(4, 8, 3, 3))):
        own = decompose(kernel.astype(np.float64), 4, seed=0).rel_error
        assert row["rel_error"] == pytest.approx(own, rel=1e-4)
