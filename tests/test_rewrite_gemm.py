"""A Gemm with a constant weight is the 1x1 conv of its rows: its SVD form is spliced as two thin
MatMuls and an Add of the bias, exact for a weight of exactly that rank (transB, alpha, bias forms, Constant weights,
symbolic rows), refused with a reason where the splice would not compute the same function, and
offered on the search menus as SVD only."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper
from test_rewrite import run
from test_rewrite_forms import rewrite

import model_factory
from onnx_cp import optimize
from onnx_cp.graph import LowRankPass, find_conv_sites, naming, plan_with
from onnx_cp.lowrank import FORMS, SVD
from onnx_cp.measure import count_flops
from onnx_cp.ranks import search
from onnx_cp.ranks.solve import make_solver
from onnx_cp.runtime.cpu import channel_block
from onnx_cp.settings import ErrorBudget, MeasureSettings, SolverSettings

N, K, RANK = 40, 24, 5


def gemm_model(*, trans_b: int = 1, alpha: float = 1.0, beta: float = 1.0, bias: str | None = "row",
               trans_a: int = 0, rows="M", weight_as: str = "initializer", rank: int = RANK,
               n: int = N, k: int = K) -> onnx.ModelProto:
    """x (rows, k) -> Gemm -> y (rows, n) whose (n, k) matrix has exactly `rank`."""
    rng = np.random.default_rng(0)
    matrix = (rng.standard_normal((n, rank)) @ rng.standard_normal((rank, k))).astype(np.float32)
    weight = matrix if trans_b else matrix.T
    inits = []
    nodes = []
    if weight_as == "constant":
        nodes.append(helper.make_node("Constant", [], ["B"], value=numpy_helper.from_array(weight, "B")))
    else:
        inits.append(numpy_helper.from_array(weight, "B"))
    inputs = ["x", "B"]
    if bias is not None:
        values = rng.standard_normal(n).astype(np.float32)
        shapes = {"row": (n,), "matrix_row": (1, n), "full": (3, n)}
        inits.append(numpy_helper.from_array(np.resize(values, shapes[bias]), "C"))
        inputs.append("C")
    x_shape = [k, rows] if trans_a else [rows, k]
    nodes.append(helper.make_node("Gemm", inputs, ["y"], name="fc", transA=trans_a, transB=trans_b,
                                  alpha=alpha, beta=beta))
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [rows, n])], inits)
    return model_factory.make_model(graph)


def assert_same(original: onnx.ModelProto, rewritten: onnx.ModelProto, rows: int, k: int = K) -> None:
    x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    expected, = run(original, {"x": x})
    actual, = run(rewritten, {"x": x})
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


CASES = {
    "plain": {},
    "weight_not_transposed": dict(trans_b=0),
    "alpha": dict(alpha=0.37),
    "no_bias": dict(bias=None),
    "bias_1xN": dict(bias="matrix_row"),
    "constant_weight": dict(weight_as="constant"),
    "fixed_rows": dict(rows=7),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_svd_of_a_gemm_of_exact_rank_is_exact(case):
    model = gemm_model(**CASES[case])
    rewritten, outcomes, modified = rewrite(model, SVD, lambda site: RANK)
    assert modified and outcomes[0].status == "decomposed" and outcomes[0].form == SVD
    assert outcomes[0].rel_error < 1e-6
    nodes = [n for n in rewritten.graph.node]
    stages = ["in", "out"] + (["bias"] if CASES[case].get("bias", "row") else [])
    assert [n.name for n in nodes] == [naming.node_name("fc", stage, SVD) for stage in stages]
    assert [n.op_type for n in nodes] == ["MatMul", "MatMul", "Add"][:len(stages)]
    assert nodes[-1].output[0] == "y"
    assert list(naming.find_chains(nodes)) == ["fc"] and len(naming.find_chains(nodes)["fc"]) == len(stages)
    assert [list(t.dims) for t in rewritten.graph.initializer if t.name != "C"] == [[K, RANK], [RANK, N]]
    assert not any(n.op_type == "Constant" for n in rewritten.graph.node)  # the replaced weight is gone
    onnx.checker.check_model(rewritten, full_check=True)
    for rows in (1, 7):
        if CASES[case].get("rows", rows) == rows:
            assert_same(model, rewritten, rows)


def test_below_the_weights_rank_the_outputs_differ():
    model = gemm_model()
    rewritten, outcomes, _ = rewrite(model, SVD, lambda site: RANK - 1)
    assert outcomes[0].rel_error > 1e-2
    with pytest.raises(AssertionError):
        assert_same(model, rewritten, 7)


REFUSED = {
    "transposed_input": (dict(trans_a=1), "transA=1"),
    "scaled_bias": (dict(beta=0.5), "beta 1"),
    "bias_per_row": (dict(bias="full"), "row of N values"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_gemms_the_splice_cannot_keep_exact_are_refused(case):
    settings, reason = REFUSED[case]
    model = gemm_model(**settings)
    site, = find_conv_sites(ir.from_proto(model))
    assert reason in site.refusal
    rewritten, outcomes, modified = rewrite(model, SVD, lambda site: RANK)
    assert not modified and outcomes[0].status == "skipped" and outcomes[0].reason == site.refusal


def test_a_runtime_weight_is_refused():
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, K]),
                               helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [N, K])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    site, = find_conv_sites(ir.from_proto(model_factory.make_model(graph)))
    assert site.refusal == "weight is not a constant (computed at run time)"


def test_only_svd_applies_and_macs_match_the_flop_counter():
    model = gemm_model(rows=6)
    ir_model = ir.from_proto(model)
    shapes = {"x": [6, K], "y": [6, N]}
    site, = find_conv_sites(ir_model, shapes)
    assert site.is_gemm and site.kernel.shape == (N, K, 1, 1) and site.input_hw == (6, 1)
    for form in ("cp", "tucker2", "spatial_svd"):
        assert site.refusal_for(form) == "Gemm: a matrix has one low-rank form, SVD"
    assert site.refusal_for(SVD) is None
    result = LowRankPass(plan_with([site], lambda site: RANK, FORMS[SVD].solve, form=SVD), sites=[site])(ir_model)
    outcomes, rewritten = result.outcomes, ir.to_proto(result.model)
    assert outcomes[0].macs_before == count_flops(model)["total_macs"] == 6 * N * K
    assert outcomes[0].macs_after == count_flops(rewritten)["total_macs"] == 6 * RANK * (N + K)


def test_search_menus_offer_a_gemm_its_svd_with_or_without_data(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((256, 512)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "B"], ["y"], name="fc", transB=1)], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [16, 512])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "B")])
    sites = find_conv_sites(ir.from_proto(model_factory.make_model(graph)), {"x": [16, 512], "y": [16, 256]})
    menus, refusals = search.layer_menus(sites, make_solver(SolverSettings(workers=1), 0), {"fc": 1.0}, threads=1)
    assert refusals == {}
    menu, = menus
    assert {o.form for o in menu.options[1:]} == {SVD} and len(menu.options) > 2
    assert all(o.ms > 0 for o in menu.options[1:])
    trimmed, = search.data_free_forms(menus)
    assert trimmed.options == menu.options  # CP has no options on a Gemm: SVD stays without data


def test_an_error_budget_decomposes_a_gemm_and_verifies():
    rank = channel_block()  # the grid's smallest rank
    model = gemm_model(rows=7, rank=rank, n=8 * rank, k=6 * rank)
    result = optimize(model, ErrorBudget(0.01), solver=SolverSettings(workers=1))
    row, = result.report["layers"]
    assert (row["op"], row["status"], row["form"], row["rank"]) == ("Gemm", "decomposed", SVD, rank)
    assert result.report["verification"]["checker"] == "passed"
    assert result.report["verification"]["max_rel_error"] < 1e-4
    assert_same(model, result.model, 7, k=6 * rank)


def test_rows_that_shape_inference_cannot_see_come_from_a_run():
    """A Gemm behind a Reshape whose shape is computed at run time (a CRNN's classifier): its MACs
    count every row, measured by one onnxruntime run at the given input shape."""
    rank = channel_block()
    n, k = 8 * rank, 6 * rank
    weight = (np.random.default_rng(0).standard_normal((n, rank))
              @ np.random.default_rng(1).standard_normal((rank, k))).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
             helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i2"], ["w"]),
             helper.make_node("Cast", ["w"], ["wf"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Ceil", ["wf"], ["wc"]),  # opaque to onnx's data propagation
             helper.make_node("Cast", ["wc"], ["wi"], to=onnx.TensorProto.INT64),
             helper.make_node("Concat", ["wi", "k"], ["shape"], axis=0),
             helper.make_node("Reshape", ["xt", "shape"], ["rows"]),
             helper.make_node("Gemm", ["rows", "B"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, k, "W"])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([2], np.int64), "i2"),
                               numpy_helper.from_array(np.array([k], np.int64), "k"),
                               numpy_helper.from_array(weight, "B")])
    model = model_factory.make_model(graph)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    assert not any(v.name == "rows" and v.type.tensor_type.shape.dim[0].HasField("dim_value")
                   for v in inferred.graph.value_info)
    result = optimize(model, ErrorBudget(0.01), solver=SolverSettings(workers=1),
                      measure=MeasureSettings(input_shapes={"x": [1, k, 24]}))
    row, = result.report["layers"]
    assert row["macs_before"] == 24 * n * k
    assert row["status"] == "decomposed" and row["macs_after"] == 24 * rank * (n + k)


def test_a_matrix_menu_holds_every_block_multiple_where_a_conv_menu_steps_geometrically():
    """A Gemm's time follows its rank closely: its menu takes every multiple of the channel block
    up to FINE_MULTIPLES blocks (those that still cut its MACs enough), a 1x1 conv's only the geometric ones."""
    from onnx_cp.ranks.forms import FINE_MULTIPLES, form_ranks
    from onnx_cp.ranks.grid import MENU_MULTIPLES
    from onnx_cp.runtime.cpu import channel_block

    block = channel_block()
    weight = np.random.default_rng(0).standard_normal((4096, 1024)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "B"], ["y"], name="fc", transB=1)], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [16, 1024])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "B")])
    site, = find_conv_sites(ir.from_proto(model_factory.make_model(graph)), {"x": [16, 1024], "y": [16, 4096]})
    ranks = form_ranks(site, SVD, 1.5)
    assert [r // block for r in ranks if r <= FINE_MULTIPLES * block] == list(range(1, FINE_MULTIPLES + 1))
    conv = dataclasses.replace(site, node=ir.node("Conv", []))  # the same kernel as a 1x1 conv
    assert all(r // block in MENU_MULTIPLES for r in form_ranks(conv, SVD, 1.5))


def test_a_gemms_output_error_on_data_is_its_rows_error_over_its_biased_outputs():
    """||(K - K') x|| / ||K x + b|| over every sample's rows, from the rows' statistics alone."""
    from onnx_cp.ranks.forms import solve_form
    from onnx_cp.ranks.output_error import OutputError

    rng = np.random.default_rng(1)
    weight = rng.standard_normal((24, 40)).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32) * 3
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "B", "C"], ["y"], name="fc", transB=1)], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 40])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 24])],
                              [numpy_helper.from_array(weight, "B"), numpy_helper.from_array(bias, "C")])
    model = ir.from_proto(model_factory.make_model(graph))
    site, = find_conv_sites(model, {"x": [100, 40], "y": [100, 24]})
    xs = (rng.standard_normal((100, 40)) @ rng.standard_normal((40, 40)) * 0.3).astype(np.float32)
    errors = OutputError(model, [site], xs)
    solution = solve_form(site, SVD, 5)
    u, v = solution[0].factors
    approx = u @ v.reshape(5, -1)
    expected = np.linalg.norm(xs @ (weight - approx).T) / np.linalg.norm(xs @ weight.T + bias)
    assert errors(site, solution) == pytest.approx(expected, rel=1e-5)
