"""Auto (CP, Tucker-2, channel SVD, spatial SVD per layer) against CP alone at the same measured
speed-up target, or at the same output error bound (not part of CI).

    python benchmarks/bench_forms.py [--targets 1.5 2 3] [--samples 1000] [--sample 256]
        # writes benchmarks/results/forms.{md,json}
    python benchmarks/bench_forms.py --targets --max-output-errors 0.1 0.2 --out benchmarks/results/forms_equal_error
        # the fastest plan each finds within that worst group output error on the sample (charresnet)
    python benchmarks/bench_forms.py --real yolov8-nude --targets 1.5 --out benchmarks/results/forms_yolov8
        # a real third-party model from benchmarks/real_models.py (run --fetch-only first)
    python benchmarks/bench_forms.py --real yolov8-nude --targets --max-output-errors 0.3 --out ...
        # the fastest plan each finds within that worst group output error on its sample

For each model and --target-speedup X, `optimize` runs the speed-up search with
decomposition="cp" and "auto", no fine-tuning, each twice: without data (the searches see only
kernel errors and measured latency; other forms stay only for 1x1 convs or near exact) and with
`--sample` unlabelled validation images (each option judged by its layer-output error on them, a
1x1 conv's SVD solved on them, and each layer and form weighed by the output error it causes).
Then the results are measured again in one interleaved onnxruntime run against
the original, and their outputs compared with the original's on real test inputs (charresnet: the
synthetic character test set, top-1 agreement and worst channel-group output error; a real model:
its held-out folder, the class-score rows' error and the top-10 anchors kept, by heldout.py's
measure, with the first 256 photos of its train folder as the sample).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from onnx_cp import optimize  # noqa: E402
from onnx_cp.data.chars import generate_chars  # noqa: E402
from onnx_cp.errors import BudgetError  # noqa: E402
from onnx_cp.measure import benchmark_latency, evaluate  # noqa: E402
from onnx_cp.measure.outputs import compare_on_data  # noqa: E402
from onnx_cp.runtime.cpu import channel_block, cpu_features  # noqa: E402
from onnx_cp.settings import MeasureSettings, OutputErrorBudget, SolverSettings, SpeedupTarget  # noqa: E402

MODELS = {"charresnet": ROOT / "models" / "charresnet.onnx", "charnet": ROOT / "models" / "charnet.onnx"}


def run_one(path: Path, target: float | OutputErrorBudget, decomposition: str, workers: int, sample: str | None,
            input_shapes: dict | None = None) -> dict:
    """One speed-up search (or, for an OutputErrorBudget, the search for the fastest plan within it on
    `sample`); with `sample` (unlabelled inputs), layers and forms are weighed by the output error
    each causes on them, else by kernel error alone."""
    started = time.perf_counter()
    policy = target if isinstance(target, OutputErrorBudget) else SpeedupTarget(target)
    try:
        result = optimize(path, policy,
                          solver=SolverSettings(workers=workers, decomposition=decomposition),
                          measure=MeasureSettings(eval_data=sample, input_shapes=input_shapes or {}))
    except BudgetError as exc:
        return {"decomposition": decomposition, "data": "sample" if sample else "none", "error": str(exc)}
    rows = [r for r in result.report["layers"] if r["status"] == "decomposed"]
    return {"decomposition": decomposition, "data": "sample" if sample else "none", "model": result.model, "seconds": time.perf_counter() - started,
            "forms": dict(Counter(r["form"] for r in rows)),
            "layers": {r["name"]: [r["form"], r["rank"], round(r["rel_error"], 3)] for r in rows},
            "search_measured": max((t.get("measured", 0) for t in _attempts(result.report["search"])), default=None),
            "trace": [{k: v for k, v in t.items() if k != "sensitivity"} for t in _attempts(result.report["search"])],
            "kernel_error_sum": round(sum(r["rel_error"] for r in rows), 3)}


def _attempts(search) -> list[dict]:
    return search["trace"] if isinstance(search, dict) else search


def _budget(target: float | OutputErrorBudget) -> str:
    return f"error <= {target.max_error:g}" if isinstance(target, OutputErrorBudget) else f"{target:g}x"


def run_real(key: str, budgets: list, workers: int, sample_size: int, cache: Path) -> list[dict]:
    """A real_models.py model: cp and auto, without data (speed-up targets only) and with
    `sample_size` photos of its train folder, judged on its held-out folder by heldout.py's measure."""
    import real_models
    from heldout import held_out_report

    model = next(m for m in real_models.MODELS if m.key == key)
    path = real_models.fetch_model(cache, model)
    folder = real_models.inputs_folder(cache, model)
    sample = Path(tempfile.mkdtemp()) / "sample.npz"
    np.savez(sample, x=real_models.load_folder(model, folder / "train")[0][:sample_size])
    shapes = {model.input_name: list(model.shape)}
    results = []
    for target in budgets:
        runs = [run_one(path, target, d, workers, data, shapes) for data in (None, str(sample))
                for d in ("cp", "auto") if data or not isinstance(target, OutputErrorBudget)]
        done = [r for r in runs if "model" in r]
        if done:
            latency = benchmark_latency([str(path), *[r["model"] for r in done]], runs=200, input_shapes=shapes)
            for r, measured in zip(done, latency.models[1:]):
                written = Path(tempfile.mkdtemp()) / "model.onnx"
                ir.save(r.pop("model"), str(written))
                r["speedup"] = round(measured.speedup_vs_first, 3)
                report = held_out_report(model, path, written, folder / "heldout")
                r["held_out_samples"] = report.pop("samples")
                r["held_out"] = report
        for r in runs:
            results.append({"model": key, "target": _budget(target), **r})
            print(json.dumps(results[-1]), flush=True)
    return results


def real_row(r: dict) -> str:
    """A real model's table row: per output, its groups' median errors and task agreements."""
    forms = ", ".join(f"{f} x{n}" for f, n in sorted(r["forms"].items()))
    measures = "; ".join(", ".join([*(f"{g} {e:.3f}" for g, e in o["group_error_median"].items()),
                                    *(f"{k} {v:.1%}" for k, v in o["agreement"].items())])
                         for o in r["held_out"].values())
    return (f"| {r['model']} | {r['target']} | {r['data']} | {r['decomposition']} | {r['speedup']:.2f}x | "
            f"{measures} | {forms} |")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--real", help="a benchmarks/real_models.py model key instead of the shipped models")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/onnx-cp-real"), help="real_models.py --cache")
    parser.add_argument("--models", nargs="+", default=["charresnet"], choices=sorted(MODELS))
    parser.add_argument("--targets", nargs="*", type=float, default=[1.5, 2.0, 3.0])
    parser.add_argument("--max-output-errors", nargs="*", type=float, default=[],
                        help="also search the fastest plan within each worst group output error on the sample")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--sample", type=int, default=256, help="unlabelled validation inputs for the data runs (0: none)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "forms"))
    args = parser.parse_args()
    meta = {"command": "python " + " ".join(sys.argv), "machine": platform.machine(), "processor": platform.processor(),
            "channel_block": channel_block(), "cpu_features": cpu_features()}
    budgets = [*args.targets, *(OutputErrorBudget(e) for e in args.max_output_errors)]
    if args.real:
        return write_real(run_real(args.real, budgets, args.workers, args.sample, args.cache), meta, args.out)
    x, y = generate_chars(args.samples, seed=0, split="test")
    x = np.asarray(x, np.float32)
    data = Path(tempfile.mkdtemp()) / "test.npz"
    np.savez(data, x=x, y=y)
    data = str(data)
    samples = [None]
    if args.sample:
        sample = Path(tempfile.mkdtemp()) / "sample.npz"
        np.savez(sample, x=np.asarray(generate_chars(args.sample, seed=0, split="val")[0], np.float32))
        samples.append(str(sample))
    results = []
    for name in args.models:
        for target in budgets:
            original_top1 = evaluate(str(MODELS[name]), data).top1
            runs = [run_one(MODELS[name], target, d, args.workers, sample) for sample in samples
                    for d in ("cp", "auto") if sample or not isinstance(target, OutputErrorBudget)]
            done = [r for r in runs if "model" in r]
            if done:
                latency = benchmark_latency([str(MODELS[name]), *[r["model"] for r in done]], runs=200)
                for r, measured in zip(done, latency.models[1:]):
                    model = r.pop("model")
                    agreement = compare_on_data(model, MODELS[name], x, samples=args.samples)
                    r["top1"] = evaluate(model, data).top1
                    r["speedup"] = round(measured.speedup_vs_first, 3)
                    r["worst_group_error"] = round(agreement.worst_group_error, 4)
                    r["top1_agreement"] = agreement.outputs[0].agreement.get("top1")
            for r in runs:
                results.append({"model": name, "target": _budget(target), "original_top1": original_top1, **r})
                print(json.dumps(results[-1]), flush=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"# Auto vs CP at the same speed-up target or output error bound\n\n`{meta['command']}` (CPU features "
             f"{', '.join(meta['cpu_features'])}; channel block {meta['channel_block']}; no fine-tuning; "
             "output error on the character test set vs the original; data: none, or "
             "unlabelled validation images that judge each option by its layer-output error and weigh each layer and "
             "form by the output error it causes)\n",
             "| model | budget | data | forms | measured speed-up | worst group output error | top-1 agreement | top-1 (original) "
             "| forms chosen |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['target']} | {r['data']} | {r['decomposition']} | - | - | - | - | {r['error']} |")
            continue
        forms = ", ".join(f"{f} x{n}" for f, n in sorted(r["forms"].items()))
        agree = f"{100 * r['top1_agreement']:.1f}%" if r.get("top1_agreement") is not None else "-"
        lines.append(f"| {r['model']} | {r['target']} | {r['data']} | {r['decomposition']} | {r['speedup']:.2f}x | "
                     f"{r['worst_group_error']:.3f} | {agree} | {100 * r['top1']:.2f}% ({100 * r['original_top1']:.2f}%) "
                     f"| {forms} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def write_real(results: list[dict], meta: dict, out: str) -> int:
    Path(out + ".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"# Auto vs CP at the same speed-up target or output error bound\n\n`{meta['command']}` (CPU features "
             f"{', '.join(meta['cpu_features'])}; channel block {meta['channel_block']}; no fine-tuning; outputs "
             "compared with the original's on the held-out folder: medians over samples)\n",
             "| model | budget | data | forms | measured speed-up | held-out error and agreement | forms chosen |",
             "| --- | ---: | --- | --- | ---: | --- | --- |"]
    lines += [real_row(r) if "error" not in r else
              f"| {r['model']} | {r['target']} | {r['data']} | {r['decomposition']} | - | - | {r['error']} |"
              for r in results]
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
