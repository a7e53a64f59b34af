"""`onnx-cp data chars`: write the synthetic character data set as an npz (x, y)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from onnx_cp.errors import UsageError
from onnx_cp.runtime.files import atomic_write


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "data",
        help="generate data sets",
        description="Generate data sets for evaluation and fine-tuning.",
    )
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True
    chars = kinds.add_parser(
        "chars",
        help="synthetic 24x24 character crops (36 classes 0-9 A-Z)",
        description="Render synthetic 24x24 grayscale character crops, 36 case-insensitive classes "
        "0-9 A-Z, preprocessed as the shipped character models expect ((v - 0.5) / 0.3, v in "
        "[0,1]), into an npz with x (N,1,24,24 float32) and y (N int64). Splits use disjoint fonts.",
    )
    chars.add_argument("--n", type=int, required=True, help="number of images")
    chars.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    chars.add_argument("--split", choices=["train", "val", "test"], default="train",
                       help="which fonts to render from (default train)")
    chars.add_argument("--workers", type=int, default=None,
                       help="worker processes (default: all cores); the output does not depend on it")
    chars.add_argument("--out", type=Path, required=True, help="output .npz file")
    chars.set_defaults(run=_run_chars)
    # cli.build_parser adds --quiet/--debug to `data`; accept them after `chars` too. SUPPRESS
    # keeps an absent flag from overwriting the value given before `chars`.
    chars.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no output")
    chars.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")


def _run_chars(args: argparse.Namespace) -> int:
    from onnx_cp.data.chars import generate_chars

    if args.n <= 0:
        raise UsageError(f"--n must be positive, got {args.n}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    x, y = generate_chars(args.n, seed=args.seed, split=args.split, workers=args.workers)
    write_npz_atomic(args.out, x=x, y=y)
    if not args.quiet:
        print(f"wrote {args.out}: x {tuple(x.shape)} float32, y {tuple(y.shape)} int64 "
              f"({args.split} split, seed {args.seed})")
    return 0


def write_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write an npz through a temporary file in the same folder, then rename it into place."""
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)
