"""The Python API that the CLI is a thin layer over: `optimize()` runs the pipeline

    load -> find Conv sites -> plan ranks (a policy) -> splice chains (graph pass) -> verify
         -> [reconstruct + fine-tune] -> [INT8] -> measure -> OptimizeResult(model, report)
"""

from __future__ import annotations

import functools
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import onnx
import onnx_ir as ir

from onnx_cp.data.datasets import Preprocessing
from onnx_cp.errors import BudgetError, OnnxCpError, UsageError
from onnx_cp.graph import CPConvPass, LayerOutcome, Plan, filter_sites, find_conv_sites
from onnx_cp.graph.fusion import fuse
from onnx_cp.ranks import error_budget, search
from onnx_cp.ranks.latency_model import time_ratio
from onnx_cp.ranks.policy import QualityBudget
from onnx_cp.ranks.solve import Refiner, make_solver
from onnx_cp.runtime import model_io
from onnx_cp.runtime.inputs import fill_input_shapes, pin_input_shapes, real_inputs, set_input_shapes
from onnx_cp.runtime.session import usable_cores
from onnx_cp.runtime.verify import verify_rewrite
from onnx_cp.settings import (
    AccuracyBudget,
    ErrorBudget,
    ExplicitRanks,
    FinetuneSettings,
    LayerSelection,
    MeasureSettings,
    OutputErrorBudget,
    QuantizeSettings,
    RankPolicy,
    SolverSettings,
    SpeedupTarget,
    as_policy,
)

if TYPE_CHECKING:
    from onnx_cp.measure.accuracy import AccuracyResult

SENSITIVITY_SAMPLES = 512
SENSITIVITY_MIN_SAMPLES = 32
SENSITIVITY_SECONDS = 60.0  # of model runs that measure the layers' sensitivities, beyond the minimum
# Whole-model speed-ups are measured over at least this many seconds of runs (or $ONNX_CP_MEASURE_SECONDS):
# charnet's CP model (0.07 ms) read 9.6x-10.6x over 0.2 s of runs, 9.7x-9.9x over 3 s (three benchmarks each).
MEASURE_SECONDS_ENV = "ONNX_CP_MEASURE_SECONDS"
MEASURE_SECONDS = float(os.environ.get(MEASURE_SECONDS_ENV, 3.0))
SPEED_COST_WARNING = 1.0  # points of accuracy a speed target alone may cost before it is warned of


@dataclass
class OptimizeResult:
    """The rewritten model (an onnx.ModelProto if one was given, else an onnx_ir.Model), the report
    (per-layer rows, totals, verification, ...: JSON-ready, see docs/reference.md) and whether the
    input kept its weights in external data (so that saving can do the same)."""

    model: onnx.ModelProto | ir.Model
    report: dict = field(default_factory=dict)
    had_external_data: bool = False


def optimize(
    model: model_io.ModelLike,
    ranks: RankPolicy | int | None = None,
    *,
    layers: LayerSelection | None = None,
    solver: SolverSettings | None = None,
    finetune: FinetuneSettings | None = None,
    quantize: QuantizeSettings | None = None,
    measure: MeasureSettings | None = None,
    preprocessing: Preprocessing | None = None,
    seed: int = 0,
) -> OptimizeResult:
    """Replace the eligible Convs of `model` (a path, onnx.ModelProto or onnx_ir.Model; never modified)
    by CP chains.

    ranks: an int (that rank everywhere) or a policy: ExplicitRanks, ErrorBudget (the default),
    SpeedupTarget, AccuracyBudget (see onnx_cp.ranks). A budget that cannot be met raises BudgetError.
    The other groups (onnx_cp.settings) say which layers, how to solve, how to fine-tune, quantize
    and measure; `preprocessing` turns every image folder or npz path the run reads into model inputs.
    """
    clock = _StageClock()
    policy = as_policy(ranks)
    layers, solver = layers or LayerSelection(), solver or SolverSettings()
    measure = measure or MeasureSettings()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"expected a non-negative integer, got {seed!r}", option="seed")
    eval_data = measure.eval_data if measure.eval_data is not None else (finetune.val if finetune else None)
    quality = policy.within if isinstance(policy, SpeedupTarget) else policy
    if isinstance(quality, AccuracyBudget) and eval_data is None:
        raise UsageError("needs data to measure accuracy on (eval_data or the fine-tuning val data)",
                         option="max_accuracy_drop")
    if isinstance(quality, OutputErrorBudget) and eval_data is None:
        if finetune is None:
            raise UsageError("needs sample inputs to compare outputs on (eval_data or fine-tuning data)",
                             option="max_output_error")
        eval_data = finetune.data  # the sample data users have: outputs need no labels
    if finetune is not None:
        import onnx_cp.finetune  # noqa: F401 - without torch this fails now, naming the extra, not after the solve
    data = _Data(preprocessing or Preprocessing())
    calibration = _calibration_data(quantize, finetune, eval_data)
    if quantize is not None and calibration is None:
        raise UsageError("INT8 quantization needs calibration data (calibration_data, the fine-tuning data "
                         "or eval_data)", option="quantize")
    sample = _first_given(finetune.data if finetune is not None else None, eval_data, calibration)  # input's size
    run = _Run(model, layers, measure, make_solver(solver, seed), seed, data,
               sample_shape=data.sample_shape(sample) if sample is not None else None)
    tune = _Tuner(run, finetune)
    clock.lap("load and exact rewrites")
    report: dict = {"input": run.source, "input_shapes": run.shapes,
                    "settings": _settings_report(policy, layers, solver, quantize, seed)}
    if run.fusions:
        report["fusions"] = dict(run.fusions)

    tuned, precision, searched, float_units = None, "int8" if quantize is not None else None, None, frozenset()
    # with a speed target, INT8 is timed in the search and used only where it is faster
    int8_timing = _Int8Timing(run, calibration, quantize) if quantize and isinstance(policy, SpeedupTarget) else None
    if isinstance(policy, SpeedupTarget):
        plan, report["search"], chosen = run.search_speedup(policy, _selection_data(finetune, eval_data), int8_timing)
        precision, float_units = chosen or (precision, float_units)
    elif isinstance(policy, (AccuracyBudget, OutputErrorBudget)):
        # with a quality bound, each plan is quantized in the search and the bound judges the written model
        int8 = _Int8Calibration(quantize, lambda: run.data.open("calibration", calibration, labels=False)) \
            if quantize else None
        plan, searched, report["search"] = run.search_quality(policy, eval_data, tune, int8)
        tuned = searched.tuned if finetune is not None and plan.layers else None  # else as built below
        precision = precision and ("int8" if searched.int8 is not None else "float")
    else:
        plan = run.plan_without_search(policy)
    clock.lap("rank choice")
    rewritten, outcomes = run.build(plan)
    report["layers"] = [o.as_dict() for o in outcomes]
    report["totals"] = _totals(run.input, rewritten, report["layers"])
    if measure.verify:
        report["verification"] = verify_rewrite(run.input, rewritten, run.shapes, seed=seed)
        report["warnings"] = _unbounded_cost(policy, finetune, eval_data, report["verification"])
    clock.lap("build and verification")
    stages = {"decomposed": rewritten}
    if tuned is None and report["totals"]["decomposed"]:
        tuned, tuning = tune(rewritten)
        report.update(tuning.report)
        stages.update(tuning.stages)
        clock.lap("reconstruction and fine-tuning")
    final = rewritten if tuned is None else tuned
    if final is not rewritten:
        stages["finetuned"] = final
    if precision == "int8" and searched is None:
        searched = _quantized_final(final, run.data.open("calibration", calibration, labels=False), quantize,
                                    float_units, fall_back=isinstance(policy, SpeedupTarget))
        precision = "int8" if searched.int8 is not None else "float"
    if precision == "int8":
        float_final, (final, report["quantize"]) = final, (searched.int8, searched.quantize)
        int8_stage = f"{'finetuned' if 'finetuned' in stages else 'decomposed'}+int8"
        stages[int8_stage] = final
        if finetune is not None:
            bounded = isinstance(quality, (AccuracyBudget, OutputErrorBudget))
            final, report["qat"] = tune.quantization_aware(final, report.get("finetune"),
                                                           run.bound_of(quality, eval_data) if bounded else None)
            if report["qat"]["kept"] == "qat":
                stages[f"{int8_stage}+qat"] = final
            elif report["qat"].get("failed"):
                report.setdefault("warnings", []).append(f"quantization-aware fine-tuning failed, the calibrated "
                                                         f"INT8 model is written: {report['qat']['failed']}")
        if isinstance(policy, (ExplicitRanks, ErrorBudget)):  # asked for, not searched: timed, not refused
            report.setdefault("warnings", []).extend(_int8_slower(run, float_final, final, report["quantize"]))
    elif quantize is not None:
        why = searched.skipped if searched is not None else \
            f"INT8 broke the input model ({int8_timing.broken})" if int8_timing and int8_timing.broken else _INT8_SLOWER
        report["quantize"] = {"kind": "int8", "skipped": why}
        report.setdefault("warnings", []).append(f"not quantized: {why}")
    if quantize is not None:
        clock.lap("quantization")
    accuracy = None
    if eval_data is not None:
        dataset = run.data.open("evaluation", eval_data)
        accuracy = _accuracy(run.input, stages, dataset)
        if accuracy is not None:
            report["accuracy"] = {stage: result.to_json() for stage, result in accuracy.items()}
        else:
            report["fidelity"] = _fidelity(run.input, stages, dataset)
        clock.lap("evaluation")
    if isinstance(policy, SpeedupTarget):
        final_stage = next((stage for stage, model in stages.items() if model is final), None)
        measured_drop = (search.accuracy_drop(accuracy["original"], accuracy[final_stage])
                         if accuracy is not None and final_stage is not None else None)
        try:
            report["target"] = run.check_target(policy, final, eval_data, measured_drop)
        except BudgetError as error:  # the caller may still want to see what was measured
            report["target"] = {"target_speedup": policy.target, "failed": str(error)}
            error.report = report
            raise
        report.setdefault("warnings", []).extend(_speed_cost(policy, report.get("accuracy"))
                                                 + _int8_cost(policy, report.get("quantize"))
                                                 + _speed_short(report["target"]))
        clock.lap("speed-up check")
    if measure.latency:
        report.update(_latency(run.input, final, run.shapes, measure.threads, seed))
        clock.lap("latency")
    report["data"] = run.data.used
    report["stage_seconds"], report["seconds"] = clock.stages(), clock.total()
    output = ir.to_proto(final) if isinstance(model, onnx.ModelProto) else final
    return OptimizeResult(model=output, report=report, had_external_data=run.had_external_data)


class _StageClock:
    """Wall time per stage of one run, so that a slow run says where its time went: `lap` closes the
    stage that ran since the last lap; a stage without a lap is counted in the next one."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.last
        self.last = now

    def stages(self) -> dict[str, float]:
        return {stage: round(seconds, 3) for stage, seconds in self.seconds.items()}

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 3)


class _Run:
    """The input model, its Conv sites, and how to plan and build rewritten copies of it."""

    def __init__(self, model, layers: LayerSelection, measure: MeasureSettings, solve_many, seed: int,
                 data: _Data, sample_shape: tuple[int, ...] | None = None):
        self.data = data
        self.source = str(model) if isinstance(model, (str, Path)) else None
        # the user's model, which speed-ups and the written model's fidelity are measured against
        self.input = model_io.to_ir(model)
        self.had_external_data = model_io.has_external_data(self.input)
        if model_io.initializer_bytes(self.input) < model_io.PROTOBUF_SAFE_BYTES:
            ir.external_data.load_to_model(self.input)  # small enough to work in memory
        given = {k: list(v) for k, v in measure.input_shapes.items()}
        self.shapes = fill_input_shapes(self.input, {**_shapes_of_sample(self.input, given, sample_shape), **given})
        self.value_shapes = _inferred_shapes(self.input, self.shapes)
        # the model every candidate is built from: the input after the exact rewrites (graph.fusion)
        self.original, self.fusions = self.input, Counter()
        if layers.fuse:
            fused = self.input.clone()
            self.fusions = fuse(fused, self.value_shapes)
            if self.fusions:  # shapes again: the rewrites make values (a Conv's input among them) of their own
                self.original, self.value_shapes = fused, _inferred_shapes(fused, self.shapes)
        self.sites = find_conv_sites(self.original, self.value_shapes)
        self.filtered = filter_sites(self.sites, layers.include, layers.exclude)
        self.candidates = [s for s in self.sites if s.eligible and s.name not in self.filtered]
        self.solve_many = solve_many
        self.refine = Refiner(self.candidates, solve_many)
        self.threads = measure.threads
        self.seed = seed

    def build(self, plan: Plan) -> tuple[ir.Model, list[LayerOutcome]]:
        """A rewritten copy of the input: the plan's layers spliced, every other Conv left with its reason."""
        model = self.original.clone()
        plan = Plan(plan.layers, {**plan.refusals, **self.filtered})
        result = CPConvPass(plan, sites=find_conv_sites(model, self.value_shapes))(model)
        unrolled = [o for o in result.outcomes if o.op == "LSTM" and o.status == "decomposed"]
        if unrolled:
            # its steps hold for these input shapes only: any other must be refused, not misread
            fixed = pin_input_shapes(model, self.shapes)
            for outcome in unrolled:
                outcome.extra["inputs_fixed"] = fixed
        return model, result.outcomes

    def build_model(self, plan: Plan) -> ir.Model:
        return self.build(plan)[0]

    def build_refined(self, plan: Plan) -> ir.Model:
        """A candidate whose accuracy counts: full solves in place of the menus' quick estimates."""
        return self.build_model(self.refine(plan))

    def plan_without_search(self, policy: ExplicitRanks | ErrorBudget) -> Plan:
        if isinstance(policy, ExplicitRanks):
            policy.check_layers([s.name for s in self.sites])
        data = policy.data if isinstance(policy, ErrorBudget) else None
        timed = functools.partial(time_ratio, threads=self.threads) if isinstance(policy, ErrorBudget) else None
        return error_budget.plan_ranks(self.candidates, policy, self.solve_many, self._output_error(data), timed)

    def _output_error(self, data, stage: str = "error data"):
        """Layer-output errors on the first samples of `data` (None without data)."""
        if data is None:
            return None
        from onnx_cp.data import first_inputs
        from onnx_cp.ranks.output_error import DEFAULT_SAMPLES, OutputError

        samples = first_inputs(self.data.open(stage, data, labels=False, limit=DEFAULT_SAMPLES),
                               DEFAULT_SAMPLES)
        return OutputError(self.original, self.candidates, samples)

    def timing(self) -> search.Timing:
        from onnx_cp.measure import benchmark_latency, layer_profile

        models = [self.original, self.input] if self.fusions else [self.original]  # the input: what targets count from
        medians = [m.median_ms for m in benchmark_latency(models, threads=self.threads, input_shapes=self.shapes,
                                                          seed=self.seed).models]
        total = medians[0]
        profile = layer_profile(self.original, threads=self.threads, input_shapes=self.shapes, seed=self.seed)
        profiled = sum(layer.ms for layer in profile.layers) or 1.0
        return search.Timing(total, {layer.name: total * layer.ms / profiled for layer in profile.layers},
                             reference_ms=medians[1] if self.fusions else None)

    def menus(self, timing: search.Timing, data=None) -> tuple[list[search.LayerMenu], dict[str, str]]:
        """The layers' menus; with `data`, their options judged by layer-output error on it (by
        kernel error for a model of several inputs, whose samples cannot feed its layers alone)."""
        single = len(real_inputs(self.original)) == 1
        return search.layer_menus(self.candidates, self.solve_many, timing.layer_ms, self.threads,
                                  self._output_error(data, "layer errors") if single else None)

    def speedup_of(self, model: ir.Model) -> float:
        return self.speedups_of([model])[0]

    def speedups_of(self, models: list[ir.Model]) -> list[float]:
        """Each model's measured speed-up over the input model, all in one interleaved benchmark."""
        from onnx_cp.measure import benchmark_latency

        result = benchmark_latency([self.input, *models], threads=self.threads, input_shapes=self.shapes,
                                   seed=self.seed, min_seconds=MEASURE_SECONDS)
        return [result.fast_speedup(i) for i in range(1, len(models) + 1)]

    def search_speedup(self, policy: SpeedupTarget, data, int8: _Int8Timing | None = None
                       ) -> tuple[Plan, list[dict], tuple[str, frozenset[str]] | None]:
        """The most accurate plan measured fast enough, and with `int8` the precision it was fastest
        in ("int8" or "float") with the layers its INT8 keeps float (_Int8Timing.annotate). With
        `data`, "accurate" is each option's layer-output error on it priced on its layer's loss curve,
        measured by the bound's measure, else by what the task loses (charnet: kernel error alone
        spent the speed beyond 8.5x on conv3 and lost 1.4 points)."""
        alone, early = self._int8_alone(policy, int8) if int8 is not None and not int8.broken else (None, [])
        if alone is not None:
            return alone, early, int8.annotate(early, self.original)
        timing = self.timing()
        menus, refusals = self.menus(timing, data)
        if data is not None:
            meter = self._meter(policy.within) if policy.within is not None else \
                functools.partial(self._output_error_meter, task=True)
            menus, probe = self._with_sensitivities(menus, meter, data, timing)
            menus = probe(menus, search.aimed_speedup(policy.target))
        else:
            menus = search.data_free_forms(menus)
        measure = self.speedup_of if int8 is None else int8.speedup_of
        plan, model, trace = search.search_speedup(menus, timing, policy.target, self.build_model, measure,
                                                   with_original=int8 is not None,
                                                   confirm=int8.confirmed_speedup_of if int8 is not None else None)
        trace = [{**step, "attempt": number} for number, step in enumerate(early + trace, 1)]
        precision = int8.annotate(trace, model) if int8 is not None else None
        return _with_refusals(self.refine(plan), refusals), trace, precision

    def _int8_alone(self, policy: SpeedupTarget, int8: _Int8Timing) -> tuple[Plan | None, list[dict]]:
        """The plan that decomposes nothing, when the input model in INT8 meets the target (measured
        twice, as the search confirms its plans): no plan is more accurate, so no menu is solved
        (YOLOv8n at 1.5x [AVX-512 VNNI, AMX]: the search took 9 minutes to end there). Else None, with
        the steps measured."""
        trace = []
        for step, needed in (("int8 alone", search.aimed_speedup(policy.target)),
                             ("confirm", search.confirmed_speedup(policy.target))):
            speedup = int8.confirmed_speedup_of(self.original)  # its checked quantization is made already
            trace.append({"attempt": len(trace) + 1, "step": step, "predicted": 1.0, "measured": speedup,
                          "ranks": {}})
            if speedup < needed:
                return None, trace
        return Plan(refusals=dict.fromkeys((s.name for s in self.candidates), search.KEPT_FOR_INT8)), trace

    def check_target(self, policy: SpeedupTarget, final: ir.Model, eval_data,
                     measured_drop: float | None = None) -> dict:
        """The final model (after fine-tuning and quantization) measured against the speed target and,
        when it has one, its quality bound on `eval_data` (an accuracy bound uses `measured_drop`,
        the final model's drop on that data, when the run measured it already): a bound that is not
        met raises BudgetError."""
        speedup = self.speedup_of(final)
        if policy.within is not None and speedup < policy.target:
            speedup = max(speedup, self.speedup_of(final))  # a busy machine only ever slows a measurement
        result: dict = {"target_speedup": policy.target, "measured_speedup": round(speedup, 3)}
        if policy.within is None:
            return result
        if speedup < search.confirmed_speedup(policy.target):
            raise BudgetError(f"the final model measured {speedup:.2f}x, short of the {policy.target:g}x target; "
                              "nothing written")
        bound = _quality_limit(policy.within)
        key, limit = bound.key, bound.limit
        if isinstance(policy.within, AccuracyBudget) and measured_drop is not None:
            measured = measured_drop
        else:
            measured = self._meter(policy.within)(self.data.open("evaluation", eval_data))(final)
        result.update({key: round(measured, 4), "limit": limit})
        if result[key] > limit:
            raise BudgetError(f"the model measured {speedup:.2f}x but its {key.replace('_', ' ')} is "
                              f"{result[key]:.3g} (at most {limit:g} allowed); nothing written")
        return result

    def search_quality(self, policy: QualityBudget, eval_data, tune: _Tuner, int8: _Int8Calibration | None = None
                       ) -> tuple[Plan, _Candidate, dict]:
        """The fastest plan whose accuracy drop (or output error) on `eval_data`, after tuning, stays
        within the policy's limit; with `int8`, each plan's model is quantized too and the bound judges
        the model that would be written (_Run.with_int8)."""
        timing = self.timing()
        menus, refusals = self.menus(timing, eval_data)
        menus, probe = self._with_sensitivities(menus, self._meter(policy), eval_data, timing)
        measure_on_full = self._meter(policy)(self.data.open("evaluation", eval_data))
        limit = _quality_limit(policy)
        tuning_reports: list[dict] = []
        float_units: frozenset[str] = frozenset()  # of the last plan quantized: where the next one's check starts

        def tune_and_score(model: ir.Model) -> tuple[float, _Candidate]:
            nonlocal float_units
            tuned, tuning = tune(model)  # built from refined factors (see build_refined)
            tuned = model if tuned is None else tuned
            score, candidate = measure_on_full(tuned), _Candidate(tuned)
            if int8 is not None:
                score, candidate = self.with_int8(candidate, score, measure_on_full, limit, int8, float_units)
                float_units = frozenset((candidate.quantize or {}).get("float_units", float_units))
                tuning.report["precision"] = candidate.precision_step(limit.key)
            tuning_reports.append(tuning.report)
            return score, candidate

        plan, chosen, trace, menus = search.search_quality(
            menus, timing, limit, self.build_refined, tune_and_score, probe,
            lambda candidates: self.speedups_of([c.written for c in candidates]))
        for step, tuning in zip(trace, tuning_reports):
            step.update(tuning)
        if int8 is not None:
            plan, chosen = self._int8_alone_if_faster(plan, chosen, measure_on_full, limit, int8, trace)
        return (_with_refusals(self.refine(plan), refusals), chosen,
                {"trace": trace,
                 "sensitivity": {m.site.name: {f: c.points for f, c in m.curves.items()} for m in menus}})

    def _int8_alone_if_faster(self, plan: Plan, chosen: _Candidate, measure: Callable[[ir.Model], float],
                              limit: search.QualityLimit, int8: _Int8Calibration, trace: list[dict]
                              ) -> tuple[Plan, _Candidate]:
        """INT8 alone (nothing decomposed) in place of the plan found, when it stays within the bound
        and measures faster: on YOLOv8n within 0.15 the search's best plan, 12 layers decomposed,
        measured 1.39x in INT8 where INT8 alone measures 1.8x."""
        _, alone = self.with_int8(_Candidate(self.original), 0.0, measure, limit, int8)
        if alone.int8_score is None:  # INT8 broke the input model
            return plan, chosen
        trace.append({"step": "int8 alone", "predicted_speedup": 1.0, limit.key: alone.int8_score, "ranks": {},
                      "precision": alone.precision_step(limit.key)})
        if alone.int8 is None:
            return plan, chosen
        found, trace[-1]["measured_speedup"] = self.speedups_of([chosen.written, alone.int8])
        if trace[-1]["measured_speedup"] <= found:
            return plan, chosen
        return Plan(refusals=dict.fromkeys((s.name for s in self.candidates), search.KEPT_FOR_INT8_WITHIN)), alone

    def with_int8(self, candidate: _Candidate, score: float, measure: Callable[[ir.Model], float],
                  limit: search.QualityLimit, int8: _Int8Calibration, float_units: frozenset[str] = frozenset()
                  ) -> tuple[float, _Candidate]:
        """A plan's candidate in INT8 when its quantized model stays within `limit` and measures faster
        than its float one, with that model's measure; else the float candidate, saying why. The bound
        is then met by the model written, not only by the float model quantization starts from
        (before, charnet within 0.3 points of top-1 was planned in float, then quantized under INT8's
        own check: written 3.15 points below the original, with exit 0). Each plan is calibrated on
        INT8_CHECK_SAMPLES samples, not the 256 of a final quantization, and its check starts with
        `float_units` float (those of the plan quantized before): on YOLOv8n each plan's 256-sample
        quantization took minutes, and the search had not ended after 20."""
        if score > limit.limit:  # quantization only adds error
            return score, replace(candidate, skipped="over the limit in float, not quantized")
        try:
            quantized, report = _quantize(candidate.tuned, int8.data(), int8.settings, float_units,
                                          samples=INT8_CHECK_SAMPLES)
        except OnnxCpError as error:
            return score, replace(candidate, skipped=f"INT8 broke the model: {error}")
        int8_score = measure(quantized)
        candidate = replace(candidate, float_score=score, int8_score=int8_score, quantize=report)
        over = _over_limit(limit, int8_score)
        if over:
            return score, replace(candidate, skipped=f"in INT8 {over}")
        float_speedup, int8_speedup = self.speedups_of([candidate.tuned, quantized])
        candidate = replace(candidate, float_speedup=float_speedup, int8_speedup=int8_speedup)
        if int8_speedup <= float_speedup:
            return score, replace(candidate, skipped=f"measured faster in float ({float_speedup:.2f}x) than in "
                                                     f"INT8 ({int8_speedup:.2f}x) on this CPU")
        return int8_score, replace(candidate, int8=quantized)

    def _with_sensitivities(self, menus: list[search.LayerMenu], meter: Callable, data, timing: search.Timing
                            ) -> tuple[list[search.LayerMenu], Callable[[list, float], list]]:
        """The menus with their layers' loss curves (one model per layer over the whole sample, then
        per other form while time allows), and how to measure those curves where the plan for a
        predicted speed-up goes (search.probe_planned_options, on the same samples)."""
        affordable = SENSITIVITY_SECONDS / max(len(menus) * timing.total_ms / 1e3, 1e-9)
        samples = int(min(SENSITIVITY_SAMPLES, max(SENSITIVITY_MIN_SAMPLES, affordable)))
        drop_of = meter(self.data.open("sensitivity", data, limit=samples))
        menus = search.with_sensitivities(menus, self.build_model, drop_of, more_forms_seconds=SENSITIVITY_SECONDS)

        def probe(menus: list[search.LayerMenu], speedup: float) -> list[search.LayerMenu]:
            return search.probe_planned_options(menus, timing, speedup, self.build_model, drop_of, SENSITIVITY_SECONDS)

        return menus, probe

    def bound_of(self, quality: QualityBudget, eval_data) -> Callable[[ir.Model], str | None]:
        """Checks a model against the bound on `eval_data`: None within it, else what it measured."""
        measure, limit = self._meter(quality)(self.data.open("evaluation", eval_data)), _quality_limit(quality)

        return lambda model: _over_limit(limit, measure(model))

    def _meter(self, quality: QualityBudget) -> Callable:
        return self._accuracy_meter if isinstance(quality, AccuracyBudget) else self._output_error_meter

    def _accuracy_meter(self, dataset) -> Callable[[ir.Model], float]:
        """Points of accuracy a model loses against the original on `dataset`."""
        from onnx_cp.measure import evaluate

        baseline = evaluate(self.original, dataset, threads=usable_cores())
        return lambda model: search.accuracy_drop(
            baseline, evaluate(model, dataset, reference=self.original, threads=usable_cores()))

    def _output_error_meter(self, dataset, *, task: bool = False) -> Callable[[ir.Model], float]:
        """The worst channel-group error of a model's outputs against the original's on `dataset`;
        with `task`, what the task loses (OutputAgreement.task_loss: decoded strings, anchors, top-1
        too), which weighs the layers for a speed target alone."""
        from onnx_cp.measure.outputs import ReferenceOutputs

        reference = ReferenceOutputs(self.original, dataset)  # run once per search
        if task:
            return lambda model: reference.compare(model).task_loss
        return lambda model: reference.compare(model).worst_group_error


# INT8 costs accuracy, so a speed target quantizes only when the quantized model measures faster.
_INT8_SLOWER = ("the chosen plan measured faster in float than in INT8 on this CPU, so it was written in float "
                "(the search measured both for every plan: see its trace)")
QAT_EPOCHS = 2  # quantization-aware fine-tuning starts near its optimum: the calibrated INT8 model
# Its peak rate when nothing was fine-tuned in float (INT8 alone), in place of a probe: on NudeNet's
# YOLOv8n the probe chose its lowest rate (about 3e-5) in both runs, and took 3 of QAT's 4.5 minutes.
QAT_LR_ALONE = 3e-5
QAT_CHECK_SAMPLES = 64  # without validation data, QAT and PTQ are compared on this many samples
# Distillation without validation data holds out this share of the samples (within the bounds) to
# choose the epoch, epoch 0 included: on 400 text lines, 5 epochs of a CRNN took the decoded strings
# kept on unseen lines from 89% (after reconstruction) to 78%, and the last epoch was kept.
HELD_OUT_SHARE, HELD_OUT_MIN, HELD_OUT_MAX = 0.1, 16, 256
INT8_TIMING_SAMPLES = 8  # min/max ranges for timing: the kernels do not depend on them
INT8_CHECK_SAMPLES = 64  # calibrate the checked quantizations inside the searches (the final one: 256)


class _Int8Timing:
    """Measures each speed-search candidate in float and in INT8, interleaved in one benchmark, and
    answers with the faster: with --quantize, the ranks are chosen for the model that is written,
    and a plan that is slower in INT8 (charnet's rank-16 CP chains on Intel AMX: 8.7x, 16.1x in float)
    keeps float. The search's steps time a quick quantization (speedup_of); its confirmations time
    the checked one that decides which layers stay float (confirmed_speedup_of)."""

    def __init__(self, run: _Run, calibration, settings: QuantizeSettings):
        from onnx_cp.data import first_inputs
        from onnx_cp.quantize import int8_scheme

        self.run, self.settings = run, settings
        self.samples = first_inputs(run.data.open("INT8 timing", calibration, labels=False, limit=INT8_CHECK_SAMPLES),
                                    INT8_CHECK_SAMPLES)
        self.measured: list[_Int8Measured] = []
        # The layers a checked quantization of the input model keeps float are timed float in every
        # candidate (YOLOv8n: 172 float nodes, 1.29x, where the head alone float times 1.84x).
        self.original_checked, self.broken = self._checked(run.original)
        self.keep_float = frozenset(int8_scheme(self.original_checked).float_nodes) if self.original_checked \
            else frozenset()

    def _checked(self, model: ir.Model) -> tuple[ir.Model | None, str | None]:
        """`model` quantized and checked on the timing's samples; None and why when INT8 breaks it."""
        from onnx_cp.quantize import quantize_int8

        try:
            return quantize_int8(model, self.samples, samples=len(self.samples), target=self.settings.target,
                                 max_output_error=self.settings.max_output_error), None
        except OnnxCpError as error:
            return None, str(error)

    def speedup_of(self, model: ir.Model) -> float:
        from onnx_cp.quantize import quantize_for_timing

        if self.broken:
            return self._measure(model, None)
        quantized = quantize_for_timing(model, self.samples[:INT8_TIMING_SAMPLES], target=self.settings.target,
                                        keep_float=self.keep_float)
        return self._measure(model, quantized)

    def confirmed_speedup_of(self, model: ir.Model) -> float:
        """The speed-up of `model` quantized as the written model will be: checked, with the layers
        INT8 breaks kept float. A quick quantization keeps float only what the input model's check
        did, and a CP model can need more: NudeNet's YOLOv8n at 2x timed 2.06x in INT8 in the
        search and was written at 1.58x, its check keeping 32 layers float where the input's kept 8."""
        if self.broken:
            return self._measure(model, None)
        checked = self.original_checked if model is self.run.original else self._checked(model)[0]
        return self._measure(model, checked)

    def _measure(self, model: ir.Model, quantized: ir.Model | None) -> float:
        """Float and INT8 speed-ups of `model` in one interleaved benchmark (float alone without INT8)."""
        from onnx_cp.measure import benchmark_latency
        from onnx_cp.quantize import int8_scheme

        if quantized is None:
            self.measured.append(_Int8Measured(model, self.run.speedup_of(model), 0.0))
        else:
            result = benchmark_latency([self.run.input, model, quantized], threads=self.run.threads,
                                       input_shapes=self.run.shapes, seed=self.run.seed, min_seconds=MEASURE_SECONDS)
            scheme = int8_scheme(quantized)
            self.measured.append(_Int8Measured(model, result.fast_speedup(1), result.fast_speedup(2),
                                               frozenset(scheme.float_units) if scheme else frozenset()))
        return max(self.measured[-1].float_speedup, self.measured[-1].int8_speedup)

    def annotate(self, trace: list[dict], chosen: ir.Model) -> tuple[str, frozenset[str]]:
        """Each trace step's float and INT8 speed-ups; the precision the chosen model was faster in
        when confirmed, and the layers its checked INT8 kept float (where the final check starts)."""
        for step, measured in zip(trace, self.measured):
            step.update(measured_float=measured.float_speedup, measured_int8=measured.int8_speedup,
                        precision=measured.precision,
                        **({"float_units": len(measured.float_units)} if step.get("step") == "confirm" else {}))
        measured = next(m for m in reversed(self.measured) if m.model is chosen)
        return measured.precision, measured.float_units


class _Int8Measured(NamedTuple):
    """A speed-search candidate as _Int8Timing measured it."""

    model: ir.Model
    float_speedup: float
    int8_speedup: float
    float_units: frozenset[str] = frozenset()  # the layers its INT8 kept float (checked: confirmations)

    @property
    def precision(self) -> str:
        return "int8" if self.int8_speedup > self.float_speedup else "float"


@dataclass(frozen=True)
class _Int8Calibration:
    """What quantizes the candidates of a quality search: the settings and their calibration data."""

    settings: QuantizeSettings
    data: Callable[[], object]  # opens the calibration dataset


@dataclass(frozen=True)
class _Candidate:
    """A plan's model: float after tuning, and with --quantize, its INT8 model when that was chosen
    (by a quality search: _Run.with_int8), or why it was not."""

    tuned: ir.Model
    int8: ir.Model | None = None
    quantize: dict | None = None  # _quantize's report on its INT8 model (written only if `int8` is set)
    skipped: str | None = None  # why the float model is written
    float_score: float | None = None
    int8_score: float | None = None
    float_speedup: float | None = None
    int8_speedup: float | None = None

    @property
    def written(self) -> ir.Model:
        return self.int8 if self.int8 is not None else self.tuned

    def precision_step(self, key: str) -> dict:
        """The search trace's record of the choice."""
        measured = {f"{key}_float": self.float_score, f"{key}_int8": self.int8_score,
                    "measured_float": self.float_speedup, "measured_int8": self.int8_speedup,
                    "int8_seconds": (self.quantize or {}).get("seconds")}
        return {"written": "int8" if self.int8 is not None else "float",
                **({"why_float": self.skipped} if self.skipped else {}),
                **{k: round(v, 4) for k, v in measured.items() if v is not None}}


def _shapes_of_sample(model: ir.Model, given: dict, sample_shape: tuple[int, ...] | None) -> dict:
    """The shape of a one-input model whose non-batch dims are symbolic, taken from a sample of the
    run's data: latency is measured, and ranks chosen, at the size the model will see (YOLOv8n's
    height and width default to 32 otherwise, and the search timed 0.6 ms where 320x320 takes 17)."""
    inputs = real_inputs(model)
    if sample_shape is None or len(inputs) != 1 or inputs[0].name in given or inputs[0].shape is None:
        return {}
    dims = list(inputs[0].shape)
    if len(dims) != len(sample_shape) + 1 or all(isinstance(d, int) for d in dims[1:]):
        return {}
    batch = dims[0] if isinstance(dims[0], int) else 1
    return {inputs[0].name: [batch] + [d if isinstance(d, int) else s for d, s in zip(dims[1:], sample_shape)]}


def _calibration_data(quantize: QuantizeSettings | None, finetune: FinetuneSettings | None, eval_data):
    """What INT8 is calibrated on: the given calibration data, else the sample inputs, else the
    evaluation data."""
    if quantize is None:
        return None
    return _first_given(quantize.calibration_data, finetune.data if finetune is not None else None, eval_data)


def _first_given(*sources):
    """The first data source that is not None (a path, a Dataset or arrays, which have no truth value)."""
    return next((source for source in sources if source is not None), None)


def _selection_data(finetune: FinetuneSettings | None, eval_data):
    """What a speed search weighs layers on: the validation data, else the sample inputs, else the
    evaluation data (which otherwise only judges the result)."""
    if finetune is not None:
        return finetune.val if finetune.val is not None else finetune.data
    return eval_data


def _with_refusals(plan: Plan, refusals: dict[str, str]) -> Plan:
    return Plan(plan.layers, {**plan.refusals, **refusals})


class _Data:
    """Opens every data source of a run with its preprocessing, and remembers which stage read what."""

    def __init__(self, preprocessing: Preprocessing):
        self.preprocessing = preprocessing
        self.used: dict[str, dict] = {}

    def sample_shape(self, source) -> tuple[int, ...]:
        """The shape of one preprocessed sample of `source` (not recorded as a use)."""
        from onnx_cp.data import first_inputs

        return tuple(first_inputs(self.preprocessing.open(source, labels=False, limit=1), 1).shape[1:])

    def open(self, role: str, source, *, labels: bool = True, limit: int | None = None):
        dataset = self.preprocessing.open(source, labels=labels, limit=limit)
        samples = len(dataset[0] if isinstance(dataset, tuple) else dataset)
        self.used[role] = {"source": str(source) if isinstance(source, (str, Path)) else type(source).__name__,
                           "samples": min(samples, limit or samples)}
        return dataset


@dataclass
class _Tuning:
    """What one reconstruction + fine-tuning call produced, beside the model."""

    report: dict = field(default_factory=dict)  # "reconstruction" and "finetune" entries
    stages: dict[str, ir.Model] = field(default_factory=dict)  # intermediate models ("reconstructed")


def _held_out(dataset) -> tuple:
    """(train, validation, what was held out): the last HELD_OUT_SHARE of the samples (in the data's
    own order, so deterministic) judge the epochs of a distillation that has no validation data; all
    of them train when there are too few to spare any."""
    from onnx_cp.finetune.train import load_samples

    x, _ = load_samples(dataset, "fine-tuning data")
    count = int(np.clip(round(len(x) * HELD_OUT_SHARE), HELD_OUT_MIN, HELD_OUT_MAX))
    if len(x) < 2 * count:
        return x, None, None
    return x[:-count], x[-count:], f"the last {count} of the {len(x)} fine-tuning samples"


class _Tuner:
    """Reconstructs and fine-tunes a rewritten model when fine-tuning is set."""

    def __init__(self, run: _Run, settings: FinetuneSettings | None):
        self.run, self.settings = run, settings

    def __call__(self, rewritten: ir.Model) -> tuple[ir.Model | None, _Tuning]:
        """(the fine-tuned model, or None without fine-tuning settings; what was done)."""
        tuning = _Tuning()
        if self.settings is None:
            return None, tuning
        from onnx_cp.finetune import finetune  # torch is imported only when fine-tuning

        settings = self.settings
        start = self._reconstructed(rewritten, tuning) if settings.reconstruct_steps else rewritten
        teacher = self.run.original if settings.teacher_from_input else None
        train = self.run.data.open("fine-tuning", settings.data, labels=not settings.teacher_from_input)
        val = self.run.data.open("validation", settings.val) if settings.val is not None else None
        held_out = None
        if val is None and teacher is not None:
            train, val, held_out = _held_out(train)
        tuned = finetune(start, train, val=val, teacher=teacher, seed=self.run.seed,
                         **settings.schedule())
        tuning.report["finetune"] = {"validation": held_out} if held_out else {}
        tuning.report["finetune"] |= {
            "history": tuned.history, "best_epoch": tuned.best_epoch, "metric": tuned.metric,
            "seconds": tuned.seconds, "samples_per_second": tuned.samples_per_second,
            "lr": tuned.lr, "lr_probe": tuned.lr_probe, "augmentation": tuned.augmentation, "skipped": tuned.skipped,
            "teacher": "input model" if settings.teacher_from_input else None, "options": settings.schedule(),
        }
        return ir.from_proto(tuned.model), tuning

    def quantization_aware(self, ptq: ir.Model, float_tuning: dict | None,
                           over_bound: Callable[[ir.Model], str | None] | None = None) -> tuple[ir.Model, dict]:
        """Quantization-aware fine-tuning of the INT8 model `ptq` (onnx_cp.quantize.qat): its weights
        trained through fake quantization at the calibrated scales, QAT_EPOCHS at a tenth of the float
        run's learning rate (or of the one given; QAT_LR_ALONE without either). Kept only where it
        measures better than `ptq`: on the validation data (its epoch 0 is `ptq`), else by output
        fidelity against the input model on the first samples of the training data; and, with
        `over_bound` (_Run.bound_of), only within the run's quality bound, which `ptq` met."""
        from onnx_cp.finetune import finetune
        from onnx_cp.quantize.qat import quantized, trainable

        settings, started = self.settings, time.perf_counter()
        form, weights = trainable(ptq)
        teacher = self.run.original if settings.teacher_from_input else None
        train = self.run.data.open("quantization-aware fine-tuning", settings.data,
                                   labels=not settings.teacher_from_input)
        val = self.run.data.open("validation", settings.val) if settings.val is not None else None
        tuned_lr = (float_tuning or {}).get("lr") or settings.lr
        lr = tuned_lr / 10 if tuned_lr else QAT_LR_ALONE
        schedule = {**settings.schedule(), "epochs": QAT_EPOCHS, "steps": None, "lr": lr}
        try:
            tuned = finetune(form, train, val=val, teacher=teacher, seed=self.run.seed, **schedule)
        except OnnxCpError as error:  # an optional last stage: the calibrated model stands
            return ptq, {"epochs": QAT_EPOCHS, "weights": len(weights), "kept": "ptq", "failed": str(error),
                         "seconds": round(time.perf_counter() - started, 3)}
        qat = quantized(ir.from_proto(tuned.model), weights)
        report = {"epochs": QAT_EPOCHS, "lr": tuned.lr, "history": tuned.history, "best_epoch": tuned.best_epoch,
                  "weights": len(weights)}
        if val is not None:
            better = tuned.best_epoch > 0
            report["judged_by"] = f"validation {tuned.metric}"
        else:
            meter = self.run._output_error_meter(self.run.data.open("QAT check", settings.data, labels=False,
                                                                    limit=QAT_CHECK_SAMPLES))
            report["output_error"] = {"ptq": round(meter(ptq), 4), "qat": round(meter(qat), 4)}
            better = report["output_error"]["qat"] < report["output_error"]["ptq"]
            report["judged_by"] = "output fidelity against the input model"
        if better and over_bound is not None:
            report["over_bound"] = over_bound(qat)
            better = report["over_bound"] is None
        report["kept"] = "qat" if better else "ptq"
        report["seconds"] = round(time.perf_counter() - started, 3)
        return (qat if better else ptq), report

    @functools.cached_property
    def _reconstruction_inputs(self) -> np.ndarray:
        """Read once: an accuracy search reconstructs every candidate it fine-tunes."""
        from onnx_cp.data import first_inputs
        from onnx_cp.finetune.reconstruct import DEFAULT_SAMPLES

        data = self.run.data.open("reconstruction", self.settings.data, labels=False, limit=DEFAULT_SAMPLES)
        return first_inputs(data, DEFAULT_SAMPLES)

    def _reconstructed(self, rewritten: ir.Model, tuning: _Tuning) -> ir.Model:
        from onnx_cp.finetune.reconstruct import fits_report, reconstruct_layers

        started = time.perf_counter()
        steps = self.settings.reconstruct_steps
        proto, fits = reconstruct_layers(rewritten, self.run.original, self._reconstruction_inputs,
                                         steps=steps, seed=self.run.seed)
        tuning.report["reconstruction"] = {"layers": fits_report(fits), "steps": steps,
                                           "seconds": round(time.perf_counter() - started, 3)}
        tuning.stages["reconstructed"] = ir.from_proto(proto)
        return tuning.stages["reconstructed"]


def _unbounded_cost(policy: RankPolicy, finetune: FinetuneSettings | None, eval_data, verification: dict) -> list[str]:
    """A speed target alone bounds no accuracy: say loudly what the outputs moved by (a YOLOv8n at a
    data-free 1.5x kept 12% of its top-10 anchors, with exit 0)."""
    worst = verification.get("worst_group_error", 0.0)
    if not isinstance(policy, SpeedupTarget) or finetune is not None or eval_data is not None or worst <= 0.1:
        return []
    return [f"nothing bounds the accuracy this speed-up cost: outputs moved by {worst:.2f} (worst channel group, "
            "random inputs); measure it with --eval-data, or bound it with --max-output-error / --max-accuracy-drop"]


def _quality_limit(budget: QualityBudget) -> search.QualityLimit:
    """What a quality budget bounds, as the searches and the final check read it."""
    if isinstance(budget, AccuracyBudget):
        return search.QualityLimit("accuracy_drop", budget.max_drop, "points of accuracy")
    return search.QualityLimit("output_error", budget.max_error, "output error")


def _over_limit(limit: search.QualityLimit, measured: float) -> str | None:
    """None when `measured` is within `limit`, else what it measured."""
    if measured <= limit.limit:
        return None
    return f"its {limit.key.replace('_', ' ')} measured {measured:.3g}, over the {limit.limit:g} allowed"


def _speed_cost(policy: SpeedupTarget, accuracy: dict | None) -> list[str]:
    """A speed target with no bound still says what it cost in top-1 where labelled data measured it."""
    if policy.within is not None or not accuracy:
        return []
    final = accuracy[list(accuracy)[-1]]
    if accuracy["original"].get("top1") is None or final.get("top1") is None:
        return []
    drop = 100.0 * (accuracy["original"]["top1"] - final["top1"])
    if drop <= SPEED_COST_WARNING:
        return []
    return [f"the {policy.target:g}x speed-up cost {drop:.2f} points of top-1 on the evaluation data; "
            "bound it with --max-accuracy-drop (or --max-output-error) beside --target-speedup"]


def _int8_cost(policy: SpeedupTarget, quantize: dict | None) -> list[str]:
    """A speed target alone met by INT8 still says what its check saw the task lose (ddddocr's CRNN
    at 1.3x: INT8 alone at 2.1x, 92.6% of the calibration lines decoded as before, where the float
    plan kept 95%)."""
    if policy.within is not None:
        return []
    check = (quantize or {}).get("check") or {}
    return [f"INT8 kept {100 * share:.1f}% of {name} on its {check['samples']} calibration samples; bound the "
            "loss with --max-output-error or --max-accuracy-drop beside --target-speedup"
            for name, share in check.get("agreement", {}).items() if 100 * (1 - share) > SPEED_COST_WARNING]


def _speed_short(target: dict) -> list[str]:
    """A speed target alone is not a gate, but a final model measured short of it is said loudly."""
    measured, wanted = target["measured_speedup"], target["target_speedup"]
    if measured >= search.confirmed_speedup(wanted):
        return []
    return [f"the final model measured {measured:.2f}x, short of the {wanted:g}x target (the search measured "
            "its plan faster; see the report's search and quantize entries)"]


def _settings_report(policy: RankPolicy, layers: LayerSelection, solver: SolverSettings,
                     quantize: QuantizeSettings | None, seed: int) -> dict:
    explicit = policy if isinstance(policy, ExplicitRanks) else None
    quality = policy.within if isinstance(policy, SpeedupTarget) else policy
    budget = policy if isinstance(policy, (ErrorBudget, ExplicitRanks)) else None
    return {
        "policy": type(policy).__name__,
        "rank": explicit.rank if explicit else None,
        "layer_ranks": dict(explicit.per_layer) if explicit else {},
        "layers": layers.include, "exclude": layers.exclude, "fuse": layers.fuse,
        "max_error": budget.max_error if budget else None,
        "max_error_on": "layer outputs" if isinstance(policy, ErrorBudget) and policy.data is not None else "kernel",
        "target_speedup": policy.target if isinstance(policy, SpeedupTarget) else None,
        "max_accuracy_drop": quality.max_drop if isinstance(quality, AccuracyBudget) else None,
        "max_output_error": quality.max_error if isinstance(quality, OutputErrorBudget) else None,
        "method": solver.method, "decomposition": solver.decomposition, "seed": seed,
        "quantize": quantize.kind if quantize else None,
    }


def _int8_slower(run: _Run, float_model: ir.Model, int8_model: ir.Model, quantize_report: dict) -> list[str]:
    """The INT8 model's speed over the float one it was made from, in the `quantize` report; a warning
    when it is slower (PP-OCR's 0.7 ms line classifier: 0.61x, its Quantize/Dequantize work outweighing
    its small Convs)."""
    float_speedup, int8_speedup = run.speedups_of([float_model, int8_model])
    quantize_report["speedup_over_float"] = ratio = round(int8_speedup / float_speedup, 3)
    if ratio >= 1:
        return []
    return [f"INT8 measured {ratio:.2f}x the speed of the float model on this CPU; it is written as "
            f"--quantize asked (a speed target or a quality bound would have kept it float)"]


def _quantized_final(model: ir.Model, data, settings: QuantizeSettings, float_units: frozenset[str],
                     fall_back: bool) -> _Candidate:
    """The final model in INT8, its check starting with `float_units` float; with `fall_back` (a
    speed target, which uses INT8 only where it pays), the float model, saying why, when INT8 breaks
    it: NudeNet's YOLOv8n at 2x exited 1 after 14 minutes, its fine-tuned CP model 0.32 from itself
    in INT8 with 294 nodes float."""
    try:
        return _Candidate(model, *_quantize(model, data, settings, float_units))
    except OnnxCpError as error:
        if not fall_back:
            raise
        broken = str(error).split("; nothing written")[0]
        return _Candidate(model, skipped=f"{broken}: the chosen plan was written in float (a larger --int8-max-error "
                                         "accepts more)")


def _quantize(model: ir.Model, data, settings: QuantizeSettings, keep_float: frozenset[str] = frozenset(),
              samples: int | None = None) -> tuple[ir.Model, dict]:
    from onnx_cp.quantize import int8_scheme, quantize_int8
    from onnx_cp.quantize.int8 import DEFAULT_CALIBRATION_SAMPLES

    started = time.perf_counter()
    quantized = quantize_int8(model, data, samples=samples or DEFAULT_CALIBRATION_SAMPLES, target=settings.target,
                              max_output_error=settings.max_output_error, keep_float=keep_float)
    scheme = int8_scheme(quantized)
    return quantized, {"kind": "int8", "format": "QDQ", "scheme": scheme.describe(), "target": scheme.target,
                       "weight_bits": scheme.weight_bits, "cpu_features": list(scheme.cpu_features),
                       "float_nodes": len(scheme.float_nodes), "float_units": list(scheme.float_units),
                       "check": scheme.check,
                       "seconds": round(time.perf_counter() - started, 3)}


def _inferred_shapes(model: ir.Model, input_shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """Static shapes of every value under the given input shapes (for FLOP counts); empty if
    shape inference cannot run (FLOPs are then counted per output pixel)."""
    if model_io.has_external_data(model):
        return {}
    proto = ir.to_proto(model)
    set_input_shapes(proto, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - shapes are a nicety for the report
        return {}
    shapes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    return {**shapes, **_run_shapes(model, proto, input_shapes, shapes)}


def _run_shapes(model: ir.Model, proto: onnx.ModelProto, input_shapes: dict[str, list[int]],
                known: dict[str, list[int]]) -> dict[str, list[int]]:
    """The shapes of layer inputs and outputs that inference left open, from one onnxruntime run on
    random inputs (a CRNN's Gemm behind a Reshape computed from Shape ops: without its row count, its
    MACs and isolated timing would be guesses; its LSTM's sequence length, which its splice unrolls)."""
    from onnx_cp.runtime.inputs import measured_feeds
    from onnx_cp.runtime.session import run_source

    layers = [node for node in proto.graph.node
              if node.op_type in ("Conv", "Gemm", "LSTM") and node.input and node.output]
    wanted = [n for node in layers for n in (node.input[0], node.output[0]) if n and n not in known]
    if not wanted:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(wanted) if n not in outputs)
    names = [o.name for o in probe.graph.output]
    try:
        values = run_source(probe.SerializeToString(), measured_feeds(model, input_shapes), "model")
    except OnnxCpError:
        return {}  # shapes are a nicety: MACs are then counted per output pixel
    return {n: list(v.shape) for n, v in zip(names, values) if n in wanted}


def _accuracy(original: ir.Model, stages: dict[str, ir.Model], dataset) -> dict[str, AccuracyResult] | None:
    """Accuracy of the input model, then of each stage (decomposed, reconstructed, finetuned,
    +int8) with its agreement with the input model; None when its output is not class scores."""
    from onnx_cp.measure import evaluate
    from onnx_cp.measure.accuracy import NotClassScores

    try:
        accuracy = {"original": evaluate(original, dataset, threads=usable_cores())}
    except NotClassScores:
        return None
    for stage, model in stages.items():
        accuracy[stage] = evaluate(model, dataset, reference=original, threads=usable_cores())
    return accuracy


def _fidelity(original: ir.Model, stages: dict[str, ir.Model], dataset) -> dict[str, dict]:
    """Each stage's outputs against the input model's on the evaluation data, for models whose output
    is not class scores (a detector: box and class-score rows apart, top-10 anchors kept)."""
    from onnx_cp.measure.outputs import ReferenceOutputs

    reference = ReferenceOutputs(original, dataset)
    return {stage: reference.compare(model).to_json() for stage, model in stages.items()}


def _latency(original: ir.Model, final: ir.Model, shapes: dict, threads: int, seed: int) -> dict:
    from onnx_cp.measure import benchmark_latency, layer_profile

    return {
        "latency": benchmark_latency([original, final], names=["original", "optimized"], threads=threads,
                                     input_shapes=shapes, seed=seed, min_seconds=MEASURE_SECONDS).to_json(),
        "profile": {"before": layer_profile(original, threads=threads, input_shapes=shapes,
                                            label="original").to_json(),
                    "after": layer_profile(final, threads=threads, input_shapes=shapes,
                                           label="optimized").to_json()},
    }


def _totals(original: ir.Model, rewritten: ir.Model, rows: list[dict]) -> dict:
    done = [r for r in rows if r["status"] == "decomposed"]
    return {
        "convs": len(rows),
        "decomposed": len(done),
        "skipped": len(rows) - len(done),
        "conv_macs_before": sum(r["macs_before"] or 0 for r in rows),
        "conv_macs_after": sum(r["macs_after"] or 0 for r in rows),
        "params_before": _param_count(original),
        "params_after": _param_count(rewritten),
    }


def _param_count(model: ir.Model) -> int:
    """Weights held as initializers or Constant nodes (paddle2onnx's)."""
    initializers = sum(v.const_value.size if v.const_value is not None else 0
                       for g in model.graphs() for v in g.initializers.values())
    constants = sum(node.attributes["value"].as_tensor().size
                    for node in ir.traversal.RecursiveGraphIterator(model.graph)
                    if node.op_type == "Constant" and "value" in node.attributes)
    return initializers + constants


__all__ = ["OptimizeResult", "optimize"]
