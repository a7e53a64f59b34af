"""The Python API that the CLI is a thin layer over."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnx_cp import model_io, select, verify
from onnx_cp.errors import OnnxCpError
from onnx_cp.rewrite import ConvSite, CPConvPass, find_conv_sites, reconstruct, select_sites


@dataclass
class OptimizeResult:
    """The rewritten model (an onnx.ModelProto if one was given, else an onnx_ir.Model) and the
    report: per-layer rows, totals and verification (see README, "The report")."""

    model: onnx.ModelProto | ir.Model
    report: dict = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return any(row["status"] == "decomposed" for row in self.report.get("layers", []))


@dataclass
class _Solved:
    """A solver result in the form the pass and the rank search need."""

    factors: list[np.ndarray]
    rel_error: float
    max_component_norm: float = 0.0
    seconds: float = 0.0


def optimize(
    model: model_io.ModelLike,
    *,
    rank: int | None = None,
    layer_ranks: dict[str, int] | None = None,
    layers: str | None = None,
    exclude: str | None = None,
    max_error: float = select.DEFAULT_MAX_ERROR,
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
    eval_data: object | None = None,
    measure_latency: bool = False,
    threads: int = 1,
) -> OptimizeResult:
    """Replace the eligible Convs of `model` by CP chains.

    rank / layer_ranks: explicit ranks (all layers / per layer name), clipped to each layer's
    FLOP break-even. Layers without one get the data-free default: the smallest rank whose
    kernel relative error is at most `max_error` among ranks that at least halve its MACs.
    layers / exclude: regular expressions (re.search) on Conv layer names.
    decomposer(kernel (T,S,kh,kw) float64, rank) -> factors or a result with .factors; defaults
    to onnx_cp.cp.decompose (NLS) run over layers in parallel worker processes.
    finetune_data: training data (.npz path, image folder, Dataset or arrays) to fine-tune the
    rewritten model on, with `val_data` for validation; `teacher_from_input` distils from the
    input model (needs no labels); `finetune_options` go to onnx_cp.finetune.finetune
    (epochs, steps, lr, batch_size, ...).
    eval_data: labelled or unlabelled data to measure accuracy (or agreement with the input
    model) before decomposition, after it, and after fine-tuning (default: val_data).
    measure_latency: benchmark the input and output models with onnxruntime (`threads` threads)
    and profile them per layer.
    The input is never modified.
    """
    started = time.perf_counter()
    source = str(model) if isinstance(model, (str, Path)) else None
    original = model_io.to_ir(model)
    had_external_data = model_io.has_external_data(original)
    if model_io.initializer_bytes(original) < model_io.PROTOBUF_SAFE_BYTES:
        ir.external_data.load_to_model(original)  # small enough to work in memory
    if not max_error > 0:
        raise OnnxCpError(f"max_error must be positive, got {max_error}")
    shapes = verify.fill_input_shapes(original, input_shapes)
    rewritten = original.clone()

    sites = find_conv_sites(rewritten, _inferred_shapes(rewritten, shapes))
    select_sites(sites, layers, exclude)
    request = select.RankRequest(rank=rank, per_layer=dict(layer_ranks or {}), max_error=max_error)
    select.check_layer_names(request, sites)
    solve_many = _solver(decomposer, method, workers, seed)
    choices = select.plan_ranks(sites, request, solve_many)

    solved = {_key(k, c.rank): r for name, c in choices.items()
              for k, r in zip(_site(sites, name).group_kernels(), c.results)}
    cp_pass = CPConvPass(
        rank_for=lambda site: choices[site.name].rank if site.name in choices else None,
        decomposer=lambda kernel, r: solved[_key(kernel, r)],
        sites=sites,
    )
    cp_pass(rewritten)
    rows = [o.as_dict() for o in cp_pass.outcomes]
    for row in rows:
        if row["name"] in choices and choices[row["name"]].note:
            row["note"] = choices[row["name"]].note

    report = {
        "input": source,
        "layers": rows,
        "totals": _totals(original, rewritten, rows),
        "input_shapes": shapes,
        "settings": {"rank": rank, "layer_ranks": layer_ranks or {}, "layers": layers,
                     "exclude": exclude, "max_error": max_error, "method": method, "seed": seed},
    }
    if verify_outputs:
        report["verification"] = verify.verify_rewrite(original, rewritten, shapes, seed=seed)
    final = rewritten
    if finetune_data is not None and report["totals"]["decomposed"]:
        final = _finetune(rewritten, original, finetune_data, val_data, teacher_from_input,
                          finetune_options or {}, seed, report)
    eval_data = eval_data if eval_data is not None else val_data
    if eval_data is not None:
        report["accuracy"] = _accuracy(original, rewritten, final, eval_data, threads)
    if measure_latency:
        report.update(_latency(original, final, shapes, threads, seed))
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["had_external_data"] = had_external_data
    output = ir.to_proto(final) if isinstance(model, onnx.ModelProto) else final
    return OptimizeResult(model=output, report=report)


def _finetune(rewritten: ir.Model, original: ir.Model, train, val, teacher_from_input: bool,
              options: dict, seed: int, report: dict) -> ir.Model:
    from onnx_cp.finetune import finetune  # torch is imported only when fine-tuning

    tuned = finetune(rewritten, train, val=val, teacher=original if teacher_from_input else None,
                     seed=seed, **options)
    report["finetune"] = {
        "history": tuned.history, "best_epoch": tuned.best_epoch, "metric": tuned.metric,
        "seconds": tuned.seconds, "samples_per_second": tuned.samples_per_second,
        "teacher": "input model" if teacher_from_input else None, "options": options,
    }
    return ir.from_proto(tuned.model)


def _accuracy(original: ir.Model, rewritten: ir.Model, final: ir.Model, data, threads: int) -> dict:
    from onnx_cp.data import open_dataset
    from onnx_cp.measure import evaluate

    dataset = open_dataset(data) if isinstance(data, (str, Path)) else data
    accuracy = {"original": evaluate(original, dataset, threads=threads),
                "decomposed": evaluate(rewritten, dataset, reference=original, threads=threads)}
    if final is not rewritten:
        accuracy["finetuned"] = evaluate(final, dataset, reference=original, threads=threads)
    return accuracy


def _latency(original: ir.Model, final: ir.Model, shapes: dict, threads: int, seed: int) -> dict:
    from onnx_cp.measure import benchmark_latency, layer_profile

    return {
        "latency": benchmark_latency([original, final], names=["original", "optimized"],
                                     threads=threads, input_shapes=shapes, seed=seed),
        "profile": {"before": layer_profile(original, threads=threads, input_shapes=shapes, label="original"),
                    "after": layer_profile(final, threads=threads, input_shapes=shapes, label="optimized")},
    }


def _solver(decomposer, method: str, workers: int | None, seed: int) -> select.SolveMany:
    """A batched solver: the user's decomposer in a loop, or onnx_cp.cp in worker processes."""
    if decomposer is not None:
        return lambda jobs: [_normalise(decomposer(k, r), k) for k, r in jobs]
    from onnx_cp.cp import decompose_many

    def solve_many(jobs: Sequence[tuple[np.ndarray, int]]) -> list:
        if not jobs:
            return []
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


def _inferred_shapes(model: ir.Model, input_shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """Static shapes of every value under the given input shapes (for FLOP counts); empty if
    shape inference cannot run (FLOPs are then counted per output pixel)."""
    if model_io.has_external_data(model):
        return {}
    proto = ir.to_proto(model)
    for value in proto.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in input_shapes[value.name]:
                dims.add().dim_value = d
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
