"""The CP rewrite pass: exact splicing on every Conv attribute, independent of any solver."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import model_factory
from onnx_cp.cp import balance, reconstruct
from onnx_cp.graph import CPConvPass, find_conv_sites, plan_with
from onnx_cp.graph import naming as chain_names
from onnx_cp.measure import count_flops


def unfolding_cp(kernel: np.ndarray, rank: int) -> list[np.ndarray]:
    """An exact CP of any kernel with rank S*kh*kw: one term per (s, y, x) position.
    Lets the splice be tested without a solver; `rank` must equal S*kh*kw."""
    t, s, kh, kw = kernel.shape
    assert rank == s * kh * kw
    grid = np.array(np.unravel_index(np.arange(rank), (s, kh, kw)))
    return [kernel.reshape(t, rank), np.eye(s)[:, grid[0]], np.eye(kh)[:, grid[1]], np.eye(kw)[:, grid[2]]]


def exact_rank(site) -> int:
    _, s, kh, kw = site.kernel.shape
    return s * kh * kw


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def rewrite(model: onnx.ModelProto, rank_for=exact_rank, decomposer=unfolding_cp):
    ir_model = ir.from_proto(model)
    sites = find_conv_sites(ir_model)
    result = CPConvPass(plan_with(sites, rank_for, decomposer), sites=sites)(ir_model)
    return ir.to_proto(result.model), result.outcomes, result.modified


def assert_same_outputs(original, rewritten, shape, dtype=np.float32, rtol=1e-4):
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    expected, = run(original, {"x": x})
    actual, = run(rewritten, {"x": x})
    assert actual.shape == expected.shape
    scale = np.abs(expected.astype(np.float64)).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


CASES = {
    "plain": dict(kernel=(6, 4, 3, 3)),
    "stride2": dict(kernel=(6, 4, 3, 3), strides=[2, 2]),
    "stride_mixed": dict(kernel=(6, 4, 3, 3), strides=[2, 1]),
    "dilation": dict(kernel=(6, 4, 3, 3), dilations=[2, 3]),
    "asym_pads": dict(kernel=(6, 4, 3, 3), pads=[0, 1, 2, 0]),
    "pads_stride_dilation": dict(kernel=(5, 4, 3, 5), pads=[1, 2, 2, 1], strides=[2, 3], dilations=[2, 1]),
    "non_square": dict(kernel=(6, 4, 5, 3), pads=[2, 1, 2, 1]),
    "one_by_k": dict(kernel=(6, 4, 1, 5), pads=[0, 2, 0, 2]),
    "k_by_one": dict(kernel=(6, 4, 5, 1)),
    "same_upper": dict(kernel=(6, 4, 4, 3), auto_pad="SAME_UPPER", strides=[2, 2]),
    "same_lower": dict(kernel=(6, 4, 4, 3), auto_pad="SAME_LOWER", strides=[2, 1]),
    "same_symbolic": dict(kernel=(6, 4, 4, 4), auto_pad="SAME_UPPER", strides=[2, 2], symbolic_hw=True),
    "same_lower_symbolic": dict(kernel=(6, 4, 3, 2), auto_pad="SAME_LOWER", symbolic_hw=True),
    "valid": dict(kernel=(6, 4, 3, 3), auto_pad="VALID", strides=[2, 2]),
    "group2": dict(kernel=(6, 2, 3, 3), group=2, pads=[1, 1, 1, 1]),
    "group4_stride": dict(kernel=(8, 2, 3, 3), group=4, strides=[2, 2], pads=[1, 0, 1, 0], in_channels=8),
    "no_bias": dict(kernel=(6, 4, 3, 3), bias=False),
    "constant_weights": dict(kernel=(6, 4, 3, 3), weight_as="constant"),
    "opset11_constant": dict(kernel=(6, 4, 3, 3), weight_as="constant", opset=11),
    "one_input_channel": dict(kernel=(6, 1, 3, 3), pads=[1, 1, 1, 1]),
    "one_input_channel_strided": dict(kernel=(6, 1, 5, 3), strides=[2, 1], dilations=[1, 2], pads=[2, 0, 1, 2]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_splice_is_exact(case):
    spec = dict(CASES[case])
    rng = np.random.default_rng(0)
    t, s, kh, kw = spec.pop("kernel")
    group = spec.get("group", 1)
    in_channels = spec.pop("in_channels", s * group)
    symbolic = spec.pop("symbolic_hw", False)
    kernel = rng.standard_normal((t, s, kh, kw)).astype(np.float32)
    bias = rng.standard_normal(t).astype(np.float32) if spec.pop("bias", True) else None
    input_shape = ["N", in_channels, "H", "W"] if symbolic else ["N", in_channels, 11, 13]
    model = model_factory.conv_model(kernel, bias, input_shape=input_shape, **spec)
    rewritten, outcomes, modified = rewrite(model)
    assert modified and outcomes[0].status == "decomposed"
    assert outcomes[0].rel_error < 1e-6
    ops = [n.op_type for n in rewritten.graph.node]
    stages = 3 if s == 1 and group == 1 else 4  # one input channel: the input stage is folded
    assert ops[-stages:] == ["Conv"] * stages
    assert ops[:-stages] == (["Constant"] if spec.get("weight_as") and bias is not None else [])  # bias only
    onnx.checker.check_model(rewritten, full_check=True)
    assert_same_outputs(model, rewritten, (2, in_channels, 11, 13))
    assert_same_outputs(model, rewritten, (1, in_channels, 11, 13))


def test_chain_structure_names_and_shapes():
    kernel = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    model = model_factory.conv_model(kernel, np.zeros(8, np.float32), group=2, input_shape=["N", 8, 9, 9])
    rewritten, _, _ = rewrite(model, rank_for=lambda site: 36,
                              decomposer=lambda k, r: unfolding_cp(k, 36))
    nodes = {n.name: n for n in rewritten.graph.node}
    assert list(nodes) == [chain_names.node_name("conv", s) for s in chain_names.STAGES]
    weights = {t.name: numpy_helper.to_array(t).shape for t in rewritten.graph.initializer}
    assert weights["conv/cp/in.weight"] == (72, 4, 1, 1)
    assert weights["conv/cp/vertical.weight"] == (72, 1, 3, 1)
    assert weights["conv/cp/horizontal.weight"] == (72, 1, 1, 3)
    assert weights["conv/cp/out.weight"] == (8, 36, 1, 1)
    assert "W" not in weights  # the replaced kernel is gone
    groups = {n.name: helper.get_attribute_value(next(a for a in n.attribute if a.name == "group"))
              for n in rewritten.graph.node}
    assert groups == {"conv/cp/in": 2, "conv/cp/vertical": 72, "conv/cp/horizontal": 72, "conv/cp/out": 2}
    assert nodes["conv/cp/out"].input[2] == "B"  # bias carried by the last stage
    assert rewritten.graph.node[-1].output[0] == "y"  # the output name is kept
    assert all(chain_names.layer_of(n) == "conv" for n in nodes)
    meta = {p.key: p.value for p in rewritten.graph.node[0].metadata_props}
    assert meta[chain_names.LAYER_METADATA_KEY] == "conv"


def test_one_input_channel_folds_the_input_stage_into_the_vertical_one():
    kernel = np.random.default_rng(0).standard_normal((8, 1, 5, 5)).astype(np.float32)
    model = model_factory.conv_model(kernel, np.zeros(8, np.float32), input_shape=["N", 1, 12, 12])
    rng = np.random.default_rng(1)
    rewritten, _, _ = rewrite(model, rank_for=lambda site: 4,
                                     decomposer=lambda k, r: [rng.standard_normal((n, r)) for n in k.shape])
    assert [n.name for n in rewritten.graph.node] == ["conv/cp/vertical", "conv/cp/horizontal", "conv/cp/out"]
    weights = {t.name: numpy_helper.to_array(t).shape for t in rewritten.graph.initializer}
    assert weights["conv/cp/vertical.weight"] == (4, 1, 5, 1)  # a plain 1 -> R Conv, not depthwise
    group = next(a for a in rewritten.graph.node[0].attribute if a.name == "group")
    assert group.i == 1
    # the cost model the rank search uses counts the three-conv chain, as the FLOP counter does
    site = find_conv_sites(ir.from_proto(model), {"x": [1, 1, 12, 12], "y": [1, 8, 8, 8]})[0]
    assert site.macs_after(4) == count_flops(rewritten, {"x": [1, 1, 12, 12]})["total_macs"]
    assert site.params_after(4) == 4 * (5 + 5) + 8 * 4 == sum(
        int(np.prod(shape)) for name, shape in weights.items() if "/cp/" in name)


def test_low_rank_kernel_at_its_rank_is_exact():
    """A kernel that is a sum of R rank-one terms, decomposed at rank R by an oracle."""
    rng = np.random.default_rng(3)
    factors = [rng.standard_normal((n, 5)) for n in (16, 8, 3, 3)]
    kernel = reconstruct(factors).astype(np.float32)
    model = model_factory.conv_model(kernel, None, input_shape=["N", 8, 10, 10], pads=[1, 1, 1, 1])
    rewritten, outcomes, _ = rewrite(model, rank_for=lambda site: 5, decomposer=lambda k, r: factors)
    assert outcomes[0].rank == 5 and outcomes[0].rel_error < 1e-6
    assert_same_outputs(model, rewritten, (3, 8, 10, 10))


def test_float16_weights_stay_float16():
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((6, 4, 3, 3)).astype(np.float16)
    model = model_factory.conv_model(kernel, np.zeros(6, np.float16), input_shape=["N", 4, 8, 8])
    rewritten, _, _ = rewrite(model)
    dtypes = {t.name: t.data_type for t in rewritten.graph.initializer}
    assert set(dtypes.values()) == {onnx.TensorProto.FLOAT16}
    assert_same_outputs(model, rewritten, (1, 4, 8, 8), dtype=np.float16, rtol=2e-2)


def test_shared_weight_decomposed_once():
    rng = np.random.default_rng(0)
    kernel = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "W")
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["a"], name="first", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W"], ["y"], name="second", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", 1, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", 1, [None] * 4)], [kernel])
    model = model_factory.make_model(graph)
    calls = []

    def counting(k, r):
        calls.append(r)
        return unfolding_cp(k, r)

    rewritten, outcomes, _ = rewrite(model, decomposer=counting)
    assert calls == [36]
    assert outcomes[1].extra["shares_weights_with"] == "first"
    assert len(rewritten.graph.initializer) == 4  # one set of chain weights, W removed
    assert [n.name for n in rewritten.graph.node][4] == "relu"  # untouched node keeps its place
    assert_same_outputs(model, rewritten, (2, 4, 6, 6))


def test_foldable_weight_expression():
    """Weight = Cast(Constant fp16): folded, rewritten, and the dead Constant/Cast removed."""
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((6, 4, 3, 3)).astype(np.float16)
    nodes = [
        helper.make_node("Constant", [], ["W16"], value=numpy_helper.from_array(kernel, "W16")),
        helper.make_node("Cast", ["W16"], ["W"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
    ]
    graph = helper.make_graph(nodes, "fold", [helper.make_tensor_value_info("x", 1, ["N", 4, 7, 7])],
                              [helper.make_tensor_value_info("y", 1, [None] * 4)])
    model = model_factory.make_model(graph)
    rewritten, outcomes, _ = rewrite(model)
    assert outcomes[0].status == "decomposed"
    assert [n.op_type for n in rewritten.graph.node] == ["Conv"] * 4
    assert_same_outputs(model, rewritten, (1, 4, 7, 7))


SKIPS = {
    "1x1": ((8, 4, 1, 1), {}, "1x1"),
    "depthwise": ((4, 1, 3, 3), {"group": 4}, "depthwise"),
    "conv1d": ((4, 4, 3), {}, "1-D"),
    "conv3d": ((4, 4, 3, 3, 3), {}, "3-D"),
}


@pytest.mark.parametrize("case", sorted(SKIPS))
def test_convs_that_gain_nothing_are_skipped_with_a_reason(case):
    shape, attrs, reason = SKIPS[case]
    kernel = np.ones(shape, np.float32)
    input_shape = ["N", 4] + [6] * (len(shape) - 2)
    model = model_factory.conv_model(kernel, None, input_shape=input_shape, **attrs)
    rewritten, outcomes, modified = rewrite(model, rank_for=lambda s: 4, decomposer=lambda k, r: 1 / 0)
    assert not modified
    assert outcomes[0].status == "skipped" and reason in outcomes[0].reason
    assert rewritten.graph == ir.to_proto(ir.from_proto(model)).graph


def test_runtime_weight_is_skipped():
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "dyn",
        [helper.make_tensor_value_info("x", 1, [1, 4, 6, 6]), helper.make_tensor_value_info("w", 1, [4, 4, 3, 3])],
        [helper.make_tensor_value_info("y", 1, [None] * 4)])
    sites = find_conv_sites(ir.from_proto(model_factory.make_model(graph)))
    assert "not a constant" in sites[0].refusal


def test_conv_inside_if_branch_left_intact():
    rng = np.random.default_rng(0)
    kernel = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "W")

    def branch(name):
        return helper.make_graph([helper.make_node("Conv", ["x", "W"], [f"{name}_y"], name=f"{name}_conv")],
                                 name, [], [helper.make_tensor_value_info(f"{name}_y", 1, [None] * 4)])

    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else"))]
    graph = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
                                            helper.make_tensor_value_info("x", 1, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", 1, [None] * 4)], [kernel])
    model = model_factory.make_model(graph)
    rewritten, outcomes, modified = rewrite(model)
    assert not modified
    assert {o.reason for o in outcomes} == {"inside a subgraph (If/Loop/Scan body): left unchanged"}
    onnx.checker.check_model(rewritten, full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": x}
        np.testing.assert_array_equal(run(rewritten, feeds)[0], run(model, feeds)[0])


def test_balance_equalises_column_norms_without_changing_the_tensor():
    rng = np.random.default_rng(0)
    factors = [rng.standard_normal((n, 3)) * scale for n, scale in zip((5, 4, 3, 3), (1e3, 1e-3, 1, 10))]
    balanced = balance(factors)
    np.testing.assert_allclose(reconstruct(balanced), reconstruct(factors), rtol=1e-10, atol=1e-12)
    norms = np.stack([np.linalg.norm(f, axis=0) for f in balanced])
    np.testing.assert_allclose(norms, norms[:1].repeat(4, 0), rtol=1e-10)
