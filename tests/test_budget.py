"""Ranks under a budget: the planner, the speed-up search, the accuracy gate (exit 3), INT8."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import model_factory
from onnx_cp import api, optimize
from onnx_cp.cli import main
from onnx_cp.data.datasets import Preprocessing
from onnx_cp.errors import BudgetError
from onnx_cp.graph.plan import CP
from onnx_cp.lowrank.forms import SPATIAL_SVD, SVD
from onnx_cp.measure.outputs import compare_on_data
from onnx_cp.ranks.forms import rank_label
from onnx_cp.ranks.search import (
    FINALISTS,
    KEPT_FOR_INT8,
    KEPT_FOR_INT8_WITHIN,
    SPEEDUP_MARGIN,
    LayerMenu,
    LossCurve,
    Option,
    QualityLimit,
    Timing,
    plan_for_time,
    plan_frontier,
    probe_planned_options,
    search_quality,
    search_speedup,
    with_sensitivities,
)
from onnx_cp.ranks.solve import Solved
from onnx_cp.settings import (
    AccuracyBudget,
    ErrorBudget,
    LayerSelection,
    MeasureSettings,
    OutputErrorBudget,
    QuantizeSettings,
    SpeedupTarget,
)


class _Site:
    def __init__(self, name: str) -> None:
        self.name = name


def menu(name: str, original_ms: float, *options: tuple[int, float, float]) -> LayerMenu:
    return LayerMenu(_Site(name), [Option(None, 0.0, original_ms)] + [Option(*o) for o in options])


MENUS = [
    menu("big", 10.0, (16, 0.5, 2.0), (32, 0.3, 4.0), (64, 0.1, 7.0)),
    menu("small", 2.0, (16, 0.6, 1.0)),
]


@pytest.mark.parametrize("budget", [13.0, 12.0, 9.0, 7.0, 5.0])
def test_plan_fits_the_budget_with_least_error(budget):
    plan = plan_for_time(MENUS, budget, rest_ms=2.0)
    total = 2.0 + sum(o.ms for o in plan.values())
    assert total <= budget
    # brute force over all combinations: the plan's error is the least that fits
    best = min(a.error + b.error for a in MENUS[0].options for b in MENUS[1].options
               if 2.0 + a.ms + b.ms <= budget)
    assert sum(o.error for o in plan.values()) == pytest.approx(best)


def test_plan_leaves_layers_alone_when_not_needed():
    plan = plan_for_time(MENUS, 12.0, rest_ms=2.0)
    assert plan["small"].rank is None  # the small layer does not pay for its error here


def test_plan_is_none_when_even_the_fastest_options_do_not_fit():
    assert plan_for_time(MENUS, 4.0, rest_ms=2.0) is None


def _speed_search(target, speedup_of_error, menus=MENUS, with_original=False):
    """search_speedup where a plan's measured speed-up is a function of its total kernel error."""
    timing = Timing(total_ms=14.0, layer_ms={"big": 10.0, "small": 2.0})
    errors = {(m.site.name, o.rank): o.error for m in menus for o in m.options}

    def build(plan):  # the "model" is the plan's total error
        return sum(errors[(n, lp.rank)] for n, lp in plan.layers.items())

    plan, model, trace = search_speedup(menus, timing, target, build, speedup_of_error, with_original=with_original)
    frontier = plan_frontier(menus, timing, timing.rest_ms(menus))
    return frontier, plan, model, trace


def _error_of(plan):
    return sum(o.error for o in plan.values())


def _never_twice(trace):
    """No plan measured twice, but for the chosen plan's confirmation."""
    ranks = [tuple(sorted(t["ranks"].items())) for t in trace if t["step"] != "confirm"]
    return len(ranks) == len(set(ranks))


def test_speedup_search_keeps_the_most_accurate_plan_measured_fast_enough():
    # measured speed-ups fall with the error's complement, unlike the predictions the frontier is ordered by
    frontier, plan, model, trace = _speed_search(1.5, lambda error: 1.0 + error)
    required = 1.5 * (1 + SPEEDUP_MARGIN)
    fast = [p for _, p in frontier if 1.0 + _error_of(p) >= required]
    assert model == pytest.approx(_error_of(fast[-1]))  # the last (most accurate) fast-enough plan
    assert _never_twice(trace)


def test_speedup_search_moves_to_faster_plans_when_the_predicted_one_falls_short():
    def speedup(error):
        return 0.7 * 14.0 / (2.0 + 10 * (1 - error))

    frontier, _, model, trace = _speed_search(2.0, speedup)
    assert trace[0]["measured"] < 2.0 and trace[1]["predicted"] > trace[0]["predicted"]
    assert speedup(model) >= 2.0 and _never_twice(trace)


def test_speedup_search_spends_measured_surplus_past_a_mispredicted_option():
    """Rank 48 of the big layer predicts 3 ms but takes 9 ms in the model, so every frontier plan
    near the target holds it and measures short; swaps from the fast plan find the best one."""
    menus = [menu("big", 10.0, (16, 0.5, 2.0), (32, 0.3, 4.0), (48, 0.2, 3.0), (64, 0.1, 7.0)),
             menu("small", 2.0, (16, 0.3, 1.0))]
    actual = {("big", 48): 9.0}
    times = {(m.site.name, o.rank): actual.get((m.site.name, o.rank), o.ms) for m in menus for o in m.options}
    errors = {(m.site.name, o.rank): o.error for m in menus for o in m.options}
    timing = Timing(total_ms=14.0, layer_ms={"big": 10.0, "small": 2.0})

    def build(plan):
        return {m.site.name: plan.layers[m.site.name].rank if m.site.name in plan.layers else None for m in menus}

    def speedup(ranks):
        return 14.0 / (2.0 + sum(times[(n, r)] for n, r in ranks.items()))

    plan, ranks, trace = search_speedup(menus, timing, 1.6, build, speedup)
    required = 1.6 * (1 + SPEEDUP_MARGIN)
    candidates = [(errors[("big", a.rank)] + errors[("small", b.rank)], a.rank, b.rank)
                  for a in menus[0].options for b in menus[1].options
                  if 14.0 / (2.0 + times[("big", a.rank)] + times[("small", b.rank)]) >= required]
    _, big, small = min(candidates)
    assert ranks == {"big": big, "small": small}
    assert any(t["step"] == "surplus" for t in trace) and _never_twice(trace)


def test_speedup_search_prefers_a_plan_with_the_margin_over_one_just_at_the_target():
    # the most accurate plan measures 2.01x for a 2x target: a second measurement may not meet it
    frontier, _, model, trace = _speed_search(2.0, lambda error: 2.01 if error < 0.35 else 2.5)
    assert model >= 0.35 and any(t["measured"] == 2.01 for t in trace)


def test_speedup_search_falls_back_to_a_plan_below_the_margin():
    _, _, model, trace = _speed_search(2.0, lambda error: 2.01)
    assert all(t["measured"] == 2.01 for t in trace) and model is not None


def test_speedup_search_with_the_original_keeps_it_when_it_measures_fast_enough():
    # INT8 makes every plan 3x faster: the model decomposing nothing is the most accurate that qualifies
    _, plan, model, trace = _speed_search(2.0, lambda error: 3.0, with_original=True)
    assert model == 0 and not plan.layers and set(plan.refusals) == {"big", "small"}
    def bisected_the_original(trace):
        return any(t["step"] == "bisect" and not any(t["ranks"].values()) for t in trace)

    assert bisected_the_original(trace) and _never_twice(trace)
    _, _, _, without = _speed_search(2.0, lambda error: 3.0)
    assert not bisected_the_original(without)  # the frontier alone holds plans that decompose something


def _accurate_plans_read(first: float, then: float):
    """Speed-ups by plan error: the accurate plans (error < 0.35) read `first` once, then `then`;
    the others always 2.5x."""
    readings: dict[float, int] = {}

    def noisy(error):
        readings[error] = readings.get(error, 0) + 1
        if error < 0.35:
            return first if readings[error] == 1 else then
        return 2.5

    return noisy


def test_speedup_search_confirms_its_choice_by_measuring_it_again():
    # the most accurate plan is lucky once (2.2x), then measures its true 1.8x: the next one is chosen
    _, _, model, trace = _speed_search(2.0, _accurate_plans_read(2.2, then=1.8))
    confirms = [t for t in trace if t["step"] == "confirm"]
    readings = [t["measured"] for t in confirms]
    assert model >= 0.35 and len(readings) >= 2 and readings[-1] == 2.5 and set(readings[:-1]) == {1.8}


def test_a_confirmation_within_the_noise_the_final_check_allows_keeps_the_accurate_plan():
    # 2.1x, then 1.96x again (within 3% of the 2x target): not traded for a faster, worse plan
    _, _, model, trace = _speed_search(2.0, _accurate_plans_read(2.1, then=1.96))
    confirms = [t["measured"] for t in trace if t["step"] == "confirm"]
    assert model < 0.35 and confirms == [1.96]


def test_speedup_search_raises_when_no_choice_measures_fast_enough_again():
    readings: dict[float, int] = {}

    def once(error):
        readings[error] = readings.get(error, 0) + 1
        return 2.5 if readings[error] == 1 else 1.5

    with pytest.raises(BudgetError, match="not when measured again"):
        _speed_search(2.0, once)


def test_speedup_search_raises_budget_error_when_out_of_reach():
    timing = Timing(total_ms=14.0, layer_ms={"big": 10.0, "small": 2.0})
    with pytest.raises(BudgetError, match="no ranks reach"):
        search_speedup(MENUS, timing, 10.0, lambda c: object(), lambda m: 1.0)


def big_conv_model() -> onnx.ModelProto:
    """A model dominated by a 9x9 conv (CP pays) with a small 3x3 conv (it does not)."""
    proto = model_factory.tiny_cnn(channels=16)
    return proto


def labelled_by_model(proto: onnx.ModelProto, n: int = 96, seed: int = 0):
    """Inputs labelled by the model itself: its accuracy is 100%, so drops are well defined."""
    x = np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)
    logits, = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    return x, logits.argmax(1).astype(np.int64)


def tiny_with_val(tmp_path):
    """The tiny classifier and tmp_path/val.npz, labelled by the model itself."""
    proto = model_factory.tiny_cnn()
    x, y = labelled_by_model(proto)
    np.savez(tmp_path / "val.npz", x=x, y=y)
    return proto, x, y


def test_target_speedup_end_to_end_meets_its_own_measurement(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    result = optimize(model_factory.tiny_cnn(), SpeedupTarget(1.2))
    attempts = result.report["search"]
    # trace entries name each option's form unless it is CP (see Option.label)
    chosen = {row["name"]: rank_label(row["form"], tuple(row["rank"]) if isinstance(row["rank"], list) else row["rank"])
              for row in result.report["layers"] if row["status"] == "decomposed"}
    # the search only returns a model it measured fast enough
    assert any(t["measured"] >= 1.2 and {k: v for k, v in t["ranks"].items() if v} == chosen for t in attempts)
    assert result.report["totals"]["decomposed"] >= 1
    assert (tmp_path / "cache" / "layer_latency.json").is_file()  # per-layer costs are cached


def test_max_accuracy_drop_stays_within_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    proto, x, y = tiny_with_val(tmp_path)
    result = optimize(proto, AccuracyBudget(20.0), measure=MeasureSettings(eval_data=str(tmp_path / "val.npz")))
    accuracy = result.report["accuracy"]
    assert accuracy["original"]["top1"] == 1.0
    best = [t for t in result.report["search"]["trace"] if t["accuracy_drop"] <= 20.0]
    assert best, result.report["search"]
    assert 100 * (1 - accuracy["decomposed"]["top1"]) <= 20.0 + 1e-9
    curves = result.report["search"]["sensitivity"]  # per layer and form, measured (error, points lost)
    assert curves and all(error > 0 and loss >= 0 for forms in curves.values() for points in forms.values()
                          for error, loss in points)


def zero_solver(*args, **kwargs):
    """A solver that returns useless factors, so every decomposed model is wrong."""
    return lambda jobs, quick=False: [Solved([np.zeros((n, r)) for n in k.shape], 1.0) for k, r in jobs]


def test_gate_exit_code_3_and_no_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(api, "make_solver", zero_solver)
    proto, x, y = tiny_with_val(tmp_path)
    onnx.save(proto, tmp_path / "in.onnx")
    code = main(["optimize", str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"),
                 "--max-accuracy-drop", "1", "--eval-data", str(tmp_path / "val.npz")])
    assert code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no decomposed model stays within 1 points" in err[0]
    assert not (tmp_path / "out.onnx").exists()


def test_accuracy_budget_needs_data(tmp_path, capsys):
    onnx.save(model_factory.tiny_cnn(), tmp_path / "in.onnx")
    assert main(["optimize", str(tmp_path / "in.onnx"), str(tmp_path / "o.onnx"), "--max-accuracy-drop", "1"]) == 2
    assert "needs data" in capsys.readouterr().err


def test_budgets_are_exclusive(tmp_path, capsys):
    onnx.save(model_factory.tiny_cnn(), tmp_path / "in.onnx")
    assert main(["optimize", str(tmp_path / "in.onnx"), str(tmp_path / "o.onnx"), "--rank", "4",
                 "--target-speedup", "2"]) == 2
    assert "one of" in capsys.readouterr().err


def test_int8_after_cp(tmp_path):
    proto = model_factory.tiny_cnn()
    x, y = labelled_by_model(proto, n=64)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    onnx.save(proto, tmp_path / "in.onnx")
    assert main(["optimize", str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--rank", "8",
                 "--quantize", "int8", "--eval-data", str(tmp_path / "data.npz"),
                 "--report", str(tmp_path / "r.json"), "-q"]) == 0
    out = onnx.load(tmp_path / "out.onnx")
    ops = {n.op_type for n in out.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops

    report = json.loads((tmp_path / "r.json").read_text())
    # both steps are reported: the CP model, then its INT8 version
    assert list(report["accuracy"]) == ["original", "decomposed", "decomposed+int8"]
    assert report["accuracy"]["decomposed+int8"]["n"] == 64


def _fake_int8_timing(monkeypatch, speedups):
    """_Int8Timing's measurements answering (float, INT8) speed-ups from `speedups(decomposed)`."""
    def speedup_of(self, model):
        decomposed = any(node.op_type == "Conv" and "/" in node.name for node in model.graph)
        self.measured.append(api._Int8Measured(model, *speedups(decomposed)))
        return max(self.measured[-1].float_speedup, self.measured[-1].int8_speedup)
    monkeypatch.setattr(api._Int8Timing, "speedup_of", speedup_of)
    monkeypatch.setattr(api._Int8Timing, "confirmed_speedup_of", speedup_of)


@pytest.mark.parametrize("faster", ["float", "int8", "decomposed int8"])
def test_a_speed_target_with_int8_writes_the_precision_measured_faster(tmp_path, monkeypatch, faster):
    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    proto, x, _ = tiny_with_val(tmp_path)
    if faster == "float":  # INT8 slows every plan down, as on charnet's CP chains
        _fake_int8_timing(monkeypatch, lambda decomposed: (1.5, 1.3) if decomposed else (1.0, 0.9))
    elif faster == "int8":  # INT8 alone meets the target: nothing need be decomposed, no menu solved
        _fake_int8_timing(monkeypatch, lambda decomposed: (1.5, 3.0) if decomposed else (1.0, 2.0))
        monkeypatch.setattr(api._Run, "menus", lambda *args: pytest.fail("menus solved"))
    else:  # INT8 alone falls short: the search goes on from its two measurements
        _fake_int8_timing(monkeypatch, lambda decomposed: (1.1, 3.0) if decomposed else (1.0, 1.15))
    result = optimize(proto, SpeedupTarget(1.2), quantize=QuantizeSettings(calibration_data=x))
    ops = {node.op_type for node in result.model.graph.node}
    trace = result.report["search"]
    assert all(step["precision"] == ("int8" if step["measured_int8"] > step["measured_float"] else "float")
               for step in trace)
    assert [step["attempt"] for step in trace] == list(range(1, len(trace) + 1))
    if faster == "float":
        assert "QuantizeLinear" not in ops and "skipped" in result.report["quantize"]
        assert result.report["totals"]["decomposed"] >= 1
        assert any("not quantized" in warning for warning in result.report["warnings"])
    elif faster == "int8":
        assert "QuantizeLinear" in ops and result.report["quantize"]["weight_bits"] in (7, 8)
        assert result.report["totals"]["decomposed"] == 0
        assert [step["step"] for step in trace] == ["int8 alone", "confirm"]
        assert all(row["reason"] == KEPT_FOR_INT8 for row in result.report["layers"])
    else:
        assert [step["step"] for step in trace[:1]] == ["int8 alone"] and len(trace) > 2
        assert "QuantizeLinear" in ops and result.report["totals"]["decomposed"] >= 1


def test_the_speed_search_confirms_int8_as_the_check_will_quantize(tmp_path, monkeypatch):
    """The search's steps time a quick quantization; its confirmations time the checked one, whose
    float layers are where the written model's check starts (YOLOv8n at 2x: timed 2.06x in the
    search, written at 1.58x)."""
    from onnx_cp import measure
    from onnx_cp.quantize import int8_scheme

    real = measure.benchmark_latency

    class Timed:  # float 1.5x; INT8 3x when quickly quantized, 2x when checked; nothing faster undecomposed
        def __init__(self, models):
            graph = models[1].graph
            self.decomposed = any("/" in node.name for node in (graph.node if isinstance(graph, onnx.GraphProto)
                                                                 else graph))
            self.checked = len(models) > 2 and int8_scheme(models[2]) is not None

        def fast_speedup(self, index):
            return {1: 1.5, 2: 2.0 if self.checked else 3.0}[index] if self.decomposed else 1.0

    started_from = []

    def quantize(model, data, settings, keep_float=frozenset(), **kw):
        started_from.append(keep_float)
        return real_quantize(model, data, settings, keep_float, **kw)

    real_quantize = api._quantize
    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(measure, "benchmark_latency",
                        lambda models, **kw: real(models, **kw) if len(models) == 1 else Timed(models))
    monkeypatch.setattr(api, "_quantize", quantize)
    proto, x, _ = tiny_with_val(tmp_path)
    result = optimize(proto, SpeedupTarget(1.2), quantize=QuantizeSettings(calibration_data=x),
                      measure=MeasureSettings(latency=False))
    decomposed = [step for step in result.report["search"] if any(step["ranks"].values())]
    assert {step["measured_int8"] for step in decomposed if step["step"] != "confirm"} == {3.0}
    confirmed = [step for step in decomposed if step["step"] == "confirm"]
    assert confirmed and all(step["measured_int8"] == 2.0 and "float_units" in step for step in confirmed)
    assert result.report["quantize"]["weight_bits"] in (7, 8)
    assert started_from and started_from[-1] <= set(int8_scheme(result.model).float_units)


def test_a_speed_target_writes_its_plan_in_float_when_int8_breaks_it(tmp_path, monkeypatch):
    from onnx_cp.errors import OnnxCpError

    def broken(*args):
        raise OnnxCpError("INT8 broke the model on 8 calibration samples (3 node(s) kept float): y moved by 0.9; "
                          "nothing written (a larger --int8-max-error accepts more)")

    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    _fake_int8_timing(monkeypatch, lambda decomposed: (1.3, 3.0) if decomposed else (1.0, 1.1))
    monkeypatch.setattr(api, "_quantize", broken)
    proto, x, _ = tiny_with_val(tmp_path)
    result = optimize(proto, SpeedupTarget(1.2), quantize=QuantizeSettings(calibration_data=x))
    assert not any(node.op_type == "QuantizeLinear" for node in result.model.graph.node)
    assert result.report["totals"]["decomposed"] >= 1
    skipped = result.report["quantize"]["skipped"]
    assert "y moved by 0.9" in skipped and "written in float" in skipped and "nothing written" not in skipped
    assert any(warning.startswith("not quantized: INT8 broke") for warning in result.report["warnings"])
    with pytest.raises(OnnxCpError, match="nothing written"):  # INT8 asked for with explicit ranks stays an error
        optimize(proto, 8, quantize=QuantizeSettings(calibration_data=x))


def test_int8_timing_quantizes_what_quantize_int8_does():
    from onnx_cp.quantize import quantize_for_timing, quantize_int8

    proto = model_factory.tiny_cnn()
    x, _ = labelled_by_model(proto, n=16)
    timed, written = quantize_for_timing(proto, x[:8]), quantize_int8(proto, x)
    def quantized_ops(model):
        return sorted(n.op_type for n in model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    assert quantized_ops(timed) == quantized_ops(written) and quantized_ops(timed)


def test_max_output_error_stays_within_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    proto = model_factory.tiny_cnn()
    x, _ = labelled_by_model(proto)
    np.savez(tmp_path / "samples.npz", x=x)  # no labels: outputs are compared
    result = optimize(proto, OutputErrorBudget(0.5), measure=MeasureSettings(eval_data=str(tmp_path / "samples.npz")))
    assert any(t["output_error"] <= 0.5 for t in result.report["search"]["trace"])
    assert result.report["totals"]["decomposed"] >= 1
    measured = compare_on_data(result.model, proto, str(tmp_path / "samples.npz"))
    assert measured.worst_group_error <= 0.5


def _zero_weights(model):
    """A copy of `model` whose Conv and Gemm weights are all 0: its outputs are far from the original's."""
    import onnx_ir as ir

    broken = model.clone()
    for node in broken.graph:
        if node.op_type in ("Conv", "Gemm") and node.inputs[1].const_value is not None:
            weight = node.inputs[1].const_value.numpy()
            node.inputs[1].const_value = ir.tensor(np.zeros_like(weight), name=node.inputs[1].name)
    return broken


@pytest.mark.parametrize("int8_breaks, alone_faster", [(False, False), (False, True), (True, False)])
def test_a_quality_bound_with_int8_judges_the_model_written(tmp_path, monkeypatch, int8_breaks, alone_faster):
    """Each plan is quantized in the search: INT8 is written only within the bound (before, the plan was
    chosen in float and quantized after: charnet within 0.3 points lost 3.15 in INT8, exit 0), and
    INT8 alone replaces the plan found when it is within the bound and faster."""
    from onnx_cp.quantize import int8_scheme

    def speed(model):  # float 1x, decomposed 1.5x; INT8 2x decomposed, alone 2.5x or 1.2x
        decomposed = any("/" in node.name for node in model.graph)
        if any(node.op_type == "QuantizeLinear" for node in model.graph):
            return 2.0 if decomposed else 2.5 if alone_faster else 1.2
        return 1.5 if decomposed else 1.0

    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(api._Run, "speedups_of", lambda self, models: [speed(m) for m in models])
    if int8_breaks:  # INT8 of every plan is its zero-weight copy: far over any bound
        quantize = api._quantize
        monkeypatch.setattr(api, "_quantize", lambda model, *rest, **kw: quantize(_zero_weights(model), *rest, **kw))
    proto = model_factory.tiny_cnn()
    x, _ = labelled_by_model(proto)
    np.savez(tmp_path / "samples.npz", x=x)
    onnx.save(proto, tmp_path / "in.onnx")
    assert main(["optimize", str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--max-output-error", "0.5",
                 "--eval-data", str(tmp_path / "samples.npz"), "--quantize", "int8",
                 "--report", str(tmp_path / "r.json"), "-q"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    written = onnx.load(tmp_path / "out.onnx")
    assert compare_on_data(written, proto, str(tmp_path / "samples.npz")).worst_group_error <= 0.5
    trace = report["search"]["trace"]
    steps = [step for step in trace if step["output_error"] <= 0.5 and step.get("step") != "int8 alone"]
    assert steps and all("precision" in step for step in trace)
    quantized = any(node.op_type == "QuantizeLinear" for node in written.graph.node)
    if int8_breaks:
        assert not quantized and "over the 0.5 allowed" in report["quantize"]["skipped"]
        assert all(step["precision"]["written"] == "float" and step["precision"]["output_error_int8"] > 0.5
                   for step in steps)
        return
    assert quantized and report["quantize"]["weight_bits"] in (7, 8)
    assert int8_scheme(written).samples == api.INT8_CHECK_SAMPLES  # the search's quantization is written
    assert all(step["precision"]["written"] == "int8" for step in steps)
    assert trace[-1]["step"] == "int8 alone" and trace[-1]["output_error"] <= 0.5
    if alone_faster:
        assert report["totals"]["decomposed"] == 0
        assert KEPT_FOR_INT8_WITHIN in {row["reason"] for row in report["layers"]}
    else:
        assert report["totals"]["decomposed"] >= 1
        assert list(report["accuracy"]) == ["original", "decomposed", "decomposed+int8"]


def test_output_error_gate_exit_code_3_and_no_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(api, "make_solver", zero_solver)
    proto = model_factory.tiny_cnn()
    x, _ = labelled_by_model(proto)
    np.savez(tmp_path / "samples.npz", x=x)
    onnx.save(proto, tmp_path / "in.onnx")
    code = main(["optimize", str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"),
                 "--max-output-error", "0.05", "--eval-data", str(tmp_path / "samples.npz")])
    assert code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "within 0.05 output error" in err[0]
    assert not (tmp_path / "out.onnx").exists()


def test_output_error_budget_needs_sample_inputs(tmp_path, capsys):
    onnx.save(model_factory.tiny_cnn(), tmp_path / "in.onnx")
    assert main(["optimize", str(tmp_path / "in.onnx"), str(tmp_path / "o.onnx"), "--max-output-error", "0.1"]) == 2
    assert "--max-output-error" in capsys.readouterr().err


def _quality_search(drop_of_error):
    """search_quality on MENUS where a plan's accuracy drop is a function of its total error."""
    timing = Timing(total_ms=14.0, layer_ms={"big": 10.0, "small": 2.0})
    measured = []

    errors = {(m.site.name, o.rank): o.error for m in MENUS for o in m.options}

    def tune_and_score(plan):  # the "model" built is the graph plan itself
        measured.append(tuple(sorted((n, lp.rank) for n, lp in plan.layers.items())))
        return drop_of_error(sum(errors[(n, lp.rank)] for n, lp in plan.layers.items())), plan

    limit = QualityLimit("accuracy_drop", 1.0, "points of accuracy")
    result = search_quality(MENUS, timing, limit, build=lambda plan: plan, tune_and_score=tune_and_score)
    return timing, result, measured


def test_quality_search_finds_the_fastest_plan_within_the_limit_measuring_each_plan_once():
    timing, (plan, _, trace, _), measured = _quality_search(lambda error: 10 * error)
    frontier = plan_frontier(MENUS, timing, timing.rest_ms(MENUS))
    speeds = [s for s, _ in frontier]
    assert speeds == sorted(speeds, reverse=True) and len(frontier) > 2
    passing = [(s, p) for s, p in frontier if 10 * sum(o.error for o in p.values()) <= 1.0]
    assert {n: lp.rank for n, lp in plan.layers.items()} == \
        {n: o.rank for n, o in passing[0][1].items() if o.rank is not None}
    assert len(measured) == len(set(measured))


def test_quality_search_reaches_the_most_accurate_plan_when_every_faster_one_fails():
    timing, (plan, _, _, _), measured = _quality_search(lambda error: 0.0 if error <= 0.1 + 1e-9 else 50.0)
    frontier = plan_frontier(MENUS, timing, timing.rest_ms(MENUS))
    most_accurate = frontier[-1][1]
    assert sum(o.error for o in most_accurate.values()) == pytest.approx(0.1)
    assert measured[-1] == tuple(sorted((n, o.rank) for n, o in most_accurate.items() if o.rank is not None))
    assert len(measured) == len(set(measured))


def test_a_quality_search_measures_its_finalists_together_and_keeps_the_fastest_measured():
    """Only the plan predicted fastest fails, so the bisection accepts several on its way back; the
    ones predicted fastest are measured in one run, where the prediction's order is reversed."""
    timing = Timing(total_ms=14.0, layer_ms={"big": 10.0, "small": 2.0})
    limit = QualityLimit("output_error", 1.0, "output error")
    frontier = plan_frontier(MENUS, timing, timing.rest_ms(MENUS))
    fastest = {n: o.rank for n, o in frontier[0][1].items() if o.rank is not None}
    runs = []

    def score(plan):
        return (2.0 if {n: lp.rank for n, lp in plan.layers.items()} == fastest else 0.5), plan

    def measure_speedups(plans):  # measured order: the reverse of the predicted one
        runs.append(plans)
        return [1.0 + k for k in range(len(plans))]

    plan, _, trace, _ = search_quality(MENUS, timing, limit, lambda plan: plan, score,
                                       measure_speedups=measure_speedups)
    assert len(runs) == 1 and 1 < len(runs[0]) <= FINALISTS
    chosen = runs[0][-1]
    assert plan.layers.keys() == chosen.layers.keys()
    assert all("fastest measured" in lp.note for lp in plan.layers.values())
    measured = [t for t in trace if "measured_speedup" in t]
    assert len(measured) == len(runs[0])
    best = max(measured, key=lambda t: t["measured_speedup"])
    assert best["predicted_speedup"] == min(t["predicted_speedup"] for t in measured)
    assert {n: lp.rank for n, lp in plan.layers.items()} == \
        {n: label for n, label in best["ranks"].items() if label is not None}


@pytest.mark.parametrize("cp_ms, tried", [((3.3, 1.1), True), ((4.0, 1.5), False)])
def test_a_quality_search_measures_each_forms_own_plan_beside_the_mixed_ones(cp_ms, tried):
    """Spatial SVD is predicted faster and more accurate than CP on both layers, so every plan of the
    whole menus' frontier is SVD; CP alone's plan within the limit is measured beside them, and
    chosen when it measures fastest (predictions can rank forms wrongly), unless it is predicted
    more than FORM_MISRANKING slower (here 20%)."""
    def two_forms(name, original_ms, cp, svd):
        return LayerMenu(_Site(name), [Option(None, 0.0, original_ms), Option(*cp, form=CP),
                                       Option(*svd, form=SPATIAL_SVD)])

    menus = [two_forms("big", 10.0, (16, 0.5, cp_ms[0]), (16, 0.3, 3.0)),
             two_forms("small", 2.0, (16, 0.5, cp_ms[1]), (8, 0.3, 1.0))]
    timing = Timing(total_ms=14.0, layer_ms={"big": 10.0, "small": 2.0})
    limit = QualityLimit("output_error", 1.0, "output error")
    runs = []

    def score(plan):
        return sum({CP: 0.5, SPATIAL_SVD: 0.3}[lp.form] for lp in plan.layers.values()), plan

    def measure_speedups(plans):  # the plan of CP alone measures fastest
        runs.append([{lp.form for lp in p.layers.values()} for p in plans])
        return [3.0 if forms == {CP} else 2.0 for forms in runs[-1]]

    plan, _, trace, _ = search_quality(menus, timing, limit, lambda plan: plan, score,
                                       measure_speedups=measure_speedups)
    assert all(o.form == SPATIAL_SVD for _, p in plan_frontier(menus, timing, 2.0) for o in p.values()
               if o.rank is not None)
    assert ({CP} in sum(runs, [])) == tried
    assert {lp.form for lp in plan.layers.values()} == ({CP} if tried else {SPATIAL_SVD})
    assert set(plan.layers) == {"big", "small"}
    assert any(t.get("form") == CP and t["measured_speedup"] == 3.0 for t in trace) == tried


def test_quality_search_refuses_when_no_plan_fits():
    with pytest.raises(BudgetError, match="smallest seen: 5"):
        _quality_search(lambda error: 5.0 + error)


def test_speedup_menus_use_quick_estimates_and_only_the_chosen_plan_is_solved_in_full(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def recording_solver(settings, seed):
        real = api_make_solver(settings, seed)

        def solve(jobs, quick=False):
            calls.append((quick, [rank for _, rank in jobs]))
            return real(jobs, quick=quick)
        return solve

    api_make_solver = api.make_solver
    monkeypatch.setattr(api, "make_solver", recording_solver)
    result = optimize(model_factory.tiny_cnn(), SpeedupTarget(1.2))
    full = [ranks for quick, ranks in calls if not quick and ranks]
    assert calls[0][0] is True  # the menus
    chosen = sorted(row["rank"] for row in result.report["layers"] if row["status"] == "decomposed")
    assert len(full) == 1 and sorted(full[0]) == chosen  # one full solve, of the chosen ranks only


def test_a_speed_target_alone_warns_about_what_it_cost():
    moved = {"worst_group_error": 0.8}
    (warning,) = api._unbounded_cost(SpeedupTarget(2.0), None, None, moved)
    assert "0.80" in warning and "--max-output-error" in warning
    assert api._unbounded_cost(SpeedupTarget(2.0), None, "val.npz", moved) == []  # accuracy is measured
    assert api._unbounded_cost(SpeedupTarget(2.0), None, None, {"worst_group_error": 0.05}) == []
    assert api._unbounded_cost(OutputErrorBudget(0.5), None, None, moved) == []  # bounded by its budget


def test_a_speed_target_bounded_by_accuracy_fails_with_exit_3_when_the_bound_is_not_met(tmp_path, monkeypatch,
                                                                                         capsys):
    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(api, "make_solver", zero_solver)  # every decomposed model is wrong
    monkeypatch.setattr(api._Run, "speedup_of", lambda self, model: 1.25)
    proto, x, y = tiny_with_val(tmp_path)
    onnx.save(proto, tmp_path / "in.onnx")
    code = main(["optimize", str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--target-speedup", "1.2",
                 "--max-accuracy-drop", "1", "--eval-data", str(tmp_path / "val.npz"),
                 "--report", str(tmp_path / "r.json"), "--report-dir", str(tmp_path / "rd")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3, err
    assert len(err) == 1 and "accuracy drop" in err[0] and "at most 1 allowed" in err[0]
    assert not (tmp_path / "out.onnx").exists()
    # the report of the refused run says what was chosen and measured
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["output"] is None and "at most 1 allowed" in report["target"]["failed"]
    assert any(row["status"] == "decomposed" for row in report["layers"]) and "accuracy" in report
    assert json.loads((tmp_path / "rd" / "report.json").read_text()) == report  # the folder too
    assert "accuracy" in (tmp_path / "rd" / "report.md").read_text().lower()


def test_a_speed_target_bounded_by_accuracy_reports_both_when_met(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(api._Run, "speedup_of", lambda self, model: 1.25)  # speed is a benchmark's business
    proto, x, y = tiny_with_val(tmp_path)
    result = optimize(proto, SpeedupTarget(1.2, within=AccuracyBudget(100.0)),
                      measure=MeasureSettings(eval_data=str(tmp_path / "val.npz")))
    target = result.report["target"]
    assert target["limit"] == 100.0 and 0.0 <= target["accuracy_drop"] <= 100.0
    drop = 100 * (result.report["accuracy"]["original"]["top1"] - result.report["accuracy"]["decomposed"]["top1"])
    assert target["accuracy_drop"] == pytest.approx(drop, abs=1e-3)  # the final model is what was checked
    assert target["measured_speedup"] == 1.25
    assert result.report["settings"]["max_accuracy_drop"] == 100.0


def test_a_speed_target_with_a_bound_needs_data_and_still_refuses_a_rank(tmp_path, capsys):
    onnx.save(model_factory.tiny_cnn(), tmp_path / "in.onnx")
    args = ["optimize", str(tmp_path / "in.onnx"), str(tmp_path / "o.onnx"), "--target-speedup", "2"]
    assert main(args + ["--max-accuracy-drop", "1"]) == 2
    assert "needs data" in capsys.readouterr().err
    assert main(args + ["--max-accuracy-drop", "1", "--max-output-error", "0.1"]) == 2
    assert "one of" in capsys.readouterr().err
    with pytest.raises(Exception, match="AccuracyBudget or OutputErrorBudget"):
        SpeedupTarget(2.0, within=0.5)


def test_a_speed_target_alone_warns_about_the_top1_it_cost():
    accuracy = {"original": {"top1": 0.96}, "decomposed": {"top1": 0.90}, "finetuned": {"top1": 0.93}}
    (warning,) = api._speed_cost(SpeedupTarget(8.5), accuracy)
    assert "3.00 points" in warning and "--max-accuracy-drop" in warning
    assert api._speed_cost(SpeedupTarget(8.5, within=AccuracyBudget(5.0)), accuracy) == []
    assert api._speed_cost(SpeedupTarget(8.5), {"original": {"top1": 0.96}, "finetuned": {"top1": 0.955}}) == []
    assert api._speed_cost(SpeedupTarget(8.5), {"original": {"top1": None}, "finetuned": {"top1": None}}) == []


def test_a_speed_target_alone_met_by_int8_says_what_the_int8_check_saw_the_task_lose():
    check = {"samples": 256, "agreement": {"387: strings": 0.926, "387: other": 0.995}}
    (warning,) = api._int8_cost(SpeedupTarget(1.3), {"kind": "int8", "check": check})
    assert "92.6% of 387: strings" in warning and "256 calibration samples" in warning
    assert api._int8_cost(SpeedupTarget(1.3, within=OutputErrorBudget(0.1)), {"check": check}) == []
    assert api._int8_cost(SpeedupTarget(1.3), {"kind": "int8", "skipped": "slower"}) == []
    assert api._int8_cost(SpeedupTarget(1.3), None) == []


def test_a_bounded_speed_target_fails_when_the_final_model_is_measured_short(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    real_search = api.search.search_speedup
    monkeypatch.setattr(api.search, "search_speedup",  # every plan the search measures is fast enough
                        lambda menus, timing, target, build, _, **kw: real_search(menus, timing, target, build,
                                                                                  lambda model: 1.25, **kw))
    speeds = iter([1.1, 1.12])  # the final model, measured twice
    monkeypatch.setattr(api._Run, "speedup_of", lambda self, model: next(speeds))
    proto, x, y = tiny_with_val(tmp_path)
    with pytest.raises(BudgetError, match="final model measured 1.12x, short of the 1.2x target"):
        optimize(proto, SpeedupTarget(1.2, within=AccuracyBudget(100.0)),
                 measure=MeasureSettings(eval_data=str(tmp_path / "val.npz")))


def test_sensitivities_weigh_layers_by_measured_loss_per_kernel_error_with_a_relative_floor():
    menus = [menu("big", 10.0, (16, 0.5, 2.0), (32, 0.4, 4.0), (64, 0.1, 7.0)),
             menu("small", 2.0, (16, 0.2, 1.0), (32, 0.1, 1.5))]
    losses = {"big": 0.3, "small": 0.0}  # the small layer costs nothing measurable

    weighted = with_sensitivities(menus, build=lambda plan: next(iter(plan.layers)), drop_of=losses.get)
    big, small = weighted
    assert big.curves["cp"].points == ((0.4, 0.3),)  # the middle option of the big layer: rank 32
    assert small.curves["cp"].points == ((0.2, pytest.approx(0.3 * 0.01)),)  # its loss floored at 1% of the largest
    assert big.cost(big.options[1]) == pytest.approx(0.3 / 0.4 * 0.5)  # one point: a line through the origin


def test_a_loss_curve_interpolates_its_points_keeps_rising_and_extends_its_last_slope():
    curve = LossCurve().with_point(0.2, 0.1).with_point(0.4, 0.5).with_point(0.3, 0.05)
    assert curve.points == ((0.2, 0.1), (0.3, 0.1), (0.4, 0.5))  # a loss never falls as the error grows
    assert curve.at(0.1) == pytest.approx(0.05)  # from the origin
    assert curve.at(0.35) == pytest.approx(0.3)
    assert curve.at(0.6) == pytest.approx(0.5 + 0.2 * 4.0)  # beyond: the last segment's slope
    assert LossCurve().at(0.7) == 0.7  # nothing measured: the error itself


def test_the_plan_for_a_target_is_measured_where_its_curves_extrapolate_and_moves_where_they_were_wrong():
    """A classifier whose loss grows much faster than its error past the probed middle option (as a
    CRNN's decoded strings do) looks cheap to cut deep on one point; measured there, the plan cuts
    the conv instead."""
    menus = [menu("gemm", 10.0, (16, 0.3, 1.0), (64, 0.2, 3.0), (128, 0.1, 6.0)),
             menu("conv", 10.0, (16, 0.4, 4.0), (32, 0.2, 7.0))]
    true_loss = {("gemm", 16): 0.9, ("gemm", 64): 0.4, ("gemm", 128): 0.2, ("conv", 16): 0.8, ("conv", 32): 0.4}

    def drop_of(plan):
        ((name, layer),) = plan.layers.items()
        return true_loss[(name, layer.rank)]

    def ranks(plan):
        return {n: o.rank for n, o in plan.items()}

    weighted = with_sensitivities(menus, build=lambda plan: plan, drop_of=drop_of)  # gemm at 64, conv at 16
    timing = Timing(total_ms=22.0, layer_ms={"gemm": 10.0, "conv": 10.0})
    speedup = 22.0 / 14.0  # a budget of 14 ms: 12 ms for the two layers
    assert ranks(plan_for_time(weighted, 14.0, rest_ms=2.0)) == {"gemm": 16, "conv": None}  # predicted 0.6
    probed = probe_planned_options(weighted, timing, speedup, lambda plan: plan, drop_of, seconds=60)
    gemm, conv = probed
    assert gemm.curves["cp"].points == ((0.2, 0.4), (0.3, 0.9))  # the planned deep cut, measured
    assert conv.curves == weighted[1].curves  # its planned option lies within what was measured
    assert ranks(plan_for_time(probed, 14.0, rest_ms=2.0)) == {"gemm": 64, "conv": 32}  # truly 0.8, not 0.9
    assert probe_planned_options(weighted, timing, speedup, lambda plan: plan, drop_of, seconds=0) == weighted


def test_a_speed_target_with_sample_data_weighs_layers_on_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    proto, x, y = tiny_with_val(tmp_path)
    result = optimize(proto, SpeedupTarget(1.05), measure=MeasureSettings(eval_data=str(tmp_path / "val.npz")))
    assert result.report["data"]["sensitivity"]["samples"] == len(x)
    assert result.report["search"] and result.report["target"]["measured_speedup"] >= 1.0


def test_sensitivities_are_measured_per_form_and_steer_the_plan_away_from_a_damaging_one():
    """SVD options here have the smaller kernel error, but each unit of it costs ten times more in
    the outputs: the weighted plan takes CP."""
    options = [Option(16, 0.50, 2.0), Option(32, 0.40, 3.0),
               Option(16, 0.45, 2.0, form=SVD), Option(32, 0.35, 3.0, form=SVD)]
    menus = [LayerMenu(_Site("big"), [Option(None, 0.0, 10.0)] + options)]
    loss_per_error = {"cp": 1.0, SVD: 10.0}
    errors = {(o.form, o.rank): o.error for o in options}

    def drop_of(plan):
        (layer,) = plan.layers.values()
        return loss_per_error[layer.form] * errors[(layer.form, layer.rank)]

    (weighted,) = with_sensitivities(menus, build=lambda plan: plan, drop_of=drop_of)
    assert {form: curve.at(1.0) for form, curve in weighted.curves.items()} == pytest.approx(loss_per_error)
    plan = plan_for_time([weighted], budget_ms=5.0, rest_ms=2.0)
    assert plan["big"].form == "cp" and plan["big"].rank == 32
    assert plan_for_time(menus, budget_ms=5.0, rest_ms=2.0)["big"].form == SVD  # unweighted: kernel error
    (first_only,) = with_sensitivities(menus, build=lambda plan: plan, drop_of=drop_of, more_forms_seconds=0)
    assert list(first_only.curves) == ["cp"]  # no time for the other forms
    assert first_only.cost(options[2]) == pytest.approx(1.0 * 0.45)  # SVD at CP's weight


def test_symbolic_height_and_width_are_taken_from_the_run_data(tmp_path):
    """A detector exported with symbolic H and W is timed, and its ranks chosen, at the data's size."""
    kernel = model_factory.low_rank_kernel(16, 4, 3, 3, rank=16)
    proto = model_factory.conv_model(kernel, input_shape=("N", 4, "H", "W"))
    np.savez(tmp_path / "x.npz", x=np.zeros((8, 4, 20, 28), np.float32))
    data = api._Data(Preprocessing())
    shape = data.sample_shape(str(tmp_path / "x.npz"))
    assert shape == (4, 20, 28) and data.used == {}  # peeking at one sample is not a stage's use

    def shapes(sample_shape, **measure):
        run = api._Run(proto, LayerSelection(), MeasureSettings(**measure), None, 0, data, sample_shape=sample_shape)
        return run.shapes["x"]

    assert shapes(shape) == [1, 4, 20, 28]
    assert shapes(shape, input_shapes={"x": [1, 4, 12, 12]}) == [1, 4, 12, 12]  # a given shape wins
    assert shapes(None)[2:] != [20, 28]  # no data: the defaults


def test_int8_alone_takes_symbolic_dims_from_its_calibration_data():
    kernel = model_factory.low_rank_kernel(16, 4, 3, 3, rank=16)
    proto = model_factory.conv_model(kernel, input_shape=("N", 4, "H", "W"))
    x = np.random.default_rng(0).standard_normal((16, 4, 20, 28)).astype(np.float32)
    result = optimize(proto, layers=LayerSelection(include="^$"), quantize=QuantizeSettings(calibration_data=x),
                      measure=MeasureSettings(latency=False))
    assert result.report["input_shapes"]["x"] == [1, 4, 20, 28]
    assert result.report["quantize"]["kind"] == "int8" and "skipped" not in result.report["quantize"]


def test_eval_data_for_a_model_without_class_scores_reports_output_fidelity_per_stage(tmp_path, capsys):
    """A detector or a map has no top-1: its stages are compared with the input model's outputs on
    the evaluation data instead (before, the run failed after the search: "expected class scores")."""
    kernel = model_factory.low_rank_kernel(16, 8, 3, 3, rank=4)
    proto = model_factory.conv_model(kernel, input_shape=("N", 8, 12, 12))
    onnx.save(proto, tmp_path / "in.onnx")
    x = np.random.default_rng(0).standard_normal((24, 8, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    result = optimize(proto, 4, measure=MeasureSettings(eval_data=str(tmp_path / "x.npz")))
    assert "accuracy" not in result.report
    decomposed = result.report["fidelity"]["decomposed"]
    assert decomposed["samples"] == 24
    assert decomposed["worst_group_error"] == pytest.approx(compare_on_data(result.model, proto, x).worst_group_error)
    assert decomposed["worst_group_error"] < 1e-3  # rank 4 is this kernel's exact rank
    assert main(["optimize", str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--rank", "4",
                 "--eval-data", str(tmp_path / "x.npz")]) == 0
    assert "decomposed outputs vs the input on 24 samples: worst channel group" in capsys.readouterr().out


def test_a_quality_search_measures_its_curves_at_the_next_faster_plan_and_finds_the_plan_they_hid():
    """Priced on the one point probed per layer, a deep cut of the classifier looks cheap and takes
    the frontier's slot at 13 ms, where it fails; the bisection settles at 15 ms. Measured where
    that plan goes, the curve gives the slot to a plan that passes, at 12 ms."""
    menus = [menu("gemm", 10.0, (16, 0.3, 1.0), (64, 0.2, 3.0), (128, 0.1, 6.0), (256, 0.05, 8.0)),
             menu("conv", 10.0, (16, 0.4, 4.0), (32, 0.2, 7.0))]
    true_loss = {("gemm", 16): 0.9, ("gemm", 64): 0.4, ("gemm", 128): 0.2, ("gemm", 256): 0.1,
                 ("conv", 16): 0.8, ("conv", 32): 0.3}

    def loss(plan) -> float:  # additive over the layers
        return sum(true_loss[(name, layer.rank)] for name, layer in plan.layers.items())

    weighted = with_sensitivities(menus, build=lambda plan: plan, drop_of=loss)  # gemm at 64, conv at 16
    timing = Timing(total_ms=22.0, layer_ms={"gemm": 10.0, "conv": 10.0})
    limit = QualityLimit("output_error", 0.75, "output error")
    probes = []

    def probe(menus, speedup):
        probes.append(speedup)
        return probe_planned_options(menus, timing, speedup, lambda plan: plan, loss, seconds=60)

    def ranks(plan) -> dict:
        return {name: layer.rank for name, layer in plan.layers.items()}

    without = search_quality(weighted, timing, limit, lambda plan: plan, lambda plan: (loss(plan), plan))
    plan, _, trace, curves = search_quality(weighted, timing, limit, lambda plan: plan,
                                            lambda plan: (loss(plan), plan), probe)
    assert ranks(without[0]) == {"gemm": 64}  # 15 ms
    assert ranks(plan) == {"gemm": 64, "conv": 32}  # 12 ms, true loss 0.7
    assert probes[0] == pytest.approx(22.0 / 13.0)
    assert curves[0].curves["cp"].points[-1] == (0.3, 0.9)  # the deep cut, measured
    assert len({tuple(sorted(t["ranks"].items(), key=str)) for t in trace}) == len(trace)  # none measured twice


def test_the_error_budget_leaves_a_slower_chain(monkeypatch):
    """A layer the kernel-error budget takes is left when its chain measures slower than the layer
    (timings faked: tests do not measure speed); explicit ranks are not timed."""
    model = model_factory.tiny_cnn()
    timed = []

    def slower_conv2(site, form, rank, threads=1):
        timed.append(site.name)
        return 2.5 if site.name == "conv2" else 0.5

    monkeypatch.setattr(api, "time_ratio", slower_conv2)
    rows = {r["name"]: r for r in optimize(model, ErrorBudget(0.9)).report["layers"]}
    assert rows["conv2"]["status"] == "skipped"
    assert "chain at rank" in rows["conv2"]["reason"] and "measured 2.50x the layer's time" in rows["conv2"]["reason"]
    assert "conv2" in timed and any(r["status"] == "decomposed" for r in rows.values())

    timed.clear()
    explicit = {r["name"]: r for r in optimize(model, 4).report["layers"]}
    assert explicit["conv2"]["status"] == "decomposed" and not timed


def test_a_chains_time_ratio_is_measured_and_cached(monkeypatch, tmp_path):
    from onnx_cp.graph import find_conv_sites
    from onnx_cp.ranks.latency_model import time_ratio

    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    site = next(s for s in find_conv_sites(api.model_io.to_ir(model_factory.tiny_cnn())) if s.name == "conv2")
    ratio = time_ratio(site, CP, 4)
    assert ratio > 0 and (tmp_path / "cache" / "layer_latency.json").exists()
    assert time_ratio(site, CP, 4) == ratio  # from the cache
