"""The shipped models (models/*.onnx): they load in onnxruntime, have the documented interface and
structure, and reach their documented accuracy on a small fixed sample of the test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnx_cp.data.chars import generate_chars

MODELS = Path(__file__).resolve().parent.parent / "models"
# top-1 on the full test split as written in models/README.md (10000 images, seed 0)
DOCUMENTED_ACCURACY = {"charnet": 0.9641, "charresnet": 0.9763}
SAMPLE = 500
SLACK = 0.05  # a 500-image sample has a standard error of ~1.3 points at 90%


def _path(name: str) -> Path:
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.fail(f"shipped model missing: {path}")
    return path


def _session(name: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(_path(name)), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def test_sample() -> tuple[np.ndarray, np.ndarray]:
    return generate_chars(SAMPLE, seed=20150101, split="test", workers=1)


def _kernels(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], dict]]:
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            out[node.name] = (tuple(inits[node.input[1]].dims), attrs)
    return out


@pytest.mark.parametrize("name", sorted(DOCUMENTED_ACCURACY))
def test_interface(name):
    model = onnx.load(str(_path(name)))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 10
    assert {o.domain: o.version for o in model.opset_import}.get("", None) == 18
    assert all(not numpy_helper.to_array(i).size == 0 for i in model.graph.initializer)
    assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
    session = _session(name)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "x" and inp.shape == ["batch", 1, 24, 24] and inp.type == "tensor(float)"
    assert out.name == "logits" and out.shape == ["batch", 36]


@pytest.mark.parametrize("name", sorted(DOCUMENTED_ACCURACY))
def test_symbolic_batch_gives_the_same_answers(name, test_sample):
    session = _session(name)
    x = test_sample[0][:5]
    (all_five,) = session.run(["logits"], {"x": x})
    (first,) = session.run(["logits"], {"x": x[:1]})
    assert all_five.shape == (5, 36)
    np.testing.assert_allclose(first[0], all_five[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(DOCUMENTED_ACCURACY))
def test_accuracy_on_a_fixed_test_sample(name, test_sample):
    x, y = test_sample
    (logits,) = _session(name).run(["logits"], {"x": x})
    accuracy = float((logits.argmax(1) == y).mean())
    assert accuracy >= DOCUMENTED_ACCURACY[name] - SLACK, accuracy


def test_charnet_is_the_papers_architecture():
    model = onnx.load(str(_path("charnet")))
    kernels = {k: v[0] for k, v in _kernels(model).items()}
    assert kernels == {"conv1": (96, 1, 9, 9), "conv2": (128, 48, 9, 9),
                       "conv3": (512, 64, 8, 8), "conv4": (144, 128, 1, 1)}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("ReduceMax") == 4  # the four maxout units
    assert "MaxPool" not in ops and "AveragePool" not in ops


def test_charresnet_has_the_modern_structure():
    model = onnx.load(str(_path("charresnet")))
    ops = [n.op_type for n in model.graph.node]
    kernels = _kernels(model)
    assert ops.count("BatchNormalization") == ops.count("Conv")  # BN kept unfused
    assert ops.count("Add") == 3 and "GlobalAveragePool" in ops and ops[-1] == "Gemm"
    shapes = [shape for shape, _ in kernels.values()]
    assert (128, 128, 3, 3) in shapes  # the solver benchmark's shapes
    strided = [shape for shape, attrs in kernels.values() if attrs.get("strides") == [2, 2]]
    assert (256, 128, 3, 3) in strided
    size = _path("charresnet").stat().st_size
    assert size < 8_000_000
