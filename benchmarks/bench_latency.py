"""Latency of a model pair (original, optimized) at several thread counts and batch sizes.

Not part of CI. Runs are interleaved (A B A B ...) after a warm-up; the table shows medians and
the speedup of the second model; a per-layer profile of both models is printed at one thread.

    python benchmarks/bench_latency.py models/charnet.onnx /tmp/cp.onnx \
        --threads 1 2 --batch 1 8 --runs 300 --out benchmarks/results/latency_charnet.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnx_cp.measure import benchmark_latency, format_profile, format_table, layer_profile
from onnx_cp.measure.report import write_json


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("original")
    parser.add_argument("optimized")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--optimization", default="all", choices=["all", "extended", "basic", "none"])
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--out", type=Path, help="write all results as JSON")
    args = parser.parse_args()

    results = {"original": args.original, "optimized": args.optimized, "latency": [], "profile": {}}
    for threads in args.threads:
        for batch in args.batch:
            result = benchmark_latency([args.original, args.optimized], threads=threads, batch=batch,
                                       runs=args.runs, warmup=args.warmup,
                                       optimization=args.optimization,
                                       names=["original", "optimized"])
            print(f"\n== {threads} thread(s), batch {batch}")
            print(format_table(result))
            results["latency"].append(result.to_json())
    if not args.no_profile:
        for label, path in (("before", args.original), ("after", args.optimized)):
            profile = layer_profile(path, threads=1, runs=50, optimization=args.optimization,
                                    label=label)
            print(f"\n== per-layer profile, {label} ({path}), 1 thread, batch 1")
            print(format_profile(profile))
            results["profile"][label] = profile.to_json()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(results, args.out)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
