"""Tiny deterministic ONNX models for tests (generated, never committed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # onnx.helper stamps a newer one that onnxruntime may refuse
OPSET = 18


def make_model(graph: onnx.GraphProto, opset: int = OPSET) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_VERSION
    return model


def low_rank_kernel(t: int, s: int, kh: int, kw: int, rank: int, seed: int = 0) -> np.ndarray:
    """A (t, s, kh, kw) kernel that is exactly a sum of `rank` rank-one terms."""
    rng = np.random.default_rng(seed)
    a, b, c, d = (rng.standard_normal((n, rank)) for n in (t, s, kh, kw))
    return (np.einsum("tr,sr,yr,xr->tsyx", a, b, c, d) / np.sqrt(rank)).astype(np.float32)


def conv_model(
    kernel: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    input_shape: Sequence[int | str] = ("N", 4, 12, 12),
    group: int = 1,
    strides: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    auto_pad: str | None = None,
    weight_as: str = "initializer",
    opset: int = OPSET,
) -> onnx.ModelProto:
    """One Conv, input `x`, output `y`; the weight as an initializer or a Constant node."""
    dtype = helper.np_dtype_to_tensor_dtype(kernel.dtype)
    attrs = {"kernel_shape": list(kernel.shape[2:])}
    if group != 1:
        attrs["group"] = group
    for name, value in (("strides", strides), ("pads", pads), ("dilations", dilations)):
        if value is not None:
            attrs[name] = list(value)
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    inputs = ["x", "W"] + (["B"] if bias is not None else [])
    nodes, initializers = [], []
    tensors = [numpy_helper.from_array(kernel, "W")]
    if bias is not None:
        tensors.append(numpy_helper.from_array(bias.astype(kernel.dtype), "B"))
    if weight_as == "constant":
        nodes += [helper.make_node("Constant", [], [t.name], value=t) for t in tensors]
    else:
        initializers = tensors
    nodes.append(helper.make_node("Conv", inputs, ["y"], name="conv", **attrs))
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", dtype, list(input_shape))],
        [helper.make_tensor_value_info("y", dtype, [None] * kernel.ndim)],
        initializers,
    )
    return make_model(graph, opset)


def tiny_cnn(seed: int = 0, num_classes: int = 10, channels: int = 16) -> onnx.ModelProto:
    """Conv3x3 -> Relu -> Conv5x5 -> Relu -> GlobalAveragePool -> Flatten -> Gemm, input N x 3 x 16 x 16."""
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int, scale: float = 0.2) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    c = channels
    initializers = [
        init("conv1.weight", c, 3, 3, 3),
        init("conv1.bias", c),
        init("conv2.weight", 2 * c, c, 5, 5, scale=0.05),
        init("conv2.bias", 2 * c),
        init("fc.weight", num_classes, 2 * c),
        init("fc.bias", num_classes),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", pads=[2, 2, 2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])],
        initializers,
    )
    return make_model(graph)


def smooth_inputs(n: int, seed: int, channels: int = 3, size: int = 16) -> np.ndarray:
    """N x C x size x size smooth images (random mixtures of the 9 lowest cosine modes per channel):
    inputs whose patches span few directions, as real activations do, so that a low-rank chain can
    fit a layer on them far better than it fits the kernel."""
    u = np.cos(np.pi * np.arange(3)[:, None] * (np.arange(size) + 0.5) / size)  # 3 modes x pixels
    modes = np.einsum("ay,bx->abyx", u, u).reshape(9, size, size)
    weights = np.random.default_rng(seed).standard_normal((n, channels, 9))
    return np.einsum("ncm,myx->ncyx", weights, modes).astype(np.float32)
