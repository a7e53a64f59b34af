"""`onnx-cp optimize IN OUT`: argument handling and output only; the work is onnx_cp.optimize."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from onnx_cp import api, config, settings
from onnx_cp.cli import add_augment_arg, add_image_args, preprocessing
from onnx_cp.errors import BudgetError, OnnxCpError, UsageError
from onnx_cp.measure import write_json, write_report
from onnx_cp.runtime import model_io
from onnx_cp.runtime.files import same_file
from onnx_cp.runtime.inputs import parse_input_shapes

# Options left unset on the command line are None, so that a config file can fill them; what
# neither sets takes the settings' defaults (external data is the CLI's own).
DEFAULTS = {"external_data": "auto", "method": "nls", "decomposition": "auto", "seed": 0, "threads": 1,
            "reconstruct_steps": settings.DEFAULT_RECONSTRUCT_STEPS}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "optimize",
        help="replace Conv layers by CP-decomposed four-conv chains",
        description="Replace the eligible Conv layers of IN by CP-decomposed chains of four small "
        "convolutions, verify the result with onnx.checker and onnxruntime, and write OUT.",
    )
    p.add_argument("input", metavar="IN", help="input ONNX model (never modified)")
    p.add_argument("output", metavar="OUT", help="output ONNX model (written atomically)")
    ranks = p.add_argument_group("layers and ranks (one of --rank, --target-speedup, --max-accuracy-drop, "
                                 "--max-output-error, or --target-speedup with one of the last two as its "
                                 "bound; default: the data-free --max-error policy)")
    ranks.add_argument("--rank", action="append", metavar="N|LAYER=N",
                       help="CP rank for every layer (N) or one layer (LAYER=N, repeatable); clipped to "
                       "each layer's FLOP break-even")
    ranks.add_argument("--max-error", type=float, metavar="E", help="kernel relative error budget of the "
                       f"default rank policy (default {settings.DEFAULT_MAX_ERROR})")
    ranks.add_argument("--error-data", metavar="DATA", help="sample inputs (no labels needed): --max-error then "
                       "bounds each layer's output error on them instead of its kernel error")
    ranks.add_argument("--target-speedup", type=float, metavar="X", help="choose ranks so that the whole "
                       "model's measured onnxruntime latency drops X times (exit 3 if impossible)")
    ranks.add_argument("--max-accuracy-drop", type=float, metavar="P", help="the fastest model whose accuracy "
                       "on --eval-data/--val (after fine-tuning, with --finetune-data) drops at most P points "
                       "(agreement with IN without labels); exit 3 and no OUT if none")
    ranks.add_argument("--max-output-error", type=float, metavar="E", help="the fastest model whose outputs stay "
                       "within E of IN's on --eval-data (else the fine-tuning data), after fine-tuning: the worst "
                       "channel-group relative error of any output; exit 3 and no OUT if none")
    ranks.add_argument("--layers", metavar="REGEX", help="only Conv layers whose name matches")
    ranks.add_argument("--exclude", metavar="REGEX", help="leave Conv layers whose name matches")
    ranks.add_argument("--no-fuse", action="store_true", help="skip the exact rewrites made before decomposing "
                       "(scales and shifts folded into Convs, HardSwish as one op, Softmax over the last axis)")
    ranks.add_argument("--decomposition", choices=list(settings.DECOMPOSITIONS),
                       help="the low-rank forms to choose from per layer: auto (default: CP, Tucker-2, channel "
                       "SVD - the one form for 1x1 convs - and spatial SVD, by measured latency and error) or "
                       "one of them; --rank gives CP ranks unless a form is named here")
    ranks.add_argument("--method", choices=["nls", "als"], help="CP solver (default nls)")
    ranks.add_argument("--workers", type=int, metavar="N", help="solver processes (default: CPU count)")
    p.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...",
                   help="shape for an input with symbolic dimensions (repeatable)")
    p.add_argument("--seed", type=int, help="seed of every random choice (default 0)")
    p.add_argument("--report", metavar="FILE.json", help="write the per-layer report as JSON")
    p.add_argument("--report-dir", metavar="DIR", help="write report.json, report.md and plots")
    p.add_argument("--external-data", choices=["auto", "yes", "no"],
                   help="weights in OUT.data beside OUT: auto (default) = when the input had external data "
                   "or the model is over 2 GB")
    p.add_argument("--force", action="store_true", help="allow OUT to be the same file as IN")
    p.add_argument("--config", metavar="FILE", help="settings from a TOML file (its [tool.onnx-cp] table, or "
                   "the whole file); default: ./onnx-cp.toml, else [tool.onnx-cp] in ./pyproject.toml")
    tune = p.add_argument_group("fine-tuning (the paper's second step), quantization and measurement")
    tune.add_argument("--finetune-data", metavar="TRAIN", help="fine-tune the rewritten model on this "
                      "data (.npz with x and optional y, or an image folder)")
    tune.add_argument("--val", metavar="VAL", help="validation data: picks the best epoch, and is where "
                      "accuracy is measured unless --eval-data is given")
    tune.add_argument("--teacher-from-input", action="store_true",
                      help="distil from the input model's outputs (needs no labels)")
    tune.add_argument("--epochs", type=int, help="fine-tuning epochs (default 5)")
    tune.add_argument("--steps", type=int, help="fine-tuning steps (instead of --epochs)")
    tune.add_argument("--lr", type=float, help="fine-tuning learning rate (default 0.001)")
    tune.add_argument("--batch-size", type=int, help="fine-tuning batch size (default 32)")
    tune.add_argument("--reconstruct-steps", type=int, metavar="N", help="before fine-tuning, fit each CP chain "
                      f"to the replaced layer's outputs on --finetune-data for N Adam steps (default "
                      f"{settings.DEFAULT_RECONSTRUCT_STEPS}; 0: off)")
    add_augment_arg(tune)
    tune.add_argument("--eval-data", metavar="DATA", help="measure top-1/top-5 accuracy (or agreement "
                      "with IN without labels) before decomposition, after it, and after fine-tuning")
    tune.add_argument("--quantize", choices=["int8"], help="static INT8 quantization (onnxruntime, QDQ) "
                      "after fine-tuning")
    tune.add_argument("--calibration-data", metavar="DATA", help="INT8 calibration inputs "
                      "(default: --finetune-data, else --eval-data)")
    tune.add_argument("--int8-target", choices=["native", "portable"], help="weight bits for the CPU the "
                      "INT8 file is for: native (default) = this one (8 bits with VNNI/AMX/ARM dot product, "
                      "else 7), portable = 7 bits, safe on any CPU")
    tune.add_argument("--int8-max-error", type=float, metavar="E", help="largest worst-channel-group error "
                      "of the INT8 model against the float one on the calibration samples (default "
                      f"{settings.DEFAULT_INT8_MAX_ERROR}); sensitive layers stay float to meet it, else exit 1")
    add_image_args(p.add_argument_group("image preprocessing, for every data option (as eval's)"))
    tune.add_argument("--bench", action="store_true", help="measure onnxruntime latency of IN and OUT "
                      "and profile them per layer (implied by --report-dir)")
    tune.add_argument("--threads", type=int, help="onnxruntime threads of every timing, the searches' too (default 1); "
                      "runs on data use every core")
    p.set_defaults(run=run, parser=p)


def run(args: argparse.Namespace) -> int:
    config_source = _apply_config(args)
    source, target = Path(args.input), Path(args.output)
    _check_paths(source, target, args)
    try:
        result = api.optimize(source, **settings_from_args(args))
    except BudgetError as error:
        if error.report is not None:  # no OUT, but the measurements that refused it
            refused = {**error.report, "output": None}
            if args.report:
                write_json(refused, Path(args.report))
            if args.report_dir:
                write_report(refused, Path(args.report_dir), kind="optimize")
        raise
    report = result.report
    report["output"] = str(target)
    report["config"] = config_source
    external = {"auto": True if result.had_external_data else None, "yes": True, "no": False}
    written = model_io.save_model(result.model, target, external_data=external[args.external_data])
    try:
        if args.report:
            write_json(report, Path(args.report))
        if args.report_dir:
            write_report(report, Path(args.report_dir), kind="optimize")
    except BaseException:
        for path in written:  # all or nothing: no model without the report that was asked for
            path.unlink(missing_ok=True)
        raise
    if not args.quiet:
        print(format_report(report))
    return 0


def _quantize(args: argparse.Namespace) -> settings.QuantizeSettings | None:
    given = {"target": args.int8_target, "max_output_error": args.int8_max_error}
    if not args.quantize:
        if any(v is not None for v in given.values()):
            raise UsageError("--int8-target and --int8-max-error need --quantize int8")
        return None
    return settings.QuantizeSettings(args.quantize, args.calibration_data,
                                     **{k: v for k, v in given.items() if v is not None})


def settings_from_args(args: argparse.Namespace) -> dict:
    """The API's setting groups from the options (the config file's included)."""
    rank, per_layer = parse_rank_args(args.rank)
    return {
        "ranks": _policy(args, rank, per_layer),
        "layers": settings.LayerSelection(args.layers, args.exclude, fuse=not args.no_fuse),
        "solver": settings.SolverSettings(method=args.method, workers=args.workers,
                                          decomposition=args.decomposition),
        "finetune": _finetune(args),
        "quantize": _quantize(args),
        "measure": settings.MeasureSettings(input_shapes=parse_input_shapes(args.input_shape), threads=args.threads,
                                            eval_data=args.eval_data, latency=args.bench or bool(args.report_dir)),
        "preprocessing": preprocessing(args),
        "seed": args.seed,
    }


def _policy(args: argparse.Namespace, rank: int | None, per_layer: dict[str, int]) -> settings.RankPolicy:
    options = {"--rank": rank is not None or bool(per_layer), "--target-speedup": args.target_speedup is not None,
               "--max-accuracy-drop": args.max_accuracy_drop is not None,
               "--max-output-error": args.max_output_error is not None}
    given = [flag for flag, value in options.items() if value]
    bounded_speed = len(given) == 2 and given[0] == "--target-speedup" and given[1] != "--rank"
    if len(given) > 1 and not bounded_speed:
        raise UsageError(f"give one of {', '.join(options)}, not {' and '.join(given)}")
    if args.error_data is not None and given:
        raise UsageError("--error-data sets what the default --max-error policy measures; it does not combine "
                         f"with {given[0]}")
    if args.max_error is not None and (rank is not None or given not in ([], ["--rank"])):
        flag = "--rank N" if rank is not None else given[0]
        raise UsageError(f"--max-error is the budget of layers without a rank; it does not combine with {flag}")
    max_error = settings.DEFAULT_MAX_ERROR if args.max_error is None else args.max_error
    budget = (settings.AccuracyBudget(args.max_accuracy_drop) if args.max_accuracy_drop is not None
              else settings.OutputErrorBudget(args.max_output_error) if args.max_output_error is not None
              else None)
    if args.target_speedup is not None:
        return settings.SpeedupTarget(args.target_speedup, within=budget)
    if budget is not None:
        return budget
    if given:
        return settings.ExplicitRanks(rank, per_layer, max_error=max_error)
    return settings.ErrorBudget(max_error, args.error_data)


def _finetune(args: argparse.Namespace) -> settings.FinetuneSettings | None:
    schedule = {"epochs": args.epochs, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size}
    settings.check_int(args.reconstruct_steps, "reconstruct_steps", 0)
    if args.finetune_data is None:
        if any(v is not None for v in schedule.values()):
            raise UsageError("--epochs/--steps/--lr/--batch-size need --finetune-data")
        if args.teacher_from_input:
            raise UsageError("--teacher-from-input needs --finetune-data")
        return None
    return settings.FinetuneSettings(args.finetune_data, val=args.val, teacher_from_input=args.teacher_from_input,
                                     reconstruct_steps=args.reconstruct_steps, augment=args.augment, **schedule)


def parse_rank_args(values: list[str] | None) -> tuple[int | None, dict[str, int]]:
    """`--rank 32` and/or `--rank conv2=64` (repeatable): (rank for every layer, per-layer ranks)."""
    rank, per_layer = None, {}
    for value in values or []:
        layer, sep, number = value.rpartition("=")
        try:
            parsed = int(number)
        except ValueError:
            raise UsageError(f"--rank {value!r}: {number!r} is not an integer") from None
        if parsed < 1:
            raise UsageError(f"--rank {value!r}: rank must be at least 1")
        if sep and not layer:
            raise UsageError(f"--rank {value!r}: expected N or LAYER=N")
        if sep:
            if per_layer.get(layer, parsed) != parsed:
                raise UsageError(f"--rank {layer}= given twice with different ranks")
            per_layer[layer] = parsed
        elif rank is not None:
            raise UsageError("--rank N given twice; use LAYER=N for per-layer ranks")
        else:
            rank = parsed
    return rank, per_layer


def _apply_config(args: argparse.Namespace) -> str | None:
    """Fill the options the command line left unset from the config file, then the defaults."""
    found = config.find_config(args.config)
    if found is not None:
        path, table = found
        known = {a.dest for a in args.parser._actions}
        unknown = sorted(k for k in table if k.replace("-", "_") not in known - {"input", "output", "help"})
        if unknown:
            raise UsageError(f"{path}: unknown setting(s) {unknown}; use the long options of onnx-cp optimize")
        from_file = args.parser.parse_args(["IN", "OUT", *config.as_argv(table)])
        for key in table:
            dest = key.replace("-", "_")
            if getattr(args, dest) in (None, False):
                setattr(args, dest, getattr(from_file, dest))
    for dest, value in DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    return str(found[0]) if found else None


def _check_paths(source: Path, target: Path, args: argparse.Namespace) -> None:
    """Before any work: every path written is writable, replaces at most a regular file, and is none
    of the inputs (the model and its external data) nor another output."""
    if not source.exists():
        raise OnnxCpError(f"{source}: no such file")
    if same_file(source, target) and not args.force:
        raise UsageError(f"output {target} is the input file; pass --force to overwrite it")
    model_io.check_output_path(target)
    inputs = [source, *model_io.external_data_files(source)]
    data_file = target.with_name(target.name + ".data")
    if not same_file(source, target) and any(same_file(data_file, p) for p in inputs[1:]) and not args.force:
        raise UsageError(f"{data_file} holds the input's weights: writing {target}'s external data there would "
                         "destroy the input; choose another OUT (or pass --force)")
    written = {"the output": target, "the output's data": data_file}
    if args.report:
        report = Path(args.report)
        for what, path in [("the input", source), *(("the input's data", p) for p in inputs[1:]), *written.items()]:
            if same_file(report, path):
                raise UsageError(f"--report {report} is {what}; choose another file")
        model_io.check_output_path(report)
    if args.report_dir:
        folder = Path(args.report_dir)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--report-dir {folder} is a file, not a folder")
        if any(same_file(folder, path) for path in (source, target)):
            raise UsageError(f"--report-dir {folder} is a model file")


def format_report(report: dict) -> str:
    """The per-layer table, totals and verification, for the terminal."""
    header = ("layer", "kernel", "group", "form", "rank", "error", "MACs before", "MACs after", "gain", "status")
    rows = [header]
    for row in report["layers"]:
        kernel = "x".join(map(str, row["kernel_shape"])) if row.get("kernel_shape") else "?"
        done = row["status"] == "decomposed"
        gain = (row["macs_before"] / row["macs_after"]) if done and row["macs_after"] else None
        status = "decomposed" if done else f"skipped: {row['reason']}"
        if row.get("note"):
            status += f" ({row['note']})"
        rows.append((
            row["name"], kernel, str(row["group"]), (row.get("form") or "cp") if done else "-",
            ("x".join(map(str, row["rank"])) if isinstance(row["rank"], list) else str(row["rank"])) if done else "-",
            f"{row['rel_error']:.3f}" if done else "-",
            _count(row.get("macs_before")), _count(row.get("macs_after")) if done else "-",
            f"{gain:.1f}x" if gain else "-", status,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    totals = report["totals"]
    before, after = totals["conv_macs_before"], totals["conv_macs_after"]
    ops = Counter(row.get("op", "Conv") for row in report["layers"])
    others = sorted(op for op in ops if op != "Conv")
    kinds = f"layers ({', '.join(f'{ops[op]} {op}' for op in ['Conv', *others] if ops[op])})" if others \
        else "Conv layers"
    lines.append(
        f"\n{totals['decomposed']} of {totals['convs']} {kinds} decomposed; {'their' if others else 'conv'} MACs "
        f"{_count(before)} -> {_count(after)}" + (f" ({before / after:.2f}x fewer)" if after else "")
        + f"; parameters {_count(totals['params_before'])} -> {_count(totals['params_after'])}"
    )
    fusions = report.get("fusions")
    if fusions:
        lines.append("exact rewrites first: " + ", ".join(f"{count} {rule}" for rule, count in fusions.items()))
    if totals["decomposed"] == 0:
        lines.append("no Conv layer was decomposed: " + ("the exact rewrites alone were written" if fusions
                                                         else "the model was written unchanged"))
    check = report.get("verification")
    if check:
        shapes = ", ".join(f"{k}:{'x'.join(map(str, v))}" for k, v in check["input_shapes"].items())
        lines.append(
            f"verified: onnx.checker {check['checker']}; onnxruntime outputs vs the input model on "
            f"random inputs ({shapes}): max abs error {check['max_abs_error']:.3g}, "
            f"relative error {check['max_rel_error']:.3g}, worst channel group {check['worst_group_error']:.3g}"
        )
        lines += [f"note: {note}" for note in check.get("notes", [])]
    lines += [f"warning: {warning}" for warning in report.get("warnings", [])]
    lines += _measurement_lines(report)
    stages = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in report.get("stage_seconds", {}).items()
                       if seconds >= 0.5)
    lines.append(f"wrote {report['output']} in {report['seconds']:.1f} s" + (f" ({stages})" if stages else ""))
    return "\n".join(lines)


def _measurement_lines(report: dict) -> list[str]:
    lines = []
    if report.get("config"):
        lines.append(f"settings from {report['config']}")
    search = report.get("search")
    if isinstance(search, list):  # --target-speedup attempts
        for step in search:
            ranks = ", ".join(f"{name}={rank}" for name, rank in step["ranks"].items() if rank is not None)
            precisions = (f" (float {step['measured_float']:.2f}x, INT8 {step['measured_int8']:.2f}x)"
                          if "precision" in step else "")
            lines.append(f"speed-up search: {ranks or 'nothing decomposed'}: predicted {step['predicted']:.2f}x, "
                         f"measured {step['measured']:.2f}x{precisions}")
    elif search:  # --max-accuracy-drop / --max-output-error bisection
        for step in search["trace"]:
            measured = _quality_text(step)
            precision = step.get("precision")
            if precision and precision["written"] == "int8":
                measured += f" in INT8 ({_quality_text(step, 'float')} in float)"
            elif precision:
                measured += f", float ({precision['why_float']})"
            what = "INT8 alone" if step.get("step") == "int8 alone" else f"predicted {step['predicted_speedup']:.2f}x"
            lines.append(f"quality search: {what} -> {measured}")
    target = report.get("target") or {}
    if "limit" in target:  # a bounded speed target, measured again on the final model
        key = "accuracy_drop" if "accuracy_drop" in target else "output_error"
        lines.append(f"target met: the final model measured {target['measured_speedup']:.2f}x "
                     f"(at least {target['target_speedup']:g}x), {key.replace('_', ' ')} {target[key]:.3g} "
                     f"(at most {target['limit']:g})")
    if (report.get("quantize") or {}).get("skipped"):
        lines.append(f"not quantized: {report['quantize']['skipped']}")
    elif report.get("quantize"):
        lines.append(f"quantized to INT8 (onnxruntime static quantization, QDQ): {report['quantize']['scheme']}")
    qat = report.get("qat")
    if qat and not qat.get("failed"):
        verdict = "kept" if qat["kept"] == "qat" else f"not kept: {qat['over_bound']}" if qat.get("over_bound") \
            else "not kept: the calibrated INT8 model measured better"
        lines.append(f"quantization-aware fine-tuning: {qat['epochs']} epoch(s) of {qat['weights']} INT8 weights at "
                     f"lr {qat['lr']:.0e}, {verdict} (judged by {qat['judged_by']})")
    fitted = [f for f in (report.get("reconstruction") or {}).get("layers", []) if f["status"] == "fitted"]
    if fitted:
        lines.append("layer-wise reconstruction (relative output error on the training data): " + ", ".join(
            f"{f['layer']} {f['error_before']:.3f} -> {f['error_after']:.3f}" for f in fitted))
    tuned = report.get("finetune")
    if tuned:
        probe = tuned.get("lr_probe")
        rates = "/".join(f"{t['lr']:.0e}" for t in probe or [])
        how = f", chosen by a probe of {rates}" if probe else ""
        if tuned.get("skipped"):
            lines.append(f"fine-tuning skipped after {tuned['seconds']:.0f} s: {tuned['skipped']} (a probe of {rates})")
        else:
            lines.append(f"fine-tuned for {len(tuned['history']) - 1} epoch(s) in {tuned['seconds']:.0f} s at peak "
                         f"lr {tuned['lr']:.0e}{how}; kept epoch {tuned['best_epoch']}"
                         + (f" (judged on {tuned['validation']})" if tuned.get("validation") else "")
                         + (f"; training views: {tuned['augmentation']}" if tuned.get("augmentation") else ""))
    accuracy = report.get("accuracy")
    if accuracy:
        steps = []
        for stage, result in accuracy.items():
            if result.get("top1") is not None:
                text = f"{stage} top-1 {100 * result['top1']:.2f}%"
            else:
                text = f"{stage}"
            if result.get("agreement_top1") is not None:
                text += f" (agrees with input {100 * result['agreement_top1']:.1f}%)"
            steps.append(text)
        lines.append(f"accuracy on {accuracy['original']['n']} samples: " + " -> ".join(steps))
    for stage, result in (report.get("fidelity") or {}).items():
        agreements = [f"{key} {100 * value:.1f}%" for output in result["outputs"].values()
                      for key, value in output.get("agreement", {}).items() if value is not None]
        lines.append(f"{stage} outputs vs the input on {result['samples']} samples: worst channel group "
                     f"{result['worst_group_error']:.3f}" + (f", {', '.join(agreements)}" if agreements else ""))
    latency = report.get("latency")
    if latency:
        original, optimized = latency["models"][:2]
        lines.append(
            f"latency (onnxruntime, {latency['threads']} thread(s), batch {latency['batch']}, median): "
            f"{original['median_ms']:.3f} ms -> {optimized['median_ms']:.3f} ms "
            f"({original['median_ms'] / optimized['median_ms']:.2f}x faster)")
    return lines


def _quality_text(step: dict, precision: str | None = None) -> str:
    """A quality search step's measure: of the model it keeps, or of its float or INT8 model."""
    key = "accuracy_drop" if "accuracy_drop" in step else "output_error"
    value = step["precision"][f"{key}_{precision}"] if precision else step[key]
    return f"accuracy drop {value:.2f} points" if key == "accuracy_drop" else f"output error {value:.3f}"


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
