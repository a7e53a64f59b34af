"""evaluate: accuracy equals a direct onnxruntime computation; agreement with itself is 100%."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from test_measure_profile import chain_cnn

import model_factory
from onnx_cp.data import open_dataset
from onnx_cp.errors import OnnxCpError
from onnx_cp.measure import evaluate

N = 37


def _logits(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, 3, 16, 16)).astype(np.float32)
    predicted = _logits(model_factory.tiny_cnn(), x).argmax(1)
    # half the labels agree with the model, the rest are random: accuracy well inside (0, 1)
    y = np.where(np.arange(N) % 2 == 0, predicted, rng.integers(0, 10, N))
    path = tmp_path_factory.mktemp("acc") / "data.npz"
    np.savez(path, x=x, y=y)
    return path, x, y


@pytest.mark.parametrize("batch_size", [1, 8, 64])
def test_accuracy_equals_direct_onnxruntime(data, batch_size):
    path, x, y = data
    model = model_factory.tiny_cnn()
    logits = _logits(model, x)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    result = evaluate(model, str(path), batch_size=batch_size)
    assert result.n == N and result.num_classes == 10 and result.top_k == 5
    assert result.top1 == pytest.approx(np.mean(logits.argmax(1) == y))
    assert result.top5 == pytest.approx(np.mean([y[i] in top5[i] for i in range(N)]))
    assert 0 < result.top1 < 1 and result.top1 <= result.top5 <= 1
    assert result.reference is None and "agreement_top1" not in result.to_json()


def test_agreement_with_itself_is_complete(data):
    path = data[0]
    model = model_factory.tiny_cnn()
    result = evaluate(model, open_dataset(path), reference=model_factory.tiny_cnn())
    assert result.agreement_top1 == 1.0
    assert result.max_abs_error == 0.0 and result.mean_abs_error == 0.0
    assert result.reference_top1 == result.top1


def test_agreement_against_another_model_and_without_labels(data, tmp_path):
    _, x, _ = data
    unlabelled = tmp_path / "x.npz"
    np.savez(unlabelled, x=x)
    other = chain_cnn()
    result = evaluate(other, str(unlabelled), reference=model_factory.tiny_cnn(), batch_size=10)
    a, b = _logits(other, x), _logits(model_factory.tiny_cnn(), x)
    assert result.top1 is None and result.top5 is None
    assert result.agreement_top1 == pytest.approx(np.mean(a.argmax(1) == b.argmax(1)))
    assert result.max_abs_error == pytest.approx(np.abs(a - b).max(), rel=1e-5)


def test_fixed_batch_model_pads_the_last_batch(data):
    path, x, y = data
    model = chain_cnn(batch=4)
    expected = np.concatenate([
        _logits(model, np.concatenate([x[i:i + 4], np.repeat(x[-1:], 4 - len(x[i:i + 4]), 0)]))
        [: len(x[i:i + 4])] for i in range(0, N, 4)
    ])
    result = evaluate(model, str(path), batch_size=64)
    assert result.n == N
    assert result.top1 == pytest.approx(np.mean(expected.argmax(1) == y))


def test_labels_out_of_range(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 3, 16, 16), np.float32), y=np.array([0, 10, 2]))
    with pytest.raises(OnnxCpError, match="label 10 is out of range.*10 classes"):
        evaluate(model_factory.tiny_cnn(), str(path))


def test_data_that_does_not_fit_the_model(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 1, 24, 24), np.float32))
    with pytest.raises(OnnxCpError, match=r"expects N x 3x16x16, but the data's samples are 1x24x24"):
        evaluate(model_factory.tiny_cnn(), str(path))
