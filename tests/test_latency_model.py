"""The isolated timing of a layer against its chains: what is taken off, and the models timed."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from onnx_cp.ranks.latency_model import LayerShape, _layer_ratio, pass_through_model, single_conv_model


def test_the_fixed_cost_of_a_one_layer_model_is_taken_off_both_times():
    # a 100 us conv and a 30 us chain, each run as a model that costs 5 us to call
    assert _layer_ratio(chain_ms=0.035, conv_ms=0.105, fixed_ms=0.005) == pytest.approx(0.3)
    assert _layer_ratio(0.035, 0.105, 0.0) == pytest.approx(0.035 / 0.105)  # nothing to take off


def test_a_chain_within_the_noise_of_the_fixed_cost_still_costs_something():
    assert 0 < _layer_ratio(chain_ms=0.004, conv_ms=0.105, fixed_ms=0.005) < 0.05


def test_a_conv_lost_in_the_noise_keeps_its_plain_ratio():
    assert _layer_ratio(chain_ms=0.006, conv_ms=0.004, fixed_ms=0.005) == pytest.approx(1.5)


@pytest.mark.parametrize("shape", [
    LayerShape((32, 8, 3, 3), 2, (12, 10), (2, 2), (1, 1), (1, 1, 1, 1), "NOTSET"),
    LayerShape((64, 48, 1, 1), 1, (20, 1), (1, 1), (1, 1), (0, 0, 0, 0), "NOTSET", op="Gemm"),
])
def test_the_pass_through_model_takes_the_layers_input(shape):
    """It must take exactly what the layer's own model takes, or its cost is not the layer's."""
    conv = ort.InferenceSession(single_conv_model(shape).SerializeToString(), providers=["CPUExecutionProvider"])
    passing = ort.InferenceSession(pass_through_model(shape).SerializeToString(), providers=["CPUExecutionProvider"])
    dims = conv.get_inputs()[0].shape
    assert passing.get_inputs()[0].shape == dims
    x = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
    np.testing.assert_array_equal(passing.run(None, {"x": x})[0], x)
    assert conv.run(None, {"x": x})[0].shape[0] == dims[0]


def test_an_lstm_is_timed_as_its_own_op_against_its_unrolled_low_rank_splice():
    """The isolated models of an LSTM site: the LSTM op of its shape, its unrolled chain at a rank,
    and the pass-through, all taking the site's (T, N, I) input."""
    import onnx_ir as ir
    from test_lstm import _sites, lstm_model

    from onnx_cp.ranks.latency_model import chain_model

    _, (site,) = _sites(lstm_model("bidirectional", steps=3, batch=1, inputs=5, hidden=8))
    shape = LayerShape.of(site)
    assert shape.op == "LSTM" and shape.recurrent == (2, 5, 3) and shape.input_hw == (3, 1)
    layer = single_conv_model(shape)
    chain = ir.to_proto(chain_model(layer, 4, form="svd"))
    assert "LSTM" not in {n.op_type for n in chain.graph.node}
    x = np.random.default_rng(0).standard_normal((3, 1, 5)).astype(np.float32)
    for model in (layer, chain, pass_through_model(shape)):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape == [3, 1, 5]
        session.run(None, {"x": x})
    y_layer = ort.InferenceSession(layer.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y_chain = ort.InferenceSession(chain.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert y_chain.shape == y_layer.shape == (3, 2, 1, 8)
