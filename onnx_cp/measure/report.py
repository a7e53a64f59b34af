"""Reports people can read: report.json, report.md and PNG plots in one folder.

`write_report` takes the optimize report, a bench JSON or an eval JSON, as its `kind` says, and
renders whatever parts are present: layers and totals (optimize), verification, latency,
per-layer profiles, accuracy. A plot is drawn only when its data is there."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Literal

from onnx_cp.errors import OnnxCpError
from onnx_cp.runtime.files import atomic_write

JSON_NAME = "report.json"
MD_NAME = "report.md"
LAYER_LATENCY_PNG = "layer_latency.png"
LAYER_MACS_PNG = "layer_macs.png"
LATENCY_PNG = "latency.png"
ACCURACY_PNG = "accuracy_vs_speedup.png"
PLOTS_MISSING = "Plots not drawn: they need matplotlib (pip install 'onnx-cp[plots]')."

ReportKind = Literal["optimize", "bench", "eval"]


def write_report(report: dict, out_dir: str | os.PathLike, *, kind: ReportKind) -> list[Path]:
    """Write report.json, report.md and the plots the data allows; return the paths written.

    kind: what `report` is: the optimize report, the bench JSON or the eval JSON."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxCpError(f"{out_dir}: cannot create the report folder ({exc.strerror or exc})") from None
    if not out_dir.is_dir() or not os.access(out_dir, os.W_OK):
        raise OnnxCpError(f"{out_dir}: report folder is not writable")
    parts = normalize(report, kind)
    plots = _plots(parts, out_dir)
    written = [write_json(report, out_dir / JSON_NAME)]
    written.append(_write_text(out_dir / MD_NAME, render_markdown(parts, plots)))
    return written + (plots or [])


def write_json(data: dict, path: str | os.PathLike) -> Path:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    return _write_text(path, json.dumps(_plain(data), indent=2) + "\n")


def normalize(report: dict, kind: ReportKind) -> dict:
    """The report in the optimize report's shape (its latency / profile / accuracy parts)."""
    if kind == "optimize":
        return dict(report)
    if kind == "bench":
        return _bench_parts(report)
    if kind == "eval":
        return _eval_parts(report)
    raise ValueError(f"unknown report kind {kind!r}")


def _bench_parts(bench: dict) -> dict:
    parts = {"latency": {k: v for k, v in bench.items() if k != "profile"}}
    if bench.get("profile"):
        parts["profile"] = bench["profile"]
    return parts


def _eval_parts(result: dict) -> dict:
    """The model's row, and the reference's (its top-1 / top-5 on the same data) when there is one."""
    accuracy = {_stem(result.get("model")) or "model": result}
    if result.get("reference"):
        accuracy[f"reference: {_stem(result['reference'])}"] = {
            "n": result["n"], "top1": result.get("reference_top1"),
            "top5": result.get("reference_top5")}
    return {"accuracy": accuracy}


# ------------------------------------------------------------------------------------ plots

def _plots(parts: dict, out_dir: Path) -> list[Path] | None:
    """The plots written, or None without matplotlib (the optional extra `plots`)."""
    try:
        from onnx_cp.measure import plots  # matplotlib only when a report is drawn
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise
        return None

    written = []
    profiles = {k: v for k, v in (parts.get("profile") or {}).items() if v and v.get("layers")}
    if profiles:
        rows, series = _plot_rows(profiles)
        first = next(iter(profiles.values()))
        written.append(plots.grouped_hbars(
            rows, series, out_dir / LAYER_LATENCY_PNG,
            title=f"Per-layer latency (onnxruntime profiler, {first['threads']} thread(s), batch "
                  f"{first['batch']}, median of {first['runs']} runs)",
            xlabel="ms per inference",
        ))
    layers = parts.get("layers") or []
    if layers and any(layer.get("macs_before") for layer in layers):
        rows = [layer["name"] for layer in layers]
        written.append(plots.grouped_hbars(
            rows,
            {
                "before": [(layer.get("macs_before") or 0) / 1e6 for layer in layers],
                "after": [(layer.get("macs_after") or layer.get("macs_before") or 0) / 1e6
                          for layer in layers],
            },
            out_dir / LAYER_MACS_PNG,
            title="Multiply-accumulates per layer, before and after CP decomposition",
            xlabel="million MACs per inference",
        ))
    latency = parts.get("latency")
    if latency and latency.get("models"):
        written.append(plots.latency_bars(
            latency["models"], out_dir / LATENCY_PNG,
            title=f"onnxruntime latency ({latency['threads']} thread(s), batch {latency['batch']}, "
                  f"{latency['runs']} interleaved runs)",
        ))
    points, xlabel = _accuracy_points(parts)
    if points:
        measured = xlabel.startswith("measured")
        written.append(plots.accuracy_vs_speedup(
            points, out_dir / ACCURACY_PNG, xlabel=xlabel,
            title="Top-1 accuracy against " + ("measured speedup" if measured else "MAC reduction"),
        ))
    return written


def _union_rows(layer_lists: list[list[dict]]) -> list[str]:
    rows: list[str] = []
    for layer_list in layer_lists:
        for layer in layer_list:
            if layer["name"] not in rows:
                rows.append(layer["name"])
    # layout conversions are not a layer of the network: keep them last
    return sorted(rows, key=lambda r: r == "(reorder)")


COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul",
               "NhwcConv", "QLinearConv", "ConvInteger", "MatMulInteger"}
SMALL_SHARE = 0.03


def _plot_rows(profiles: dict) -> tuple[list[str], dict[str, list[float]]]:
    """Layers with a Conv / Gemm / MatMul, and anything else taking 3% or more of a total, each get
    a row; small element-wise / reshape rows are summed into "(other ops)" so the plot stays legible."""
    rows = _union_rows([p["layers"] for p in profiles.values()])
    ops = {layer["name"]: set(layer.get("ops") or []) for p in profiles.values() for layer in p["layers"]}

    def shown(row: str) -> bool:
        if row == "(reorder)" or ops.get(row, set()) & COMPUTE_OPS:
            return True
        return any(_layer_ms(p, row) >= SMALL_SHARE * p["total_ms"] for p in profiles.values())

    kept = [r for r in rows if shown(r)]
    other = [r for r in rows if not shown(r)]
    series = {}
    for label, p in profiles.items():
        values = [_layer_ms(p, r) for r in kept]
        if other:
            values.append(sum(_layer_ms(p, r) for r in other))
        series[f"{label} ({p['total_ms']:.3g} ms)"] = values
    if other:
        kept = kept + [f"(other ops: {len(other)} layers)"]
    return kept, series


def _layer_ms(profile: dict, name: str) -> float:
    return next((layer["ms"] for layer in profile["layers"] if layer["name"] == name), 0.0)


def _accuracy_points(parts: dict) -> tuple[list[tuple[str, float, float]], str]:
    """(label, speedup, top-1 %) for each accuracy entry that has a speedup to pair with."""
    accuracy = {k: v for k, v in (parts.get("accuracy") or {}).items() if v}
    if not accuracy:
        return [], ""
    latency_models = (parts.get("latency") or {}).get("models") or []
    totals = parts.get("totals") or {}
    if len(latency_models) >= 2:
        xlabel = "measured speedup (onnxruntime median latency, x)"

        def speedup(label: str) -> float | None:
            named = next((m for m in latency_models if m.get("name") == label), None)
            if named is None:
                named = latency_models[0] if label == "original" else latency_models[-1]
            return named.get("speedup_vs_first")
    elif _mac_totals(totals):
        xlabel = "MAC reduction (x; latency not measured)"
        before, after = _mac_totals(totals)
        reduction = before / after

        def speedup(label: str) -> float | None:
            return 1.0 if label == "original" else reduction
    else:
        xlabel = "speedup (x)"

        def speedup(label: str) -> float | None:
            return None

    points = []
    for label, entry in accuracy.items():
        x = entry.get("speedup", speedup(label))
        top1 = entry.get("top1")
        if top1 is None:
            top1 = entry.get("agreement_top1")
        if x is not None and top1 is not None and math.isfinite(x):
            points.append((label, float(x), 100.0 * top1))
    return (points, xlabel) if len(points) >= 2 else ([], "")


def _mac_totals(totals: dict) -> tuple[int, int] | None:
    for stem in ("macs", "conv_macs"):
        if totals.get(f"{stem}_before") and totals.get(f"{stem}_after"):
            return totals[f"{stem}_before"], totals[f"{stem}_after"]
    return None


# --------------------------------------------------------------------------------- markdown

def render_markdown(parts: dict, plots: list[Path] | None) -> str:
    out = ["# onnx-cp report", ""]
    if parts.get("input") or parts.get("output"):
        out += [f"- input: `{parts.get('input')}`", f"- output: `{parts.get('output')}`"]
        out += _settings_md(parts) or [""]
    out += _totals_md(parts.get("totals"))
    out += _fusions_md(parts.get("fusions"))
    out += _layers_md(parts.get("layers"))
    out += _verification_md(parts.get("verification"))
    out += _latency_md(parts.get("latency"))
    out += _profile_md(parts.get("profile"))
    out += _accuracy_md(parts.get("accuracy"))
    out += _finetune_md(parts.get("finetune"))
    out += _stages_md(parts.get("stage_seconds"), parts.get("seconds"))
    if plots is None:
        out += ["## Plots", "", PLOTS_MISSING, ""]
    elif plots:
        out += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(out)


def _table(header: list[str], rows: list[list], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def _fusions_md(fusions: dict | None) -> list[str]:
    if not fusions:
        return []
    return ["## Exact rewrites", "", "Made before any layer was decomposed (onnx_cp.graph.fusion); the outputs "
            "are the input's up to float rounding.", ""] + _table(["rule", "applied"], list(fusions.items()))


def _stages_md(stages: dict | None, total: float | None) -> list[str]:
    if not stages:
        return []
    rows = [[stage, f"{seconds:.1f}", f"{100 * seconds / total:.0f}%" if total else None]
            for stage, seconds in stages.items()]
    return ["## Wall time by stage", ""] + _table(["stage", "seconds", "share"], rows, "lrr")


def _totals_md(totals: dict | None) -> list[str]:
    """Pairs X_before / X_after become before / after / reduction rows; other totals are counts."""
    if not totals:
        return []
    rows, counts = [], []
    for key, value in totals.items():
        if key.endswith("_before"):
            stem = key[: -len("_before")]
            after = totals.get(f"{stem}_after")
            ratio = f"{value / after:.2f}x" if value and after else None
            rows.append([_label(stem), value, after, ratio])
        elif not key.endswith("_after"):
            counts.append(f"{key.replace('_', ' ')}: {_cell(value)}")
    out = ["## Totals", ""]
    if counts:
        out += ["; ".join(counts), ""]
    return out + (_table(["", "before", "after", "reduction"], rows) if rows else [])


def _label(stem: str) -> str:
    return stem.replace("conv_macs", "Conv MACs").replace("macs", "MACs").replace("_", " ")


def _layers_md(layers: list | None) -> list[str]:
    if not layers:
        return []
    rows = []
    for layer in layers:
        shape = layer.get("kernel_shape")
        rows.append([
            f"`{layer.get('name')}`",
            "x".join(map(str, shape)) if shape else None,
            layer.get("group"), layer.get("form") if layer.get("status") == "decomposed" else None,
            _rank(layer.get("rank")), layer.get("rel_error"),
            layer.get("macs_before"), layer.get("macs_after"),
            layer.get("status"), layer.get("reason") or layer.get("note"),
        ])
    header = ["layer", "kernel", "group", "form", "rank", "rel. error", "MACs before", "MACs after",
              "status", "reason"]
    return ["## Layers", ""] + _table(header, rows, "lrrlrrrrll")


def _rank(rank):
    """A Tucker-2 rank [R_in, R_out] as R_inxR_out; others as they are."""
    return "x".join(map(str, rank)) if isinstance(rank, list) else rank


def _verification_md(verification) -> list[str]:
    if not verification:
        return []
    if not isinstance(verification, dict):
        return ["## Verification", "", str(verification), ""]
    rows = [[key, value] for key, value in _flatten(verification)]
    return ["## Verification", ""] + _table(["check", "result"], rows, "ll")


def _flatten(data: dict, prefix: str = ""):
    """(dotted key, value) pairs of a nested dict; lists shown joined, empty ones as "-"."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, f"{name}.")
        elif isinstance(value, (list, tuple)):
            yield name, ", ".join(map(str, value)) if value else None
        else:
            yield name, value


def _settings_md(parts: dict) -> list[str]:
    settings = parts.get("settings")
    if not isinstance(settings, dict):
        return []
    shown = [f"{k}={json.dumps(_plain(v))}" for k, v in settings.items() if v not in (None, {}, [])]
    if parts.get("input_shapes"):
        shown.append(f"input_shapes={json.dumps(_plain(parts['input_shapes']))}")
    if parts.get("seconds") is not None:
        shown.append(f"seconds={parts['seconds']}")
    return [f"- settings: `{' '.join(shown)}`", ""] if shown else []


def _latency_md(latency: dict | None) -> list[str]:
    if not latency or not latency.get("models"):
        return []
    rows = [[m["name"], m["median_ms"], m["p10_ms"], m["p90_ms"], m["ratio_to_first"],
             f"{m['speedup_vs_first']:.2f}x" if m.get("speedup_vs_first") else None]
            for m in latency["models"]]
    note = (f"onnxruntime {latency.get('onnxruntime')}, CPU, {latency['threads']} intra-op thread(s), "
            f"batch {latency['batch']}, graph optimization `{latency.get('optimization')}`, "
            f"{latency['runs']} interleaved runs after {latency.get('warmup')} warm-up.")
    return (["## Latency", "", note, ""]
            + _table(["model", "median ms", "p10 ms", "p90 ms", "ratio to first", "speedup"], rows))


def _profile_md(profiles: dict | None) -> list[str]:
    profiles = {k: v for k, v in (profiles or {}).items() if v and v.get("layers")}
    if not profiles:
        return []
    labels = list(profiles)
    rows_order = _union_rows([p["layers"] for p in profiles.values()])
    rows = [[f"`{r}`"] + [_layer_ms(profiles[label], r) for label in labels] for r in rows_order]
    rows.append(["**total**"] + [profiles[label]["total_ms"] for label in labels])
    return (["## Per-layer latency (ms, onnxruntime profiler)", "",
             ("A CP chain's four convolutions are counted under the layer they replaced; "
             "`(reorder)` is onnxruntime's layout conversion."), ""]
            + _table(["layer"] + labels, rows))


def _accuracy_md(accuracy: dict | None) -> list[str]:
    accuracy = {k: v for k, v in (accuracy or {}).items() if v}
    if not accuracy:
        return []
    rows = []
    for label, entry in accuracy.items():
        rows.append([label, entry.get("n"), _pct(entry.get("top1")), _pct(entry.get("top5")),
                     _pct(entry.get("agreement_top1")), entry.get("max_abs_error")])
    return ["## Accuracy", ""] + _table(
        ["model", "samples", "top-1", "top-5", "top-1 agreement", "max abs error"], rows)


def _finetune_md(finetune: dict | None) -> list[str]:
    """One row per epoch of the fine-tuning history (whatever metrics it recorded)."""
    if not isinstance(finetune, dict) or not finetune.get("history"):
        return []
    history = [row for row in finetune["history"] if isinstance(row, dict)]
    columns: list[str] = []
    for row in history:
        columns += [key for key, value in row.items()
                    if key not in columns and not isinstance(value, (dict, list))]
    note = [f"{key}: {_cell(finetune[key])}" for key in ("best_epoch", "metric", "seconds", "teacher")
            if finetune.get(key) is not None]
    return (["## Fine-tuning", ""] + (["; ".join(note), ""] if note else [])
            + _table(columns, [[row.get(c) for c in columns] for row in history]))


def _pct(value) -> str | None:
    return None if value is None else f"{100 * value:.2f}%"


# ---------------------------------------------------------------------------------- helpers

def _stem(path) -> str | None:
    return Path(str(path)).stem if path else None


def _plain(value):
    """JSON-safe copy: numpy scalars and arrays to Python, paths to strings, NaN to null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalar or array
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_text(path: Path, text: str) -> Path:
    with atomic_write(path) as handle:
        handle.write(text)
    return Path(path)
