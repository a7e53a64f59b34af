"""The Tucker-2, channel-SVD and spatial-SVD splices: a kernel that is exactly of the form at a rank,
solved at that rank, comes back with the same onnxruntime outputs, over the CP splice's attribute
grid (test_rewrite.CASES), 1x1 convs, and the ONNX backend's Conv cases."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper
from test_rewrite import CASES, assert_same_outputs, run
from test_rewrite_onnx_suite import CONV_CASES, backend_model

import model_factory
from onnx_cp.graph import LayerPlan, LowRankPass, Plan, find_conv_sites, naming, plan_with
from onnx_cp.graph.forms import macs_after, params_after
from onnx_cp.lowrank import FORMS, SPATIAL_SVD, SVD, TUCKER2
from onnx_cp.measure import count_flops

FORM_RANKS = {TUCKER2: (2, 3), SVD: 2, SPATIAL_SVD: 2}


def kernel_of_form(form: str, t: int, s: int, kh: int, kw: int, rank, seed: int = 0) -> np.ndarray:
    """A (t, s, kh, kw) kernel that is exactly of `form` at `rank` (clipped to what fits)."""
    rng = np.random.default_rng(seed)
    if form == TUCKER2:
        r_in, r_out = min(rank[0], s), min(rank[1], t)
        core = rng.standard_normal((r_out, r_in, kh, kw))
        return np.einsum("bayx,tb,sa->tsyx", core, rng.standard_normal((t, r_out)), rng.standard_normal((s, r_in)))
    if form == SVD:
        r = min(rank, t, s * kh * kw)
        return np.einsum("tr,rsyx->tsyx", rng.standard_normal((t, r)), rng.standard_normal((r, s, kh, kw)))
    r = min(rank, s * kh, t * kw)
    return np.einsum("trx,rsy->tsyx", rng.standard_normal((t, r, kw)), rng.standard_normal((r, s, kh)))


def clipped_rank(form, kernel_shape, rank):
    t, s, kh, kw = kernel_shape
    if form == TUCKER2:
        return min(rank[0], s), min(rank[1], t)
    return min(rank, t, s * kh * kw) if form == SVD else min(rank, s * kh, t * kw)


def rewrite(model: onnx.ModelProto, form: str, rank_for):
    ir_model = ir.from_proto(model)
    sites = find_conv_sites(ir_model)
    plan = plan_with(sites, rank_for, FORMS[form].solve, form=form)
    result = LowRankPass(plan, sites=sites)(ir_model)
    return ir.to_proto(result.model), result.outcomes, result.modified


def grid_model(case: str, form: str):
    spec = dict(CASES[case])
    rng = np.random.default_rng(0)
    t, s, kh, kw = spec.pop("kernel")
    group = spec.get("group", 1)
    in_channels = spec.pop("in_channels", s * group)
    symbolic = spec.pop("symbolic_hw", False)
    rank = clipped_rank(form, (t // group, s, kh, kw), FORM_RANKS[form])
    kernel = np.concatenate([kernel_of_form(form, t // group, s, kh, kw, rank, seed=g) for g in range(group)])
    kernel = kernel.astype(np.float32)
    bias = rng.standard_normal(t).astype(np.float32) if spec.pop("bias", True) else None
    input_shape = ["N", in_channels, "H", "W"] if symbolic else ["N", in_channels, 11, 13]
    return model_factory.conv_model(kernel, bias, input_shape=input_shape, **spec), rank, in_channels, bias


@pytest.mark.parametrize("form", sorted(FORM_RANKS))
@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c].get("symbolic_hw")))
def test_symbolic_spatial_sizes_stay_exact_at_other_sizes(case, form):
    model, rank, in_channels, _ = grid_model(case, form)
    rewritten, outcomes, modified = rewrite(model, form, lambda site: rank)
    assert modified
    for hw in ((9, 10), (16, 7), (4, 4)):
        assert_same_outputs(model, rewritten, (1, in_channels, *hw))


def conv_stages(form: str) -> list[str]:
    """A Conv chain's stages: the bias stage is a Gemm chain's (its Add)."""
    return [stage for stage in naming.FORM_STAGES[form] if stage != "bias"]


def expected_stages(form: str) -> list[str]:
    return [naming.node_name("conv", stage, form) for stage in conv_stages(form)]


@pytest.mark.parametrize("form", sorted(FORM_RANKS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_splice_of_an_exact_kernel_is_exact(case, form):
    model, rank, in_channels, bias = grid_model(case, form)
    rewritten, outcomes, modified = rewrite(model, form, lambda site: rank)
    site = find_conv_sites(ir.from_proto(model))[0]
    if site.refusal_for(form):
        assert not modified and outcomes[0].status == "skipped" and outcomes[0].reason == site.refusal_for(form)
        return
    assert modified and outcomes[0].status == "decomposed" and outcomes[0].form == form
    assert outcomes[0].rel_error < 1e-6
    convs = [n for n in rewritten.graph.node if n.op_type == "Conv"]
    assert [n.name for n in convs] == expected_stages(form)
    assert convs[-1].output[0] == "y" and (bias is None or convs[-1].input[2] == "B")
    assert all(len(n.input) == 2 for n in convs[:-1])  # the bias only on the last stage
    weights = {t.name for t in rewritten.graph.initializer}
    assert "W" not in weights  # the replaced kernel is gone (or its Constant node)
    assert not any(n.op_type == "Constant" and n.output[0] == "W" for n in rewritten.graph.node)
    onnx.checker.check_model(rewritten, full_check=True)
    assert_same_outputs(model, rewritten, (2, in_channels, 11, 13))
    assert_same_outputs(model, rewritten, (1, in_channels, 11, 13))


@pytest.mark.parametrize("form", sorted(FORM_RANKS))
def test_solved_below_the_kernels_rank_the_outputs_differ(form):
    """The exactness above is not vacuous: at a smaller rank the same check fails."""
    model, rank, in_channels, _ = grid_model("plain", form)
    smaller = (rank[0] - 1, rank[1]) if form == TUCKER2 else rank - 1
    rewritten, outcomes, _ = rewrite(model, form, lambda site: smaller)
    assert outcomes[0].rel_error > 1e-2
    with pytest.raises(AssertionError):
        assert_same_outputs(model, rewritten, (1, in_channels, 11, 13))


ONE_BY_ONE = {
    "plain": dict(),
    "stride2": dict(strides=[2, 2]),
    "pads": dict(pads=[1, 0, 2, 1]),
    "pads_stride": dict(pads=[1, 1, 1, 1], strides=[2, 3]),
    "same_upper_symbolic": dict(auto_pad="SAME_UPPER", strides=[2, 2], symbolic_hw=True),
    "valid": dict(auto_pad="VALID"),
    "group2": dict(group=2),
    "no_bias": dict(bias=False),
    "constant_weights": dict(weight_as="constant"),
}


@pytest.mark.parametrize("case", sorted(ONE_BY_ONE))
def test_1x1_convs_are_refused_by_cp_and_spliced_exactly_by_svd(case):
    spec = dict(ONE_BY_ONE[case])
    group = spec.get("group", 1)
    symbolic = spec.pop("symbolic_hw", False)
    t, s, rank = 16, 12 // group, 3
    kernel = np.concatenate([kernel_of_form(SVD, t // group, s, 1, 1, rank, seed=g) for g in range(group)])
    bias = None if spec.pop("bias", True) is False else np.arange(t, dtype=np.float32)
    input_shape = ["N", 12, "H", "W"] if symbolic else ["N", 12, 11, 13]
    model = model_factory.conv_model(kernel.astype(np.float32), bias, input_shape=input_shape, **spec)
    site = find_conv_sites(ir.from_proto(model))[0]
    assert site.eligible
    assert "1x1" in site.refusal_for("cp") and "1x1" in site.refusal_for(TUCKER2)
    assert site.refusal_for(SPATIAL_SVD) and site.refusal_for(SVD) is None
    rewritten, outcomes, modified = rewrite(model, SVD, lambda site: rank)
    assert modified and outcomes[0].rank == rank and outcomes[0].rel_error < 1e-6
    convs = [n for n in rewritten.graph.node if n.op_type == "Conv"]
    assert [n.name for n in convs] == expected_stages(SVD)
    shapes = {t.name: tuple(t.dims) for t in rewritten.graph.initializer}
    assert shapes["conv/svd/in.weight"] == (rank * group, s, 1, 1)
    assert shapes["conv/svd/out.weight"] == (t, rank, 1, 1)
    onnx.checker.check_model(rewritten, full_check=True)
    assert_same_outputs(model, rewritten, (2, 12, 11, 13))


@pytest.mark.parametrize("form", sorted(FORM_RANKS))
def test_macs_and_params_match_the_flop_counter(form):
    t, s, kh, kw = 16, 8, 3, 5
    kernel = kernel_of_form(form, t, s, kh, kw, FORM_RANKS[form]).astype(np.float32)
    model = model_factory.conv_model(kernel, np.zeros(t, np.float32), input_shape=["N", 8, 12, 14],
                                     strides=[2, 1], pads=[1, 2, 1, 2])
    rank = FORM_RANKS[form]
    rewritten, outcomes, _ = rewrite(model, form, lambda site: rank)
    shapes = {"x": [1, 8, 12, 14], "y": [1, t, 6, 14]}
    site = find_conv_sites(ir.from_proto(model), shapes)[0]
    assert macs_after(site, form, rank) == count_flops(rewritten, {"x": [1, 8, 12, 14]})["total_macs"]
    weights = [numpy_helper.to_array(w) for w in rewritten.graph.initializer if w.name != "B"]
    assert params_after(site, form, rank) == sum(w.size for w in weights)


def test_tucker2_chain_structure_groups_and_report_rank():
    kernel = np.concatenate([kernel_of_form(TUCKER2, 4, 4, 3, 3, (2, 3), seed=g) for g in range(2)])
    model = model_factory.conv_model(kernel.astype(np.float32), np.ones(8, np.float32), group=2,
                                     input_shape=["N", 8, 9, 9], pads=[1, 1, 1, 1])
    rewritten, outcomes, _ = rewrite(model, TUCKER2, lambda site: (2, 3))
    assert outcomes[0].rank == [2, 3] and outcomes[0].as_dict()["form"] == TUCKER2
    shapes = {t.name: tuple(t.dims) for t in rewritten.graph.initializer}
    assert shapes["conv/tucker2/in.weight"] == (4, 4, 1, 1)
    assert shapes["conv/tucker2/core.weight"] == (6, 2, 3, 3)
    assert shapes["conv/tucker2/out.weight"] == (8, 3, 1, 1)
    groups = {n.name: helper.get_attribute_value(next(a for a in n.attribute if a.name == "group"))
              for n in rewritten.graph.node}
    assert set(groups.values()) == {2}
    nodes = list(rewritten.graph.node)
    assert all(naming.layer_of(n.name) == "conv" for n in nodes)
    assert naming.find_chains(nodes) == {"conv": nodes}
    assert naming.chain_forms(nodes) == {"conv": TUCKER2}
    assert {p.key: p.value for p in nodes[1].metadata_props}[naming.LAYER_METADATA_KEY] == "conv"
    assert_same_outputs(model, rewritten, (2, 8, 9, 9))


def test_a_plan_for_a_form_the_conv_refuses_is_an_error():
    kernel = np.ones((8, 4, 1, 1), np.float32)
    model = ir.from_proto(model_factory.conv_model(kernel, None, input_shape=["N", 4, 6, 6]))
    plan = Plan({"conv": LayerPlan(2, [[np.ones((8, 2)), np.ones((4, 2)), np.ones((1, 2)), np.ones((1, 2))]])})
    with pytest.raises(Exception, match="1x1 conv: CP gains nothing"):
        LowRankPass(plan)(model)


@pytest.mark.parametrize("form", [SVD, SPATIAL_SVD])
@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_backend_conv_case(name, form):
    """The backend's kernels are one-channel (Tucker-2 refuses them); at full rank both SVD forms are
    exact for any kernel, so the reference outputs must come back."""
    model, inputs, outputs = backend_model(name)
    def full_rank(site):
        t, s, kh, kw = site.kernel.shape
        return min(t, s * kh * kw) if form == SVD else min(s * kh, t * kw)
    rewritten, outcomes, modified = rewrite(model, form, full_rank)
    assert modified and outcomes[0].rel_error < 1e-6
    assert [n.name.rpartition("/")[2] for n in rewritten.graph.node if n.op_type == "Conv"] == conv_stages(form)
    actual, = run(rewritten, {model.graph.input[0].name: inputs[0]})
    np.testing.assert_allclose(actual, outputs[0], rtol=1e-3, atol=1e-3 * np.abs(outputs[0]).max())
