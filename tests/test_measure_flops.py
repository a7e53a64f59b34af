"""count_flops against hand counts."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_measure_profile import chain_cnn

import model_factory
from onnx_cp.measure import count_flops
from onnx_cp.measure import flops as flops_module


def test_tiny_cnn_hand_count():
    result = count_flops(model_factory.tiny_cnn())
    conv1 = 16 * 16 * 16 * (3 * 3 * 3)   # output elements x (C_in x kh x kw)
    conv2 = 32 * 16 * 16 * (16 * 5 * 5)
    fc = 32 * 10
    assert [(layer["name"], layer["macs"]) for layer in result["layers"]] == [
        ("conv1", conv1), ("conv2", conv2), ("fc", fc)]
    assert result["total_macs"] == conv1 + conv2 + fc
    params = (16 * 27 + 16) + (32 * 400 + 32) + (10 * 32 + 10)
    assert result["total_params"] == params == result["counted_params"]
    assert result["input_shapes"] == {"x": [1, 3, 16, 16]}


def test_symbolic_dims_filled_from_input_shapes():
    model = model_factory.conv_model(np.ones((8, 4, 3, 3), np.float32), input_shape=["N", 4, "H", "W"])
    result = count_flops(model, {"x": [2, 4, 10, 12]})
    assert result["layers"][0]["output_shape"] == [2, 8, 8, 10]
    assert result["layers"][0]["macs"] == 2 * 8 * 8 * 10 * (4 * 9)
    # without shapes: batch 1 and 32 for the other symbolic dims
    assert count_flops(model)["layers"][0]["macs"] == 8 * 30 * 30 * (4 * 9)


def test_cp_chain_hand_count_and_layer():
    r, c = 16, 16
    result = count_flops(chain_cnn(rank=r, c=c))
    hw = 16 * 16
    chain = hw * (r * c) + hw * r * 5 + hw * r * 5 + hw * (2 * c * r)
    assert sum(layer["macs"] for layer in result["layers"] if layer["layer"] == "conv2") == chain
    assert {layer["layer"] for layer in result["layers"]} == {"conv1", "conv2", "fc"}


def test_grouped_strided_conv_and_weights_as_constants():
    kernel = np.ones((8, 2, 3, 3), np.float32)  # group 2: 4 input channels, 2 per group
    model = model_factory.conv_model(kernel, np.zeros(8), input_shape=[1, 4, 12, 12], group=2,
                                     strides=[2, 2], pads=[1, 1, 1, 1], weight_as="constant")
    result = count_flops(model)
    assert result["layers"][0]["macs"] == 8 * 6 * 6 * (2 * 3 * 3)
    assert result["layers"][0]["params"] == 8 * 2 * 9 + 8
    assert result["total_params"] == 8 * 2 * 9 + 8


def _graph(nodes, inputs, output, initializers):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros(s, np.float32), n) for n, s in initializers])
    return model_factory.make_model(graph)


def test_gemm_transposes_matmul_broadcast_and_conv_transpose():
    model = _graph(
        [helper.make_node("Gemm", ["a", "B"], ["g"], name="gemm", transA=1, transB=1),
         helper.make_node("MatMul", ["m", "W"], ["mm"], name="matmul"),
         helper.make_node("ConvTranspose", ["t", "K"], ["ct"], name="deconv", strides=[2, 2])],
        [("a", [7, 5]), ("m", ["N", 3, 4, 6]), ("t", [1, 4, 5, 5])], "g",
        [("B", [9, 7]), ("W", [6, 2]), ("K", [4, 3, 3, 3])],
    )
    layers = {layer["name"]: layer for layer in count_flops(model, {"m": [2, 3, 4, 6]})["layers"]}
    assert layers["gemm"]["macs"] == 5 * 7 * 9       # A^T (5x7) @ B^T (7x9)
    assert layers["matmul"]["macs"] == 2 * 3 * 4 * 6 * 2
    assert layers["deconv"]["macs"] == 4 * 5 * 5 * 3 * 3 * 3
    assert layers["matmul"]["params"] == 12


def test_runtime_shapes_when_inference_cannot_tell(monkeypatch):
    expected = count_flops(model_factory.tiny_cnn())
    monkeypatch.setattr(flops_module, "_inferred_shapes", lambda proto: {})
    assert count_flops(model_factory.tiny_cnn()) == expected


def test_counting_leaves_the_model_alone():
    model = model_factory.tiny_cnn()
    before = model.SerializeToString()
    count_flops(model, {"x": [2, 3, 16, 16]})
    assert model.SerializeToString() == before


@pytest.mark.parametrize("batch", [1, 5])
def test_batch_scales_macs(batch):
    assert count_flops(model_factory.tiny_cnn(), batch=batch)["total_macs"] == batch * (
        count_flops(model_factory.tiny_cnn())["total_macs"])
