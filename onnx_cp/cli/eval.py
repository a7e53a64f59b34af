"""`onnx-cp eval`: top-1 / top-5 accuracy on a dataset, agreement with a reference model."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from onnx_cp.cli import (
    add_preprocessing_args,
    add_result_args,
    check_result_paths,
    preprocessing_options,
    write_results,
)
from onnx_cp.errors import UsageError

if TYPE_CHECKING:
    from onnx_cp.measure import AccuracyResult


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="accuracy of a model on a dataset, and agreement with a reference model",
        description="Top-1 and top-5 accuracy of a classifier on labelled data (.npz with x and y, "
        "or an image folder with one sub-folder per class). With --reference, also the fraction of "
        "samples where both models predict the same class and the largest output difference "
        "(these need no labels).",
    )
    p.add_argument("model", metavar="MODEL", help="ONNX model file")
    p.add_argument("--data", required=True, metavar="DATA", help=".npz file or image folder")
    p.add_argument("--reference", metavar="MODEL", help="compare predictions with this model")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="samples per run (default 64)")
    add_preprocessing_args(p)
    p.add_argument("--threads", default=None, metavar="N",
                   help="onnxruntime intra-op threads (default: onnxruntime's choice; 'all' = every core)")
    add_result_args(p)
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from onnx_cp.data import open_dataset
    from onnx_cp.measure import evaluate

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_result_paths(args, [args.model, args.data, args.reference])
    dataset = open_dataset(args.data, **preprocessing_options(args))
    result = evaluate(args.model, dataset, reference=args.reference, batch_size=args.batch_size,
                      threads=args.threads)
    if not args.quiet:
        print(format_result(result))
    write_results(args, result.to_json(), "eval")
    return 0


def format_result(result: AccuracyResult) -> str:
    lines = [f"model: {result.model}", f"data: {result.data} ({result.n} samples)"]
    if result.top1 is not None:
        lines.append(f"top-1: {100 * result.top1:.2f}%   top-{result.top_k}: "
                     f"{100 * result.top5:.2f}%")
    else:
        lines.append("top-1 / top-5: - (the data has no labels)")
    if result.reference is not None:
        lines.append(f"reference: {result.reference}")
        if result.reference_top1 is not None:
            lines.append(f"reference top-1: {100 * result.reference_top1:.2f}%")
        lines.append(f"top-1 agreement: {100 * result.agreement_top1:.2f}%   "
                     f"max abs error: {result.max_abs_error:.4g}   "
                     f"mean abs error: {result.mean_abs_error:.4g}")
    return "\n".join(lines)
