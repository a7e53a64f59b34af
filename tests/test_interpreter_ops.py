"""Parity of the ONNX -> torch interpreter with onnxruntime, one small graph per operator variant,
at two batch sizes (the batch is symbolic in every graph)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import model_factory
from onnx_cp.errors import OnnxCpError
from onnx_cp.finetune import to_torch, write_back

torch.set_num_threads(1)
BATCHES = (1, 3)
RTOL = 1e-4


def _i64(*values):
    return np.array(values, dtype=np.int64)


def _f32(*values):
    return np.array(values, dtype=np.float32)


def _rand(*shape, seed=1, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def single_op_model(
    op, attrs=None, x_shape=(4, 6, 6), consts=None, opset=18, n_outputs=1, const_as="initializer", extra_inputs=None
):
    """x [N, *x_shape] -> op(x, *consts) -> y0..; `consts` maps input names to arrays ('' = skip)."""
    consts = consts or {}
    inputs = ["x"] + list(consts)
    outputs = [f"y{i}" for i in range(n_outputs)]
    node = helper.make_node(op, inputs, outputs, name=f"{op.lower()}_node", **(attrs or {}))
    tensors = [numpy_helper.from_array(v, k) for k, v in consts.items() if k]
    nodes, initializers = [], []
    if const_as == "constant":
        nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in tensors]
    else:
        initializers = tensors
    graph = helper.make_graph(
        nodes + [node],
        op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializers,
    )
    return model_factory.make_model(graph, opset)


def assert_parity(model: onnx.ModelProto, batches=BATCHES, make_x=None):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    module = to_torch(model).eval()
    x_info = model.graph.input[0].type.tensor_type.shape.dim
    for batch in batches:
        shape = [batch] + [d.dim_value for d in x_info[1:]]
        x = make_x(shape) if make_x else _rand(*shape, seed=batch)
        expected = session.run(None, {"x": x})
        with torch.no_grad():
            got = module(torch.from_numpy(x))
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            g = g.numpy()
            assert g.shape == e.shape, (g.shape, e.shape)
            scale = max(float(np.abs(e).max()), 1e-6) if e.size else 1.0
            err = float(np.abs(g.astype(np.float64) - e).max()) / scale if e.size else 0.0
            assert err <= RTOL, f"relative error {err:.2e} at batch {batch}"


W33 = _rand(5, 4, 3, 3, seed=2, scale=0.3)
B5 = _rand(5, seed=3)
CASES = {
    # convolution
    "conv_plain": ("Conv", {}, (4, 6, 6), {"W": W33}),
    "conv_bias_stride_pads": ("Conv", {"strides": [2, 2], "pads": [1, 1, 1, 1]}, (4, 7, 7), {"W": W33, "B": B5}),
    "conv_asym_pads": ("Conv", {"pads": [0, 1, 2, 0]}, (4, 6, 6), {"W": W33, "B": B5}),
    "conv_dilation": ("Conv", {"dilations": [2, 1], "pads": [2, 1, 2, 1]}, (4, 8, 8), {"W": W33}),
    "conv_same_upper": ("Conv", {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (4, 7, 6), {"W": W33}),
    "conv_same_lower": ("Conv", {"auto_pad": "SAME_LOWER", "strides": [2, 1]}, (4, 7, 6), {"W": _rand(5, 4, 2, 2)}),
    "conv_valid": ("Conv", {"auto_pad": "VALID"}, (4, 6, 6), {"W": W33}),
    "conv_group": ("Conv", {"group": 2, "pads": [1, 1, 1, 1]}, (4, 6, 6), {"W": _rand(6, 2, 3, 3)}),
    "conv_depthwise": ("Conv", {"group": 4, "pads": [0, 1, 0, 1]}, (4, 6, 6), {"W": _rand(4, 1, 1, 3)}),
    "conv_whole_input": ("Conv", {}, (4, 3, 3), {"W": W33, "B": B5}),
    "conv_whole_input_1x1": ("Conv", {}, (4, 1, 1), {"W": _rand(5, 4, 1, 1)}),
    "conv_one_channel": (
        "Conv",
        {"strides": [2, 1], "dilations": [1, 2], "pads": [1, 2, 1, 2]},
        (1, 9, 9),
        {"W": _rand(6, 1, 3, 3), "B": _rand(6)},
    ),
    "conv_one_channel_asym": ("Conv", {"pads": [0, 1, 2, 0]}, (1, 7, 7), {"W": _rand(6, 1, 3, 2)}),
    "conv_1d": ("Conv", {"pads": [1, 0]}, (4, 9), {"W": _rand(3, 4, 3)}),
    "conv_const_weight": ("Conv", {}, (4, 6, 6), {"W": W33, "B": B5}, 18, 1, "constant"),
    "convtranspose": ("ConvTranspose", {"strides": [2, 2]}, (4, 5, 5), {"W": _rand(4, 3, 3, 3), "B": _rand(3)}),
    "convtranspose_pads_outpad": (
        "ConvTranspose",
        {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 1]},
        (4, 5, 5),
        {"W": _rand(4, 3, 3, 3)},
    ),
    "convtranspose_group_dil": (
        "ConvTranspose",
        {"group": 2, "dilations": [2, 2]},
        (4, 5, 5),
        {"W": _rand(4, 2, 3, 3)},
    ),
    "convtranspose_output_shape": (
        "ConvTranspose",
        {"strides": [2, 2], "output_shape": [10, 11]},
        (4, 5, 5),
        {"W": _rand(4, 3, 3, 3)},
    ),
    "convtranspose_same_upper": (
        "ConvTranspose",
        {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
        (4, 5, 5),
        {"W": _rand(4, 3, 3, 3)},
    ),
    # pooling
    "maxpool": ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, (4, 6, 6), {}),
    "maxpool_pads_ceil": (
        "MaxPool",
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
        (4, 8, 8),
        {},
    ),
    "maxpool_ceil": ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, (4, 8, 8), {}),
    "maxpool_asym_dil": ("MaxPool", {"kernel_shape": [2, 3], "dilations": [2, 1], "pads": [0, 1, 1, 2]}, (4, 7, 7), {}),
    "maxpool_same": ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, (4, 7, 7), {}),
    "avgpool": ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, (4, 6, 6), {}),
    "avgpool_pads_exclude": ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, (4, 6, 6), {}),
    "avgpool_pads_include": (
        "AveragePool",
        {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1},
        (4, 6, 6),
        {},
    ),
    "avgpool_asym_ceil": (
        "AveragePool",
        {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 0, 1], "ceil_mode": 1},
        (4, 7, 7),
        {},
    ),
    "avgpool_ceil_nopad": ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, (4, 8, 8), {}),
    "globalavgpool": ("GlobalAveragePool", {}, (4, 5, 6), {}),
    "globalmaxpool": ("GlobalMaxPool", {}, (4, 5, 6), {}),
    # normalization
    "batchnorm": (
        "BatchNormalization",
        {"epsilon": 1e-3},
        (4, 5, 5),
        {"s": _rand(4), "b": _rand(4), "m": _rand(4), "v": np.abs(_rand(4)) + 0.5},
    ),
    "batchnorm_opset9": (
        "BatchNormalization",
        {},
        (4, 5, 5),
        {"s": _rand(4), "b": _rand(4), "m": _rand(4), "v": np.abs(_rand(4)) + 0.5},
        9,
    ),
    "instancenorm": ("InstanceNormalization", {}, (4, 5, 5), {"s": _rand(4), "b": _rand(4)}),
    "layernorm": ("LayerNormalization", {"axis": 1}, (4, 5, 5), {"s": _rand(4, 5, 5), "b": _rand(4, 5, 5)}),
    "lrn_odd": ("LRN", {"size": 3, "alpha": 0.01, "beta": 0.75, "bias": 2.0}, (6, 3, 3), {}),
    "lrn_size5": ("LRN", {"size": 5}, (6, 3, 3), {}),
    "dropout": ("Dropout", {}, (4, 5), {}),
    "dropout_opset11": ("Dropout", {"ratio": 0.3}, (4, 5), {}, 11),
    # activations
    "relu": ("Relu", {}, (4, 5), {}),
    "leakyrelu": ("LeakyRelu", {"alpha": 0.2}, (4, 5), {}),
    "prelu": ("PRelu", {}, (4, 3, 3), {"slope": _rand(4, 1, 1)}),
    "clip_inputs": ("Clip", {}, (4, 5), {"lo": _f32(-0.5)[0].reshape(()), "hi": np.array(0.7, np.float32)}),
    "clip_max_only": ("Clip", {}, (4, 5), {"": np.zeros(0, np.float32), "hi": np.array(0.7, np.float32)}),
    "clip_attrs_opset6": ("Clip", {"min": -0.3, "max": 0.2}, (4, 5), {}, 6),
    "sigmoid": ("Sigmoid", {}, (4, 5), {}),
    "hardsigmoid": ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, (4, 5), {}),
    "hardswish": ("HardSwish", {}, (4, 5), {}),
    "tanh": ("Tanh", {}, (4, 5), {}),
    "elu": ("Elu", {"alpha": 0.5}, (4, 5), {}),
    "selu": ("Selu", {}, (4, 5), {}),
    "softplus": ("Softplus", {}, (4, 5), {}),
    "gelu": ("Gelu", {}, (4, 5), {}, 20),
    "erf": ("Erf", {}, (4, 5), {}),
    "softmax": ("Softmax", {"axis": 1}, (4, 5), {}),
    "softmax_default_axis": ("Softmax", {}, (4, 5), {}),
    "softmax_opset11_coerce": ("Softmax", {"axis": 1}, (3, 4), {}, 11),
    "logsoftmax": ("LogSoftmax", {"axis": -1}, (4, 5), {}),
    # arithmetic
    "add": ("Add", {}, (4, 5), {"c": _rand(5)}),
    "sub": ("Sub", {}, (4, 5), {"c": _rand(4, 1)}),
    "mul": ("Mul", {}, (4, 5), {"c": _rand(1, 5)}),
    "div": ("Div", {}, (4, 5), {"c": np.abs(_rand(5)) + 0.5}),
    "pow": ("Pow", {}, (4, 5), {"c": np.array(2.0, np.float32)}),
    "max": ("Max", {}, (4, 5), {"c": _rand(5)}),
    "min": ("Min", {}, (4, 5), {"c": _rand(5)}),
    "sum": ("Sum", {}, (4, 5), {"c": _rand(5), "d": _rand(4, 1)}),
    "gemm": ("Gemm", {"transB": 1}, (4,), {"B": _rand(3, 4), "C": _rand(3)}),
    "gemm_alpha_beta": ("Gemm", {"alpha": 0.5, "beta": 2.0}, (4,), {"B": _rand(4, 3), "C": _rand(1, 3)}),
    "matmul": ("MatMul", {}, (4, 5), {"B": _rand(5, 2)}),
    # reductions
    "reducemean_opset13": ("ReduceMean", {"axes": [2, 3]}, (4, 5, 5), {}, 13),
    "reducemean_input": ("ReduceMean", {"keepdims": 0}, (4, 5, 5), {"axes": _i64(1, -1)}),
    "reducemax_opset13": ("ReduceMax", {"axes": [1], "keepdims": 0}, (4, 5), {}, 13),
    "reducemax_input": ("ReduceMax", {}, (4, 5), {"axes": _i64(1)}),
    "reducesum_input": ("ReduceSum", {}, (4, 5), {"axes": _i64(1)}),
    "reducemean_all": ("ReduceMean", {}, (4, 5), {}),
    # shapes
    "flatten": ("Flatten", {}, (4, 3, 2), {}),
    "flatten_axis2": ("Flatten", {"axis": 2}, (4, 3, 2), {}),
    "reshape": ("Reshape", {}, (4, 3, 2), {"shape": _i64(0, -1, 2)}),
    "reshape_allowzero": ("Reshape", {"allowzero": 1}, (4, 3, 2), {"shape": _i64(-1, 4, 6)}),
    "transpose": ("Transpose", {"perm": [0, 2, 3, 1]}, (4, 3, 2), {}),
    "squeeze_input": ("Squeeze", {}, (1, 3, 1), {"axes": _i64(1, -1)}),
    "squeeze_attr_opset11": ("Squeeze", {"axes": [1]}, (1, 3), {}, 11),
    "unsqueeze_input": ("Unsqueeze", {}, (3, 2), {"axes": _i64(0, -1)}),
    "unsqueeze_attr_opset11": ("Unsqueeze", {"axes": [1, 4]}, (3, 2), {}, 11),
    "split_input": ("Split", {"axis": 1}, (5, 2), {"split": _i64(2, 3)}, 18, 2),
    "split_attr_opset11": ("Split", {"axis": 1, "split": [1, 4]}, (5, 2), {}, 11, 2),
    "split_equal": ("Split", {"axis": 2}, (2, 6), {}, 13, 3),
    "split_num_outputs": ("Split", {"axis": 1, "num_outputs": 2}, (5, 2), {}, 18, 2),
    "slice": ("Slice", {}, (6, 6), {"st": _i64(1, 0), "en": _i64(5, -1), "ax": _i64(1, 2)}),
    "slice_steps": (
        "Slice",
        {},
        (6, 7),
        {"st": _i64(0, -1), "en": _i64(100, -100), "ax": _i64(1, 2), "sp": _i64(2, -2)},
    ),
    "slice_opset9": ("Slice", {"starts": [1], "ends": [4], "axes": [2]}, (6, 6), {}, 9),
    "gather": ("Gather", {"axis": 1}, (5, 3), {"idx": _i64(0, -1, 2)}),
    "gather_scalar": ("Gather", {"axis": 2}, (5, 3), {"idx": np.array(1, np.int64)}),
    "pad_constant": ("Pad", {}, (3, 4, 4), {"pads": _i64(0, 0, 1, 2, 0, 0, 2, 0), "v": np.array(0.5, np.float32)}),
    "pad_reflect": ("Pad", {"mode": "reflect"}, (3, 4, 4), {"pads": _i64(0, 0, 1, 2, 0, 0, 2, 1)}),
    "pad_edge": ("Pad", {"mode": "edge"}, (3, 4, 4), {"pads": _i64(0, 0, 1, 0, 0, 0, 0, 3)}),
    "pad_wrap": ("Pad", {"mode": "wrap"}, (3, 4, 4), {"pads": _i64(0, 0, 1, 2, 0, 0, 2, 1)}, 19),
    "pad_axes": ("Pad", {}, (3, 4, 4), {"pads": _i64(1, 2, 3, 0), "": np.zeros(0, np.float32), "axes": _i64(2, 3)}),
    "pad_negative": ("Pad", {}, (3, 4, 4), {"pads": _i64(0, 0, -1, 1, 0, 0, 1, -2)}),
    "pad_opset2": ("Pad", {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "value": 1.0}, (3, 4, 4), {}, 2),
    "cast_int_back": ("Cast", {"to": TensorProto.FLOAT}, (4,), {}),
    "identity": ("Identity", {}, (4,), {}),
    "expand": ("Expand", {}, (1, 3), {"shape": _i64(2, 1, 4, 3)}),
    "tile": ("Tile", {}, (2, 3), {"reps": _i64(1, 2, 1)}),
    "depthtospace": ("DepthToSpace", {"blocksize": 2}, (8, 3, 3), {}),
    "spacetodepth": ("SpaceToDepth", {"blocksize": 2}, (2, 4, 4), {}),
}

for _unary in ("Sin", "Cos", "Sign", "Round", "Softsign", "Floor", "Ceil", "Neg", "Abs"):
    CASES[_unary.lower()] = (_unary, {}, (4, 5), {})
CASES["mish"] = ("Mish", {}, (4, 5), {})
CASES["exp_log"] = ("Exp", {}, (4, 5), {})
for _reduce in ("ReduceL2", "ReduceProd", "ReduceSumSquare", "ReduceMin"):
    CASES[_reduce.lower()] = (_reduce, {"keepdims": 0}, (4, 5), {"axes": _i64(-1)})
CASES["einsum"] = ("Einsum", {"equation": "bij,jk->bik"}, (4, 5), {"k": _rand(5, 3)})
CASES["mod_fmod"] = ("Mod", {"fmod": 1}, (4, 5), {"d": _f32(0.7, 1.3, 0.9, 2.0, 0.5)})

RESIZE_MODES = ["asymmetric", "half_pixel", "align_corners", "pytorch_half_pixel", "half_pixel_symmetric"]
for _coord in RESIZE_MODES:
    for _mode in ("nearest", "linear"):
        CASES[f"resize_{_mode}_{_coord}_scales"] = (
            "Resize",
            {"mode": _mode, "coordinate_transformation_mode": _coord},
            (3, 4, 5),
            {"": np.zeros(0, np.float32), "scales": _f32(1, 1, 2, 1.5)},
        )
        CASES[f"resize_{_mode}_{_coord}_sizes_axes"] = (
            "Resize",
            {"mode": _mode, "coordinate_transformation_mode": _coord, "axes": [2, 3]},
            (3, 6, 5),
            {"": np.zeros(0, np.float32), " ": np.zeros(0, np.float32), "sizes": _i64(4, 9)},
        )
for _nearest in ("round_prefer_ceil", "floor", "ceil"):
    CASES[f"resize_nearest_{_nearest}"] = (
        "Resize",
        {"mode": "nearest", "nearest_mode": _nearest},
        (3, 4, 5),
        {"": np.zeros(0, np.float32), "scales": _f32(1, 1, 1.7, 0.6)},
    )
CASES["resize_opset11_roi"] = (
    "Resize",
    {"mode": "linear"},
    (3, 4, 4),
    {"roi": np.zeros(0, np.float32), "scales": _f32(1, 1, 2, 2)},
    11,
)
CASES["resize_opset10"] = ("Resize", {"mode": "nearest"}, (3, 4, 4), {"scales": _f32(1, 1, 2, 3)}, 10)
CASES["upsample_opset9"] = ("Upsample", {"mode": "linear"}, (3, 4, 4), {"scales": _f32(1, 1, 2, 2)}, 9)


def _build(case):
    op, attrs, x_shape, consts, *rest = case
    opset = rest[0] if rest else 18
    n_outputs = rest[1] if len(rest) > 1 else 1
    const_as = rest[2] if len(rest) > 2 else "initializer"
    model = single_op_model(
        op, attrs, x_shape, {k: v for k, v in consts.items() if k.strip()}, opset, n_outputs, const_as
    )
    # Keys made of blanks mark omitted optional inputs: re-insert them as empty names in place.
    node = model.graph.node[-1]
    del node.input[:]
    node.input.extend(["x"] + [k if k.strip() else "" for k in consts])
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_parity(name):
    assert_parity(_build(CASES[name]))


def test_concat_parity():
    model = single_op_model("Concat", {"axis": 1}, (2, 3), {})
    model.graph.node[0].input.append("x")
    assert_parity(model)


def test_gemm_trans_a_parity():
    # transA makes the batch the reduction axis, so B's shape fixes the batch.
    model = single_op_model("Gemm", {"transA": 1, "transB": 1}, (4,), {"B": _rand(2, 3)})
    assert_parity(model, batches=(3,))


def test_logic_ops_parity():
    nodes = [
        helper.make_node("Less", ["x", "c"], ["lt"], name="less"),
        helper.make_node("Greater", ["x", "c"], ["gt"], name="greater"),
        helper.make_node("Not", ["gt"], ["ngt"], name="not"),
        helper.make_node("And", ["lt", "ngt"], ["both"], name="and"),
        helper.make_node("Neg", ["x"], ["nx"], name="neg"),
        helper.make_node("Where", ["both", "x", "nx"], ["w"], name="where"),
        helper.make_node("Abs", ["w"], ["a"], name="abs"),
        helper.make_node("Exp", ["nx"], ["e"], name="exp"),
        helper.make_node("Mean", ["a", "e", "w"], ["y0"], name="mean"),
        helper.make_node("ArgMax", ["x"], ["am"], name="argmax", axis=1, keepdims=0),
        helper.make_node("Cast", ["am"], ["y1"], name="cast", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "logic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("y0", "y1")],
        [numpy_helper.from_array(_f32(0.1), "c")],
    )
    assert_parity(model_factory.make_model(graph))


def test_constant_value_floats_is_a_parameter():
    nodes = [
        helper.make_node("Constant", [], ["scale"], value_floats=[0.5, 2.0, -1.0]),
        helper.make_node("Mul", ["x", "scale"], ["y0"], name="mul"),
    ]
    graph = helper.make_graph(
        nodes,
        "vf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y0", TensorProto.FLOAT, None)],
    )
    model = model_factory.make_model(graph)
    assert_parity(model)
    assert set(to_torch(model).onnx_parameters()) == {"scale"}
    written = write_back(model, {"scale": _f32(1, 2, 3)})
    assert list(written.graph.node[0].attribute[0].floats) == [1, 2, 3]  # still value_floats


def _shape_arith_model(opset=18):
    """x [N,C,H,W] -> Reshape(x, Concat(Gather(Shape(x), 0), [-1])): the batch must stay symbolic."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"], name="unsq"),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"], name="reshape"),
        helper.make_node("Shape", ["flat"], ["fs"], name="shape2", start=1),
        helper.make_node("Cast", ["fs"], ["fsf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("ConstantOfShape", ["s"], ["ones"], name="cos", value=numpy_helper.from_array(_f32(2.0))),
        helper.make_node("Mul", ["x", "ones"], ["x2"], name="mul"),
        helper.make_node("ReduceSum", ["x2", "ax0_1"], ["rs"], name="rsum", keepdims=0),
        helper.make_node("Div", ["flat", "fsf"], ["y0"], name="div"),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(_i64(0), "ax0"),
        numpy_helper.from_array(_i64(-1), "minus1"),
        numpy_helper.from_array(_i64(1), "ax0_1"),
    ]
    graph = helper.make_graph(
        nodes,
        "shape_arith",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 4])],
        [
            helper.make_tensor_value_info("y0", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("rs", TensorProto.FLOAT, None),
        ],
        inits,
    )
    return model_factory.make_model(graph, opset)


def test_shape_arithmetic_keeps_batch_symbolic():
    assert_parity(_shape_arith_model(), batches=(1, 3, 5))


def test_float_constants_become_parameters_and_stats_buffers():
    model = single_op_model(
        "BatchNormalization", {}, (4, 5, 5), {"s": _rand(4), "b": _rand(4), "m": _rand(4), "v": _rand(4) ** 2 + 1}
    )
    module = to_torch(model)
    assert set(module.onnx_parameters()) == {"s", "b"}
    assert {k for k, (kind, _) in module.onnx_names.items() if kind == "buffer"} == {"m", "v"}
    const_model = single_op_model("Conv", {}, (4, 6, 6), {"W/x.y": W33, "B": B5}, const_as="constant")
    assert set(to_torch(const_model).onnx_parameters()) == {"W/x.y", "B"}


def test_dead_branches_are_dropped():
    model = single_op_model("Conv", {}, (4, 6, 6), {"W": W33})
    model.graph.node.append(helper.make_node("Gemm", ["x", "unused_w"], ["dead"], name="dead"))
    model.graph.initializer.append(numpy_helper.from_array(_rand(3, 3), "unused_w"))
    module = to_torch(model)
    assert set(module.onnx_parameters()) == {"W"}
    assert [n.name for n in module.nodes] == ["conv_node"]


def test_unsupported_op_is_a_clear_error():
    model = single_op_model("NonMaxSuppression", {}, (4, 5), {})
    with pytest.raises(OnnxCpError, match=r"unsupported operator NonMaxSuppression \(node 'nonmaxsuppression_node'\)"):
        to_torch(model)
    foreign = single_op_model("Relu", {}, (4, 5), {})
    foreign.graph.node[0].domain = "com.microsoft"
    with pytest.raises(OnnxCpError, match="com.microsoft::Relu"):
        to_torch(foreign)
