"""The `onnx-cp` command. Each subcommand lives in its own module with a `register(subparsers)`
that adds its parser and sets `run`; this module only dispatches and turns errors into one line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

# Nothing heavy at import time: the console script imports this module before main() can catch a
# Ctrl-C (progress, onnx, onnxruntime are imported inside main).
from onnx_cp.errors import EXIT_USAGE, OnnxCpError, UsageError, first_line

EXIT_INTERRUPTED = 130

# API parameter names whose flag is not --name-with-dashes (the core names parameters as the API
# spells them; see UsageError.worded_for).
FLAGS = {"layer_ranks": "--rank LAYER=N", "input_shapes": "--input-shape"}
# Subcommand modules, in the order `onnx-cp --help` lists them.
SUBCOMMANDS = ["optimize", "bench", "eval", "finetune", "data"]


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports usage errors as a single line (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or tables")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="onnx-cp",
        description="Speed up CNNs on CPUs with fine-tuned CP decomposition of their Conv layers.",
    )
    from onnx_cp import __version__

    parser.add_argument("--version", action="version", version=f"onnx-cp {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    subparsers.required = True
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"onnx_cp.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"onnx_cp.cli.{name}":
                raise
            continue  # subcommand not built yet
        module.register(subparsers)
    for sub in subparsers.choices.values():
        add_common_flags(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The console entry point: a Ctrl-C at any moment, even while the subcommands are imported,
    is one line and exit 130."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        sys.stderr.write("onnx-cp: interrupted\n")
        return EXIT_INTERRUPTED


def quiet_third_party() -> None:
    """Third-party log lines (onnxruntime's C++ warnings on stderr, onnx_ir's logging) would print
    before onnx-cp's own one-line error; --debug keeps them."""
    warnings.filterwarnings("ignore")
    for name in ("onnx_ir", "onnxscript", "onnx"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        import onnxruntime
    except ImportError:  # noqa: PERF203 - the commands that need it say so
        return
    # FATAL: its ERROR lines duplicate the exception that onnx-cp reports as one line.
    onnxruntime.set_default_logger_severity(4)


def _main(argv: list[str] | None) -> int:
    from onnx_cp import progress

    parser = build_parser()
    args = parser.parse_args(argv)
    progress.set_quiet(args.quiet)
    if not args.debug:
        quiet_third_party()
    try:
        return int(args.run(args) or 0)
    except OnnxCpError as exc:
        if args.debug:
            raise
        message = exc.worded_for(FLAGS) if isinstance(exc, UsageError) else str(exc)
        sys.stderr.write(f"onnx-cp {args.command}: error: {message}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"onnx-cp {args.command}: interrupted\n")
        return EXIT_INTERRUPTED
    except MemoryError as exc:
        if args.debug:
            raise
        detail = first_line(exc) if str(exc) else "an allocation failed"
        sys.stderr.write(f"onnx-cp {args.command}: error: out of memory ({detail})\n")
        return 1
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if args.debug:
            raise
        first = first_line(exc)
        sys.stderr.write(
            f"onnx-cp {args.command}: error: {type(exc).__name__}: {first} (rerun with --debug)\n"
        )
        return 1


def add_result_args(parser) -> None:
    """Where a measuring command writes its results (bench, eval)."""
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--report-dir", metavar="DIR", help="write report.json, report.md and plots here")


def check_result_paths(args, inputs: list) -> None:
    """Before any work: --json is none of the inputs and can be written; --report-dir is a folder."""
    from pathlib import Path

    from onnx_cp.runtime.files import output_folder, same_file

    if args.json:
        target = Path(args.json)
        if any(path is not None and same_file(target, Path(path)) for path in inputs):
            raise UsageError(f"--json {target} is an input; choose another file")
        output_folder(target)
    if args.report_dir and Path(args.report_dir).exists() and not Path(args.report_dir).is_dir():
        raise UsageError(f"--report-dir {args.report_dir} is a file, not a folder")


def write_results(args, results: dict, kind: str) -> None:
    """The results as --json and --report-dir asked (see add_result_args)."""
    from onnx_cp.measure.report import write_json, write_report

    if args.json:
        write_json(results, args.json)
    if args.report_dir:
        write_report(results, args.report_dir, kind=kind)


def add_preprocessing_args(group) -> None:
    """The dataset options of eval and finetune: --limit and the image preprocessing."""
    group.add_argument("--limit", type=int, metavar="N", help="use only the first N samples")
    add_image_args(group)


def add_augment_arg(group) -> None:
    """--augment, for the commands that distil (see onnx_cp.finetune.augment)."""
    from onnx_cp.settings import AUGMENTATIONS

    group.add_argument("--augment", choices=AUGMENTATIONS, default="auto",
                       help="training views: auto (default) = with a teacher and image inputs, fresh random "
                       "shifts and contrast each epoch, relabelled by the teacher; mix = shifts, zoom and mixup; "
                       "none = the samples as given")


def add_image_args(group) -> None:
    """How images become model inputs (see onnx_cp.data.Preprocessing), for every command that reads data."""
    group.add_argument("--size", metavar="H,W", help="resize images to H x W (image folders)")
    group.add_argument("--grayscale", action="store_true", help="one channel images (image folders)")
    group.add_argument("--channel-order", choices=["rgb", "bgr"], help="channel order of image inputs "
                       "(default rgb; bgr for OpenCV-trained models)")
    group.add_argument("--scale", type=float, metavar="S",
                       help="multiply pixel values by S (default 1/255 for images, 1 for .npz)")
    group.add_argument("--mean", metavar="M[,M,M]", help="subtract per channel after scaling")
    group.add_argument("--std", metavar="S[,S,S]", help="divide per channel after subtracting the mean")


def preprocessing(args):
    """The Preprocessing of the options of add_image_args."""
    from onnx_cp.data import Preprocessing

    return Preprocessing(size=_numbers(args.size, "--size", int), grayscale=bool(args.grayscale), scale=args.scale,
                         mean=_numbers(args.mean, "--mean", float), std=_numbers(args.std, "--std", float),
                         channel_order=args.channel_order or "rgb")


def preprocessing_options(args) -> dict:
    """open_dataset keyword arguments from the options of add_preprocessing_args."""
    options = vars(preprocessing(args)).copy()
    options["limit"] = args.limit
    return options


def _numbers(text: str | None, flag: str, kind) -> list | None:
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise UsageError(f"{flag} {text!r}: expected comma-separated {'integers' if kind is int else 'numbers'}")
    return values
