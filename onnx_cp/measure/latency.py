"""onnxruntime CPU latency of one or more models, measured side by side.

Runs are interleaved in blocks (A A A ... B B B ... A A A ...) after a warm-up, so that a noisy,
shared machine slows every model alike and the ratios stay meaningful even when absolute times
drift. Blocks, not single runs: a big model evicts a small one's weights and buffers from the CPU
caches, so with A B A B the model run after a big one is measured cold (charnet's CP model ran
1.3x slower right after the original than right after itself). Each block starts with one
unrecorded run, so every model is measured as it runs in service, warm."""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from onnx_cp import __version__
from onnx_cp.errors import UsageError
from onnx_cp.progress import bar
from onnx_cp.runtime.cpu import cpu_features, cpu_name
from onnx_cp.runtime.inputs import check_shape_names, measured_feeds, measured_shapes
from onnx_cp.runtime.model_io import ModelLike
from onnx_cp.runtime.session import (
    LoadedModel,
    load,
    make_session,
    resolve_threads,
    run,
    session_options,
)

DEFAULT_RUNS = 100
DEFAULT_WARMUP = 10
DEFAULT_BLOCK = 10  # recorded runs of one model in a row
MAX_RUNS = 100_000  # of min_seconds
NOISY_SPREAD = 1.5  # p90 / p10 above this: the table says the numbers are noisy


@dataclass
class ModelLatency:
    """One model's latency in milliseconds over its recorded runs."""

    name: str
    path: str | None
    input_shapes: dict[str, list[int]]
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    ratio_to_first: float | None  # None when the first model's median is 0
    speedup_vs_first: float | None  # None when this model's median is 0


@dataclass(kw_only=True)
class LatencyResult:
    """Models measured side by side and how; the fields are the `onnx-cp bench` JSON keys."""

    models: list[ModelLatency]
    threads: int
    inter_op_threads: int = 1  # session_options fixes inter-op threads and the execution mode
    execution_mode: str = "sequential"
    batch: int
    optimization: str
    optimization_level: str
    runs: int
    warmup: int
    block: int
    order: str = "interleaved blocks"
    onnxruntime: str = ort.__version__
    provider: str = "CPUExecutionProvider"
    machine: dict

    def fast_speedup(self, index: int) -> float:
        """Model `index`'s speed-up over the first at the 10th percentile of their run times: on a
        shared machine interference only adds time, so the fast runs say what each model costs
        (charnet vs models/charnet-cp.onnx, three benchmarks of 2000 runs on a 2-core AMD EPYC:
        medians 5.85x-6.89x, 10th percentiles 6.8x-6.9x)."""
        fastest = self.models[index].p10_ms
        return self.models[0].p10_ms / fastest if fastest > 0 else math.inf

    def to_json(self) -> dict:
        """The `onnx-cp bench` JSON (see README)."""
        return {"tool": f"onnx-cp {__version__}", "kind": "latency", **dataclasses.asdict(self)}


def benchmark_latency(
    models: ModelLike | Sequence[ModelLike],
    *,
    threads: int | str | None = 1,
    batch: int = 1,
    input_shapes: dict[str, list[int]] | None = None,
    runs: int = DEFAULT_RUNS,
    warmup: int = DEFAULT_WARMUP,
    optimization: str = "all",
    names: Sequence[str] | None = None,
    seed: int = 0,
    block: int = DEFAULT_BLOCK,
    min_seconds: float = 0.0,
) -> LatencyResult:
    """Median / p10 / p90 latency (ms) of each model and its ratio to the first model.

    threads: onnxruntime intra-op threads (inter-op is 1, execution sequential); 0 or "all" =
    every core. optimization: "all" (ORT_ENABLE_ALL), "extended", "basic" or "none".
    block: recorded runs of one model in a row, after one unrecorded run (see the module docstring).
    min_seconds: more runs than `runs` when the recorded runs of all models would take less (the
    warm-up's times tell): a 0.07 ms model's 100 runs are 7 ms, which one preemption skews by 10%."""
    models = _as_list(models)
    if not models:
        raise UsageError("no model to benchmark")
    if runs < 1 or warmup < 0 or block < 1:
        raise UsageError(f"runs and block must be >= 1 and warmup >= 0 (got runs={runs}, warmup={warmup}, "
                         f"block={block})")
    threads = resolve_threads(threads)
    labels = _labels(models, names)
    loaded = [load(m, label) for m, label in zip(models, labels)]
    check_shape_names([m.ir_model for m in loaded], input_shapes)
    options = session_options(threads=threads, optimization=optimization)
    sessions = [make_session(m, options) for m in loaded]
    feeds = [measured_feeds(m.ir_model, input_shapes, batch, seed) for m in loaded]
    times = _interleaved_times(sessions, feeds, [m.path or m.label for m in loaded],
                               runs=runs, warmup=warmup, block=block, min_seconds=min_seconds)
    first = float(np.median(times[0]))
    return LatencyResult(
        models=[_model_latency(m, samples, first, input_shapes, batch) for m, samples in zip(loaded, times)],
        threads=threads,
        batch=batch,
        optimization=optimization,
        optimization_level=str(options.graph_optimization_level).split(".")[-1],
        runs=len(times[0]),
        warmup=warmup,
        block=block,
        machine=_machine(),
    )


def _interleaved_times(sessions: list[ort.InferenceSession], feeds: list[dict], names: list[str], *,
                       runs: int, warmup: int, block: int, min_seconds: float = 0.0) -> list[list[float]]:
    """Milliseconds of each recorded run, per model (see the module docstring); names are for
    error messages."""
    models = list(zip(sessions, feeds, names))
    progress = bar(warmup + runs, desc="benchmarking")
    warm_ms = []  # the median warm-up run of each model (the first runs of a session are slow)
    for session, feed, name in models:
        warm = [_timed(session, feed, name) for _ in range(warmup or int(min_seconds > 0))]
        warm_ms.append(float(np.median(warm)) if warm else 0.0)
    progress.update(warmup)
    if min_seconds > 0:
        runs = min(max(runs, math.ceil(min_seconds * 1e3 / max(sum(warm_ms), 1e-6))), MAX_RUNS)
        progress.total = warmup + runs
    times: list[list[float]] = [[] for _ in models]
    while len(times[0]) < runs:
        count = min(block, runs - len(times[0]))
        for (session, feed, name), samples in zip(models, times):
            run(session, feed, name)  # back in the caches after the other models
            samples.extend(_timed(session, feed, name) for _ in range(count))
        progress.update(count)
    progress.close()
    return times


def _timed(session: ort.InferenceSession, feed: dict, name: str) -> float:
    start = time.perf_counter()
    run(session, feed, name)
    return (time.perf_counter() - start) * 1e3


def _model_latency(model: LoadedModel, samples: list[float], first_median: float,
                   input_shapes: dict[str, list[int]] | None, batch: int) -> ModelLatency:
    ms = np.asarray(samples)
    median = float(np.median(ms))
    return ModelLatency(
        name=model.label,
        path=model.path,
        input_shapes=measured_shapes(model.ir_model, input_shapes, batch),
        median_ms=median,
        p10_ms=float(np.percentile(ms, 10)),
        p90_ms=float(np.percentile(ms, 90)),
        mean_ms=float(ms.mean()),
        min_ms=float(ms.min()),
        runs=len(samples),
        ratio_to_first=median / first_median if first_median > 0 else None,
        speedup_vs_first=first_median / median if median > 0 else None,
    )


def _as_list(models) -> list:
    if isinstance(models, (list, tuple)):
        return list(models)
    return [models]


def _labels(models: list, names: Sequence[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(models):
            raise UsageError(f"{len(names)} names given for {len(models)} models")
        return list(names)
    labels = []
    for i, model in enumerate(models):
        if isinstance(model, (str, os.PathLike)):
            labels.append(os.path.splitext(os.path.basename(os.fspath(model)))[0])
        else:
            labels.append(f"model{i}")
    # Two files with the same stem in different folders: keep the labels apart.
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return unique


def _machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_name(),
        "cpu_features": cpu_features(),
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
    }


def format_table(result: LatencyResult) -> str:
    """The `onnx-cp bench` table: model, median, p10, p90, ratio to the first model."""
    rows = [("model", "median ms", "p10 ms", "p90 ms", "ratio", "speedup")]
    for m in result.models:
        rows.append((
            m.name,
            f"{m.median_ms:.3f}",
            f"{m.p10_ms:.3f}",
            f"{m.p90_ms:.3f}",
            f"{m.ratio_to_first:.3f}" if m.ratio_to_first is not None else "-",
            f"{m.speedup_vs_first:.2f}x" if m.speedup_vs_first is not None else "-",
        ))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    spread = max((m.p90_ms / m.p10_ms for m in result.models if m.p10_ms > 0), default=1)
    if spread > NOISY_SPREAD:
        lines.append(f"note: p90/p10 up to {spread:.1f}x: the machine is busy and long runs are "
                     f"preempted more often; compare the p10 columns too, or rerun when it is quiet")
    lines.append(
        f"({result.runs} runs in interleaved blocks of {result.block} after {result.warmup} warm-up, "
        f"{result.threads} thread(s), batch {result.batch}, "
        f"graph optimization {result.optimization}, onnxruntime {result.onnxruntime})"
    )
    return "\n".join(lines)
