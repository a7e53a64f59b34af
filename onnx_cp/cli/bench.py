"""`onnx-cp bench`: onnxruntime CPU latency of models side by side (and a per-layer profile)."""

from __future__ import annotations

import argparse

from onnx_cp.cli import add_result_args, check_result_paths, write_results
from onnx_cp.errors import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure onnxruntime CPU latency of models side by side",
        description="Measure the onnxruntime CPU latency of one or more models. Runs are "
        "interleaved (A B A B ...) after a warm-up, so ratios survive a noisy machine; the table "
        "gives median, p10 and p90 per model and the ratio of each to the first model.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="ONNX model files; the first is the baseline")
    p.add_argument("--threads", default="1", metavar="N",
                   help="onnxruntime intra-op threads (default 1; 'all' or 0 = every core); "
                   "inter-op threads are 1, execution sequential")
    p.add_argument("--batch", type=int, default=1, metavar="B",
                   help="batch size for inputs with a symbolic first dimension (default 1)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:DIMS",
                   help="shape of an input, e.g. x:1,3,224,224 (repeatable; overrides --batch)")
    p.add_argument("--runs", type=int, default=100, metavar="K", help="timed runs per model (default 100)")
    p.add_argument("--warmup", type=int, default=10, metavar="W", help="untimed runs first (default 10)")
    p.add_argument("--block", type=int, default=10, metavar="N", help="timed runs of one model in a row, "
                   "after one untimed run, before the next model's (default 10; 1 = run by run)")
    p.add_argument("--optimization", choices=["all", "extended", "basic", "none"], default="all",
                   help="onnxruntime graph optimization level (default all = ORT_ENABLE_ALL)")
    p.add_argument("--profile", action="store_true",
                   help="also profile each model and print a per-layer breakdown "
                   "(a CP chain counts for the layer it replaced)")
    p.add_argument("--profile-runs", type=int, default=20, metavar="K",
                   help="profiled runs per model with --profile (default 20)")
    add_result_args(p)
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from onnx_cp.measure import benchmark_latency, format_profile, format_table, layer_profile
    from onnx_cp.runtime.inputs import parse_input_shapes

    if args.profile_runs < 1:
        raise UsageError(f"--profile-runs must be >= 1, got {args.profile_runs}")
    check_result_paths(args, args.models)
    shapes = parse_input_shapes(args.input_shape)
    result = benchmark_latency(
        args.models, threads=args.threads, batch=args.batch, input_shapes=shapes,
        runs=args.runs, warmup=args.warmup, block=args.block, optimization=args.optimization,
    )
    profiles = {
        entry.name: layer_profile(
            path, threads=args.threads, batch=args.batch, input_shapes=shapes,
            runs=args.profile_runs, optimization=args.optimization, label=entry.name,
        )
        for path, entry in zip(args.models, result.models)
    } if args.profile else {}
    if not args.quiet:
        print(format_table(result))
        for name, profile in profiles.items():
            print(f"\nper-layer time of {name} (median of {profile.runs} profiled runs):")
            print(format_profile(profile))
    bench = result.to_json()
    if profiles:
        bench["profile"] = {name: profile.to_json() for name, profile in profiles.items()}
    write_results(args, bench, "bench")
    return 0
