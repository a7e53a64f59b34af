"""The Python API that the CLI is a thin layer over."""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnx_cp import budget, model_io, select, verify
from onnx_cp.errors import UsageError
from onnx_cp.rewrite import ConvSite, CPConvPass, LayerOutcome, find_conv_sites, reconstruct, select_sites

# Adam steps per CP chain in layer-wise reconstruction before fine-tuning (onnx_cp.finetune.reconstruct,
# which imports torch: the default lives here so the API stays importable without it).
DEFAULT_RECONSTRUCT_STEPS = 300
SENSITIVITY_SAMPLES = 512
QUICK_ALS_SWEEPS = 20  # ~0.02-0.04 above the converged error: enough to screen and search ranks


@dataclass
class OptimizeResult:
    """The rewritten model (an onnx.ModelProto if one was given, else an onnx_ir.Model) and the
    report: per-layer rows, totals and verification (see README, "The report")."""

    model: onnx.ModelProto | ir.Model
    report: dict = field(default_factory=dict)


@dataclass
class _Solved:
    """A solver result in the form the pass and the rank search need."""

    factors: list[np.ndarray]
    rel_error: float


def optimize(
    model: model_io.ModelLike,
    *,
    rank: int | None = None,
    layer_ranks: dict[str, int] | None = None,
    layers: str | None = None,
    exclude: str | None = None,
    max_error: float = select.DEFAULT_MAX_ERROR,
    error_data: object | None = None,
    target_speedup: float | None = None,
    max_accuracy_drop: float | None = None,
    decomposer: Callable[[np.ndarray, int], object] | None = None,
    method: str = "nls",
    workers: int | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    verify_outputs: bool = True,
    seed: int = 0,
    finetune_data: object | None = None,
    val_data: object | None = None,
    teacher_from_input: bool = False,
    finetune_options: dict | None = None,
    reconstruct_steps: int = DEFAULT_RECONSTRUCT_STEPS,
    eval_data: object | None = None,
    measure_latency: bool = False,
    quantize: str | None = None,
    calibration_data: object | None = None,
    threads: int = 1,
) -> OptimizeResult:
    """Replace the eligible Convs of `model` by CP chains.

    Ranks, one way of: `rank` / `layer_ranks` (explicit, per model / per layer name, clipped to
    each layer's FLOP break-even); `target_speedup` (the whole model's onnxruntime latency must
    drop that many times, measured); `max_accuracy_drop` (points of top-1, or of agreement with
    the input model without labels, on `eval_data`, after fine-tuning when `finetune_data` is
    given: the fastest model found within it); else the data-free default: per layer the smallest
    grid rank whose kernel relative error is at most `max_error` among ranks that halve its MACs
    (with `error_data`, sample inputs: the layer output's relative error on them instead).
    A budget that cannot be met raises BudgetError (the CLI's exit code 3).
    layers / exclude: regular expressions (re.search) on Conv layer names.
    decomposer(kernel (T,S,kh,kw) float64, rank) -> factors or a result with .factors; defaults
    to onnx_cp.cp (NLS), run over layers in parallel worker processes.
    finetune_data: training data (.npz path, image folder, Dataset or arrays); `val_data` picks the
    best epoch; `teacher_from_input` distils from the input model (needs no labels);
    `finetune_options` go to onnx_cp.finetune.finetune (epochs, steps, lr, batch_size, ...).
    Before fine-tuning, `reconstruct_steps` Adam steps fit each CP chain to the output of the layer
    it replaced on the first samples of `finetune_data` (onnx_cp.finetune.reconstruct; 0: off).
    eval_data: data to measure accuracy (or agreement) before decomposition, after it, and after
    fine-tuning (default: val_data).
    measure_latency: benchmark input and output with onnxruntime (`threads`) and profile per layer.
    quantize="int8": static INT8 quantization of the result, calibrated on `calibration_data`
    (default: finetune_data, else eval_data).
    The input is never modified.
    """
    started = time.perf_counter()
    if sum(x is not None for x in (rank, target_speedup, max_accuracy_drop)) > 1:
        raise UsageError("give one of rank, target_speedup and max_accuracy_drop")
    if not max_error > 0:
        raise UsageError(f"max_error must be positive, got {max_error}")
    if error_data is not None and (rank is not None or layer_ranks or target_speedup or max_accuracy_drop):
        raise UsageError("error_data sets what the default max_error policy measures; it does not combine "
                         "with explicit ranks or budgets")
    if reconstruct_steps < 0:
        raise UsageError(f"reconstruct_steps must be 0 (off) or positive, got {reconstruct_steps}")
    run = _Run(model, input_shapes, layers, exclude, _solver(decomposer, method, workers, seed),
               threads, seed)
    eval_data = eval_data if eval_data is not None else val_data
    tune = _Tuner(run, finetune_data, val_data, teacher_from_input, finetune_options or {}, reconstruct_steps)
    request = select.RankRequest(rank=rank, per_layer=dict(layer_ranks or {}), max_error=max_error)
    select.check_layer_names(request, run.sites)
    report: dict = {"input": run.source, "input_shapes": run.shapes, "settings": {
        "rank": rank, "layer_ranks": layer_ranks or {}, "layers": layers, "exclude": exclude,
        "max_error": max_error, "max_error_on": "kernel" if error_data is None else "layer outputs",
        "target_speedup": target_speedup, "max_accuracy_drop": max_accuracy_drop,
        "method": method, "seed": seed, "quantize": quantize}}

    final = None
    if target_speedup is not None:
        choices, final, report["search"] = run.search_speedup(target_speedup)
    elif max_accuracy_drop is not None:
        if eval_data is None:
            raise UsageError("max_accuracy_drop needs data to measure accuracy on (eval_data or val_data)")
        choices, final, report["search"] = run.search_accuracy(max_accuracy_drop, eval_data, tune)
    else:
        choices = select.plan_ranks(run.sites, request, run.solve_many, _output_error(run, error_data))
    rewritten, outcomes = run.build(choices)
    report["layers"] = _rows(outcomes, choices)
    report["totals"] = _totals(run.original, rewritten, report["layers"])
    if verify_outputs:
        report["verification"] = verify.verify_rewrite(run.original, rewritten, run.shapes, seed=seed)
    stages = {"decomposed": rewritten}
    if final is None and report["totals"]["decomposed"]:
        final = tune(rewritten, report)
        stages.update(tune.stages)
    final = rewritten if final is None else final
    if final is not rewritten:
        stages["finetuned"] = final
    if quantize:
        final = _quantize(final, quantize, calibration_data or finetune_data or eval_data, report)
        stages[f"{'finetuned' if 'finetuned' in stages else 'decomposed'}+int8"] = final
    if eval_data is not None:
        report["accuracy"] = _accuracy(run.original, stages, eval_data, threads)
    if measure_latency:
        report.update(_latency(run.original, final, run.shapes, threads, seed))
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["had_external_data"] = run.had_external_data
    output = ir.to_proto(final) if isinstance(model, onnx.ModelProto) else final
    return OptimizeResult(model=output, report=report)


class _Run:
    """The input model, its Conv sites and how to build a rewritten copy for any rank choice."""

    def __init__(self, model, input_shapes, layers, exclude, solve_many, threads: int, seed: int):
        self.source = str(model) if isinstance(model, (str, Path)) else None
        self.original = model_io.to_ir(model)
        self.had_external_data = model_io.has_external_data(self.original)
        if model_io.initializer_bytes(self.original) < model_io.PROTOBUF_SAFE_BYTES:
            ir.external_data.load_to_model(self.original)  # small enough to work in memory
        self.shapes = verify.fill_input_shapes(self.original, input_shapes)
        self.value_shapes = _inferred_shapes(self.original, self.shapes)
        self.sites = find_conv_sites(self.original, self.value_shapes)
        select_sites(self.sites, layers, exclude)
        self.solve_many = solve_many
        self.threads = threads
        self.seed = seed
        self.unchosen_reason = "no rank chosen"

    def build(self, choices: dict[str, select.RankChoice]) -> tuple[ir.Model, list[LayerOutcome]]:
        model = self.original.clone()
        sites = find_conv_sites(model, self.value_shapes)
        for site, planned in zip(sites, self.sites):
            site.reason = planned.reason or (None if site.name in choices else self.unchosen_reason)
        solved = {_key(k, c.rank): r for name, c in choices.items()
                  for k, r in zip(_site(sites, name).group_kernels(), c.results)}
        cp_pass = CPConvPass(rank_for=lambda site: choices[site.name].rank if site.name in choices else None,
                             decomposer=lambda kernel, r: solved[_key(kernel, r)], sites=sites)
        cp_pass(model)
        return model, cp_pass.outcomes

    def build_model(self, choices: dict[str, select.RankChoice]) -> ir.Model:
        return self.build(choices)[0]

    def timing(self) -> budget.Timing:
        from onnx_cp.measure import benchmark_latency, layer_profile

        total = benchmark_latency([self.original], threads=self.threads, input_shapes=self.shapes,
                                  seed=self.seed)["models"][0]["median_ms"]
        profile = layer_profile(self.original, threads=self.threads, input_shapes=self.shapes, seed=self.seed)
        profiled = sum(layer["ms"] for layer in profile["layers"]) or 1.0
        return budget.Timing(total, {layer["name"]: total * layer["ms"] / profiled for layer in profile["layers"]})

    def menus(self, timing: budget.Timing) -> list[budget.LayerMenu]:
        return budget.layer_menus(self.sites, self.solve_many, timing.layer_ms, self.threads)

    def speedup_of(self, model: ir.Model) -> float:
        from onnx_cp.measure import benchmark_latency

        result = benchmark_latency([self.original, model], threads=self.threads, input_shapes=self.shapes,
                                   seed=self.seed)
        return result["models"][1]["speedup_vs_first"]

    def search_speedup(self, target: float):
        self.unchosen_reason = "kept: the speed-up target was met without decomposing it"
        timing = self.timing()
        choices, model, trace = budget.search_speedup(self.menus(timing), timing, target,
                                                      self.build_model, self.speedup_of)
        return choices, None, trace

    def search_accuracy(self, max_drop: float, eval_data, tune: _Tuner):
        from onnx_cp.measure import evaluate

        self.unchosen_reason = "kept: decomposing it cost more accuracy than it saved time"
        timing = self.timing()
        menus = self.menus(timing)
        full, sample = _datasets(eval_data)

        def drop_meter(dataset) -> Callable[[ir.Model], float]:
            baseline = evaluate(self.original, dataset, threads=self.threads)
            return lambda model: budget.accuracy_drop(
                baseline, evaluate(model, dataset, reference=self.original, threads=self.threads))

        budget.set_sensitivities(menus, self.build_model, drop_meter(sample))
        drop_on_full = drop_meter(full)
        tuning_reports: list[dict] = []

        def tune_and_score(model: ir.Model) -> tuple[float, ir.Model]:
            tuning_reports.append({})
            tuned = tune(model, tuning_reports[-1])
            return drop_on_full(tuned), tuned

        choices, tuned, trace = budget.search_accuracy(menus, timing, max_drop, self.build_model,
                                                       tune_and_score)
        for step, tuning in zip(trace, tuning_reports):
            step.update(tuning)
        return choices, tuned, {"trace": trace, "sensitivity": {m.site.name: m.weight for m in menus}}


class _Tuner:
    """Fine-tunes a rewritten model when training data was given; otherwise returns it as is."""

    def __init__(self, run: _Run, train, val, teacher_from_input: bool, options: dict, reconstruct_steps: int):
        self.run, self.train, self.val = run, train, val
        self.teacher_from_input, self.options = teacher_from_input, options
        self.reconstruct_steps = reconstruct_steps
        self.stages: dict[str, ir.Model] = {}  # intermediate models of the last call

    def __call__(self, rewritten: ir.Model, report: dict) -> ir.Model:
        if self.train is None:
            return rewritten
        from onnx_cp.finetune import finetune  # torch is imported only when fine-tuning

        start = self._reconstructed(rewritten, report) if self.reconstruct_steps else rewritten
        teacher = self.run.original if self.teacher_from_input else None
        tuned = finetune(start, self.train, val=self.val, teacher=teacher, seed=self.run.seed,
                         **self.options)
        report["finetune"] = {
            "history": tuned.history, "best_epoch": tuned.best_epoch, "metric": tuned.metric,
            "seconds": tuned.seconds, "samples_per_second": tuned.samples_per_second,
            "teacher": "input model" if self.teacher_from_input else None, "options": self.options,
        }
        return ir.from_proto(tuned.model)

    @functools.cached_property
    def _reconstruction_inputs(self) -> np.ndarray:
        """Read once: an accuracy search reconstructs every candidate it fine-tunes."""
        from onnx_cp.data import first_inputs
        from onnx_cp.finetune.reconstruct import DEFAULT_SAMPLES

        return first_inputs(self.train, DEFAULT_SAMPLES)

    def _reconstructed(self, rewritten: ir.Model, report: dict) -> ir.Model:
        from onnx_cp.finetune.reconstruct import fits_report, reconstruct_layers

        started = time.perf_counter()
        proto, fits = reconstruct_layers(rewritten, self.run.original, self._reconstruction_inputs,
                                         steps=self.reconstruct_steps, seed=self.run.seed)
        report["reconstruction"] = {"layers": fits_report(fits), "steps": self.reconstruct_steps,
                                    "seconds": round(time.perf_counter() - started, 3)}
        self.stages = {"reconstructed": ir.from_proto(proto)}
        return self.stages["reconstructed"]


def _datasets(data) -> tuple[object, object]:
    """The evaluation data and a small sample of it (for per-layer sensitivities)."""
    from onnx_cp.data import open_dataset

    if isinstance(data, (str, Path)):
        return open_dataset(data), open_dataset(data, limit=SENSITIVITY_SAMPLES)
    return data, data


def _solver(decomposer, method: str, workers: int | None, seed: int) -> select.SolveMany:
    """A batched solver: the user's decomposer in a loop, or onnx_cp.cp in worker processes."""
    if decomposer is not None:
        return lambda jobs, quick=False: [_normalise(decomposer(k, r), k) for k, r in jobs]
    from onnx_cp.cp import decompose_many

    def solve_many(jobs: Sequence[tuple[np.ndarray, int]], quick: bool = False) -> list:
        if not jobs:
            return []
        if quick:
            return decompose_many(list(jobs), workers=workers, method="als", max_iter=QUICK_ALS_SWEEPS, seed=seed,
                                  desc="estimating")
        return decompose_many(list(jobs), workers=workers, method=method, seed=seed)

    return solve_many


def _normalise(result: object, kernel: np.ndarray) -> _Solved:
    factors = [np.asarray(f, dtype=np.float64) for f in getattr(result, "factors", result)]
    norm = float(np.linalg.norm(kernel))
    error = float(np.linalg.norm(kernel - reconstruct(factors))) / norm if norm > 0 else 0.0
    return _Solved(factors=factors, rel_error=error)


def _key(kernel: np.ndarray, rank: int) -> tuple[str, int]:
    return hashlib.sha1(np.ascontiguousarray(kernel).tobytes()).hexdigest(), rank


def _site(sites: Sequence[ConvSite], name: str) -> ConvSite:
    return next(s for s in sites if s.name == name)


def _rows(outcomes: Sequence[LayerOutcome], choices: dict[str, select.RankChoice]) -> list[dict]:
    rows = [o.as_dict() for o in outcomes]
    for row in rows:
        if row["name"] in choices and choices[row["name"]].note:
            row["note"] = choices[row["name"]].note
    return rows


def _quantize(model: ir.Model, kind: str, data, report: dict) -> ir.Model:
    if kind != "int8":
        raise UsageError(f"quantize={kind!r}: only 'int8' is supported")
    if data is None:
        raise UsageError("INT8 quantization needs calibration data (calibration_data, finetune_data or eval_data)")
    from onnx_cp.quantize import int8_scheme, quantize_int8

    started = time.perf_counter()
    quantized = quantize_int8(model, data)
    report["quantize"] = {"kind": "int8", "format": "QDQ", "scheme": int8_scheme(quantized).describe(),
                          "seconds": round(time.perf_counter() - started, 3)}
    return quantized


def _inferred_shapes(model: ir.Model, input_shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """Static shapes of every value under the given input shapes (for FLOP counts); empty if
    shape inference cannot run (FLOPs are then counted per output pixel)."""
    if model_io.has_external_data(model):
        return {}
    proto = ir.to_proto(model)
    verify.set_input_shapes(proto, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - shapes are a nicety for the report
        return {}
    shapes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    return shapes


def _output_error(run: _Run, data) -> select.ErrorOf | None:
    if data is None:
        return None
    from onnx_cp.data import first_inputs
    from onnx_cp.layer_error import DEFAULT_SAMPLES, OutputError

    return OutputError(run.original, run.sites, first_inputs(data, DEFAULT_SAMPLES))


def _accuracy(original: ir.Model, stages: dict[str, ir.Model], data, threads: int) -> dict:
    """Accuracy of the input model, then of each stage (decomposed, reconstructed, finetuned,
    +int8) with its agreement with the input model."""
    from onnx_cp.data import open_dataset
    from onnx_cp.measure import evaluate

    dataset = open_dataset(data) if isinstance(data, (str, Path)) else data
    accuracy = {"original": evaluate(original, dataset, threads=threads)}
    for stage, model in stages.items():
        accuracy[stage] = evaluate(model, dataset, reference=original, threads=threads)
    return accuracy


def _latency(original: ir.Model, final: ir.Model, shapes: dict, threads: int, seed: int) -> dict:
    from onnx_cp.measure import benchmark_latency, layer_profile

    return {
        "latency": benchmark_latency([original, final], names=["original", "optimized"],
                                     threads=threads, input_shapes=shapes, seed=seed),
        "profile": {"before": layer_profile(original, threads=threads, input_shapes=shapes, label="original"),
                    "after": layer_profile(final, threads=threads, input_shapes=shapes, label="optimized")},
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
    return sum(
        int(np.prod(v.const_value.shape.numpy())) if v.const_value is not None else 0
        for g in model.graphs() for v in g.initializers.values()
    )
