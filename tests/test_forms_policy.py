"""Rank policies across low-rank forms: each layer's menu offers CP, Tucker-2, channel SVD and
spatial SVD where they apply, `decomposition` restricts the choice, and the error budget picks
per layer the form that meets it with the fewest MACs, checked against onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import model_factory
from onnx_cp import optimize
from onnx_cp.cli import main
from onnx_cp.errors import UsageError
from onnx_cp.graph import find_conv_sites
from onnx_cp.lowrank import SPATIAL_SVD, SVD, TUCKER2
from onnx_cp.ranks import search
from onnx_cp.ranks.solve import make_solver
from onnx_cp.runtime.cpu import channel_block
from onnx_cp.settings import ErrorBudget, ExplicitRanks, SolverSettings

C = 64  # channels: with 16-channel blocks, a 1x1 conv at SVD rank 16 still halves its MACs


def three_form_model() -> onnx.ModelProto:
    """conv_t (3x3, exactly Tucker-2 at block ranks) -> conv_s (1x1, exactly rank block) ->
    conv_x (5x5, exactly spatially separable at rank block)."""
    rng = np.random.default_rng(0)
    b = channel_block()
    core = rng.standard_normal((b, b, 3, 3))
    tucker = np.einsum("bayx,tb,sa->tsyx", core, rng.standard_normal((C, b)), rng.standard_normal((C, b)))
    one = (rng.standard_normal((C, b)) @ rng.standard_normal((b, C)))[:, :, None, None]
    spatial = np.einsum("trx,rsy->tsyx", rng.standard_normal((C, b, 5)), rng.standard_normal((b, C, 5)))
    weights = {"wt": tucker, "ws": one, "wx": spatial}
    inits = [numpy_helper.from_array((w / np.abs(w).max()).astype(np.float32), n) for n, w in weights.items()]
    inits += [numpy_helper.from_array(np.linspace(-1, 1, C).astype(np.float32), "b")]
    nodes = [
        helper.make_node("Conv", ["x", "wt", "b"], ["t"], name="conv_t", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["t"], ["rt"]),
        helper.make_node("Conv", ["rt", "ws", "b"], ["s"], name="conv_s"),
        helper.make_node("Relu", ["s"], ["rs"]),
        helper.make_node("Conv", ["rs", "wx"], ["y"], name="conv_x", strides=[2, 1], pads=[2, 2, 2, 2]),
    ]
    graph = helper.make_graph(nodes, "three_forms", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                   ["N", C, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)], inits)
    return model_factory.make_model(graph)


def rows(result) -> dict[str, dict]:
    return {row["name"]: row for row in result.report["layers"]}


def assert_same_outputs(original: onnx.ModelProto, rewritten: onnx.ModelProto, rtol: float = 1e-3) -> None:
    x = np.random.default_rng(1).standard_normal((2, C, 8, 8)).astype(np.float32)
    expected, = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})
    actual, = ort.InferenceSession(rewritten.SerializeToString(),
                                   providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())


def test_error_budget_picks_each_layers_exact_form():
    model = three_form_model()
    result = optimize(model, ErrorBudget(0.01), solver=SolverSettings(workers=1))
    layers = rows(result)
    b = channel_block()
    assert (layers["conv_t"]["form"], layers["conv_t"]["rank"]) == (TUCKER2, [b, b])
    assert (layers["conv_s"]["form"], layers["conv_s"]["rank"]) == (SVD, b)
    assert (layers["conv_x"]["form"], layers["conv_x"]["rank"]) == (SPATIAL_SVD, b)
    for row in layers.values():
        assert row["rel_error"] < 1e-5 and "fewest MACs" in row["note"]
    assert result.report["settings"]["decomposition"] == "auto"
    assert_same_outputs(model, result.model)


def test_cp_only_leaves_the_1x1_conv_alone_with_cps_reason():
    result = optimize(three_form_model(), ErrorBudget(0.01), solver=SolverSettings(workers=1, decomposition="cp"))
    layers = rows(result)
    assert layers["conv_s"]["status"] == "skipped" and layers["conv_s"]["reason"] == "1x1 conv: CP gains nothing"
    assert all(row["form"] in (None, "cp") for row in layers.values())


def test_a_named_form_takes_the_explicit_rank():
    model = three_form_model()
    result = optimize(model, ExplicitRanks(rank=channel_block()), solver=SolverSettings(decomposition=SVD))
    layers = rows(result)
    assert {row["form"] for row in layers.values()} == {SVD}
    assert layers["conv_s"]["rel_error"] < 1e-5  # exactly rank block
    assert layers["conv_t"]["rel_error"] < 1e-5  # Tucker-2 at (b, b): its (T, S*9) matrix has rank b
    tucker = optimize(model, ExplicitRanks(rank=4), solver=SolverSettings(decomposition=TUCKER2))
    layers = rows(tucker)
    assert layers["conv_t"]["form"] == TUCKER2 and layers["conv_t"]["rank"] == [4, 4]
    assert "Tucker-2 is the SVD form" in layers["conv_s"]["reason"]
    at_block = rows(optimize(model, ExplicitRanks(rank=channel_block()), solver=SolverSettings(decomposition=TUCKER2)))
    assert at_block["conv_t"]["rel_error"] < 1e-5 < at_block["conv_x"]["rel_error"]


def test_the_rank_means_cp_under_auto():
    result = optimize(three_form_model(), ExplicitRanks(rank=8), solver=SolverSettings(workers=1))
    layers = rows(result)
    assert layers["conv_t"]["form"] == "cp" and layers["conv_t"]["rank"] == 8
    assert layers["conv_s"]["reason"] == "1x1 conv: CP gains nothing"


def test_decomposition_is_checked():
    with pytest.raises(UsageError, match="decomposition"):
        SolverSettings(decomposition="qr")
    with pytest.raises(UsageError, match="custom decomposer"):
        SolverSettings(decomposer=lambda k, r: None, decomposition=SVD)
    assert SolverSettings(decomposer=lambda k, r: None).forms == ("cp",)


def three_form_sites() -> list:
    model = ir.from_proto(three_form_model())
    shapes = {"x": [1, C, 8, 8], "t": [1, C, 8, 8], "rt": [1, C, 8, 8], "s": [1, C, 8, 8], "rs": [1, C, 8, 8],
              "y": [1, C, 4, 8]}
    return find_conv_sites(model, shapes)


def test_menus_offer_every_form_that_applies(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    sites = three_form_sites()
    layer_ms = {s.name: 1.0 for s in sites}
    menus, refusals = search.layer_menus(sites, make_solver(SolverSettings(workers=1), 0), layer_ms, threads=1)
    assert refusals == {}
    forms = {m.site.name: {o.form for o in m.options[1:]} for m in menus}
    assert forms["conv_s"] == {SVD}
    assert forms["conv_t"] == {"cp", TUCKER2, SVD, SPATIAL_SVD}
    for menu in menus:
        assert menu.options[0].rank is None
        for option in menu.options[1:]:
            assert option.ms > 0 and 0 <= option.error <= 1
            exact = {"conv_t": TUCKER2, "conv_s": SVD, "conv_x": SPATIAL_SVD}[menu.site.name]
            if option.form == exact and option.rank in (channel_block(), (channel_block(), channel_block())):
                assert option.error < 1e-5
        labels = [o.label for o in menu.options[1:]]
        assert all(isinstance(label, int) for o, label in zip(menu.options[1:], labels) if o.form == "cp")
    only_cp, refusals = search.layer_menus(sites, make_solver(SolverSettings(workers=1, decomposition="cp"), 0),
                                           layer_ms, threads=1)
    assert refusals == {"conv_s": "1x1 conv: CP gains nothing"}
    assert all(o.form == "cp" for m in only_cp for o in m.options[1:])
    plan = search.to_plan({m.site.name: m.options[-1] for m in menus}, "chosen", "kept")
    assert all(layer.form == m.options[-1].form for m, layer in zip(menus, plan.layers.values()))


def test_without_data_other_forms_stay_only_near_exact_where_cp_applies(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    sites = three_form_sites()
    menus, _ = search.layer_menus(sites, make_solver(SolverSettings(workers=1), 0), {s.name: 1.0 for s in sites},
                                  threads=1)
    trimmed = {m.site.name: m for m in search.data_free_forms(menus)}
    for menu in menus:
        kept = trimmed[menu.site.name].options
        assert kept[0].rank is None
        has_cp = any(o.form == "cp" for o in menu.options[1:])
        expected = [o for o in menu.options[1:] if not has_cp or o.form == "cp" or o.error <= search.NEAR_EXACT]
        assert kept[1:] == expected
    b = channel_block()
    conv_t = {(o.form, o.rank) for o in trimmed["conv_t"].options[1:]}
    assert (TUCKER2, (b, b)) in conv_t  # exact, so it stays beside CP
    before = {m.site.name: len(m.options) for m in menus}
    assert len(trimmed["conv_t"].options) < before["conv_t"]  # its inexact non-CP options are gone
    assert len(trimmed["conv_s"].options) == before["conv_s"]  # 1x1: CP has no options, every form stays


def test_cli_decomposition_flag_and_config(tmp_path):
    onnx.save(three_form_model(), tmp_path / "in.onnx")
    (tmp_path / "onnx-cp.toml").write_text('decomposition = "svd"\nmax_error = 0.01\nworkers = 1\n')
    code = main(["optimize", str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--config",
                 str(tmp_path / "onnx-cp.toml"), "--report", str(tmp_path / "r.json"), "-q"])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["decomposition"] == "svd"
    forms = {row["name"]: row.get("form") for row in report["layers"]}
    assert forms["conv_s"] == "svd"
    with pytest.raises(SystemExit) as exit_info:
        main(["optimize", str(tmp_path / "in.onnx"), str(tmp_path / "o.onnx"), "--decomposition", "qr"])
    assert exit_info.value.code == 2
