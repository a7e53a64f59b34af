"""INT8 alone, CP, and CP + INT8 on the shipped character CNN, on this CPU (not part of CI).

For models/charnet.onnx and models/charnet-cp.onnx (the reproduction's CP model), quantizes with
both weight targets (`native`: the bits this CPU's onnxruntime kernels take, `portable`: 7 bits)
calibrated on 256 training images, then measures test top-1 on images from fonts never seen in
training and whole-network latency (onnxruntime, 1 thread, batch 1, runs interleaved in blocks,
so ratios hold on a shared machine). The table names the CPU by its features: INT8 speed depends
on them (VNNI or not), so every figure belongs to a CPU kind.

    python benchmarks/int8_cpu.py                 # about 5 minutes on 2 idle cores
    python benchmarks/int8_cpu.py --test-n 2000 --runs 200

Writes benchmarks/results/int8_<cpu kind>.md and .json (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnx_cp.data.chars import generate_chars  # noqa: E402
from onnx_cp.measure import benchmark_latency, evaluate  # noqa: E402
from onnx_cp.quantize import int8_scheme, quantize_int8, weight_precision  # noqa: E402
from onnx_cp.runtime.cpu import cpu_features, cpu_flags, cpu_name, int8_dot_product  # noqa: E402


def cpu_kind() -> str:
    """A short name for the results file: the instruction INT8 runs on."""
    return int8_dot_product(cpu_flags()) or ("avx2" if "avx2" in cpu_flags() else "baseline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", default=str(ROOT / "models" / "charnet.onnx"))
    parser.add_argument("--cp", default=str(ROOT / "models" / "charnet-cp.onnx"))
    parser.add_argument("--test-n", type=int, default=10_000)
    parser.add_argument("--calibration-n", type=int, default=256)
    parser.add_argument("--runs", type=int, default=300, help="latency runs per model")
    parser.add_argument("--cache", default="/tmp/onnx-cp-int8", help="generated test data (not committed)")
    parser.add_argument("--out", default=None, help="results prefix (default benchmarks/results/int8_<cpu>)")
    args = parser.parse_args()
    started = time.perf_counter()
    calibration, _ = generate_chars(args.calibration_n, seed=1, split="train")
    test = Path(args.cache) / f"test-{args.test_n}-0.npz"
    if not test.exists():
        test.parent.mkdir(parents=True, exist_ok=True)
        test_x, test_y = generate_chars(args.test_n, seed=0, split="test")
        np.savez(test, x=test_x, y=test_y)

    models: dict[str, object] = {"original": args.original}
    schemes: dict[str, str] = {}
    for base, label in ((args.original, "INT8"), (args.cp, "CP + INT8")):
        if base == args.cp:
            models["CP"] = args.cp
        for target in ("native", "portable"):
            quantized = quantize_int8(base, calibration, target=target)
            scheme = int8_scheme(quantized)
            name = f"{label} ({scheme.weight_bits}-bit, {target})"
            models[name] = quantized
            schemes[name] = scheme.describe()
    accuracy = {name: evaluate(model, str(test)).top1 for name, model in models.items()}
    latency = benchmark_latency(list(models.values()), names=list(models), threads=1, batch=1, runs=args.runs)
    speedups = {m.name: m.speedup_vs_first for m in latency.models}
    results = {
        "cpu": cpu_name(), "cpu_features": cpu_features(), "native_weights": weight_precision("native").reason,
        "accuracy_top1": accuracy, "speedup": speedups, "latency": latency.to_json(), "schemes": schemes,
        "test_n": args.test_n, "calibration_n": args.calibration_n, "seconds": round(time.perf_counter() - started),
        "command": "python benchmarks/int8_cpu.py " + " ".join(sys.argv[1:]),
    }
    prefix = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"int8_{cpu_kind()}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    Path(f"{prefix}.md").write_text(_table(results))
    print(_table(results))


def _table(r: dict) -> str:
    lines = [f"# INT8 alone, CP and CP + INT8 on charnet ({', '.join(r['cpu_features']) or 'no SIMD flags'})", "",
             f"CPU: {r['cpu']}; features: {', '.join(r['cpu_features'])}. Native weights: {r['native_weights']}.", "",
             f"Test top-1 on {r['test_n']} images from unseen fonts; INT8 calibrated on {r['calibration_n']} training "
             "images; whole-network speed-up vs the original (onnxruntime, 1 thread, batch 1, interleaved blocks).", "",
             "| model | test top-1 | speed-up |", "| --- | ---: | ---: |"]
    for name, top1 in r["accuracy_top1"].items():
        speed = r["speedup"].get(name)
        lines.append(f"| {name} | {100 * top1:.2f}% | " + (f"{speed:.2f}x |" if speed else "- |"))
    lines += ["", f"Measured in {r['seconds']} s with `{r['command'].strip()}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
