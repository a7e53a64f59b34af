"""`onnx-cp finetune`: train an ONNX model's weights (typically after CP decomposition) on data,
with labels or by distillation from the original model, and write them back into the graph."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from onnx_cp.cli import add_augment_arg, add_preprocessing_args, preprocessing_options


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a model's weights on data (labels or distillation from a teacher)",
        description="Fine-tune the weights of IN and write them back into the same graph as OUT. "
        "With labels the loss is cross-entropy; with --teacher (usually the model before "
        "decomposition) it is distillation from every output of the teacher, which needs no "
        "labels. The best epoch on --val is kept (by accuracy with labels, else by the worst "
        "channel-group error of any output). Models with a fixed batch size run in chunks of it. "
        "Under torchrun the data is sharded across processes (DistributedDataParallel).",
    )
    p.add_argument("input", metavar="IN.onnx", help="model to fine-tune")
    p.add_argument("output", metavar="OUT.onnx", help="where to write the fine-tuned model")
    p.add_argument("--data", required=True, metavar="TRAIN", help="training data: .npz or image folder")
    p.add_argument("--val", metavar="VAL", help="validation data: .npz or image folder")
    p.add_argument("--teacher", metavar="ORIGINAL.onnx", help="distil from this model's outputs")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, metavar="E", help="passes over the data (default 5)")
    length.add_argument("--steps", type=int, metavar="K", help="optimizer steps instead of epochs")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 0.003 for adamw, 0.001 for sgd)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="adamw (default) or sgd with --momentum")
    p.add_argument("--warmup", type=float, default=0.05, metavar="SHARE",
                   help="linear learning-rate warm-up over this share of the steps (default 0.05)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="samples per step (per process under torchrun; default 32)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9; sgd only)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay (default 0)")
    p.add_argument("--schedule", choices=["cosine", "step", "constant"], default="cosine",
                   help="learning-rate schedule (default cosine; step = /10 at 50%% and 75%%)")
    p.add_argument("--clip-grad-norm", type=float, default=1.0, metavar="G",
                   help="scale gradients down to global norm G when above it; 0 = never "
                   "(default 1: CP chains multiply four factors and can blow up)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="distillation temperature (default 1)")
    p.add_argument("--distill", choices=["auto", "kl", "mse"], default="auto",
                   help="distillation loss: auto (default) = every output by its kind (KL for "
                   "class scores and sequences, MSE per channel group normalised by the teacher's "
                   "for detector heads and maps); kl / mse = the first output only, by KL of "
                   "softened logits or plain MSE")
    p.add_argument("--keep", choices=["best", "last"], default="best",
                   help="keep the best validation epoch (default) or the last")
    p.add_argument("--seed", type=int, default=0, help="seed of data order and dropout (default 0)")
    p.add_argument("--checkpoint", metavar="FILE", help="save training state here after each epoch")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    p.add_argument("--unfreeze-bn", action="store_true",
                   help="update BatchNorm running statistics (frozen by default)")
    p.add_argument("--history", metavar="FILE.json", help="write the per-epoch history as JSON")
    add_augment_arg(p)
    data = p.add_argument_group("data preprocessing (as onnx-cp eval)")
    add_preprocessing_args(data)
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    import onnx_ir as ir

    from onnx_cp.data import open_dataset
    from onnx_cp.errors import UsageError
    from onnx_cp.finetune import finetune
    from onnx_cp.runtime.model_io import load_model, save_model

    if args.resume and not args.checkpoint:
        raise UsageError("--resume needs --checkpoint FILE")
    for path in (args.output, args.checkpoint, args.history):  # fail before training, not after
        folder = Path(path).parent if path else None
        if folder is not None and not folder.is_dir():
            raise UsageError(f"{path}: folder {folder} does not exist")
    options = preprocessing_options(args)
    train = open_dataset(args.data, **options)
    val = open_dataset(args.val, **options) if args.val else None
    model = load_model(args.input)
    teacher = load_model(args.teacher) if args.teacher else None
    result = finetune(
        model, train, val=val, teacher=teacher, epochs=args.epochs, steps=args.steps, lr=args.lr,
        batch_size=args.batch_size, seed=args.seed, freeze_bn=not args.unfreeze_bn,
        checkpoint=args.checkpoint, resume=args.resume, momentum=args.momentum,
        weight_decay=args.weight_decay, schedule=args.schedule, temperature=args.temperature,
        distill=args.distill, keep=args.keep, clip_grad_norm=args.clip_grad_norm or None,
        optimizer=args.optimizer, warmup=args.warmup, augment=args.augment,
    )
    if result.model is None:
        return 0  # a torchrun worker other than rank 0: rank 0 writes
    save_model(ir.serde.deserialize_model(result.model), args.output)
    if args.history:
        with open(args.history, "w") as f:
            json.dump({"best_epoch": result.best_epoch, "metric": result.metric, "seconds": result.seconds,
                       "lr": result.lr, "lr_probe": result.lr_probe, "history": result.history}, f, indent=2)
    if not args.quiet:
        print(format_result(result, args.output))
    return 0


def format_result(result, output: str) -> str:
    lines = [f"learning-rate probe {t['lr']:.0e}: " + ", ".join(f"{k} {v:.4f}" for k, v in t.items() if k != "lr")
             for t in result.lr_probe]
    for row in result.history:
        metric = row.get(result.metric) if result.metric else None
        loss = "-" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
        shown = "" if metric is None else f"  {result.metric} {metric:.4f}"
        lines.append(f"epoch {row['epoch']:>3}  loss {loss}{shown}")
    kept = f"kept epoch {result.best_epoch}"
    if result.metric:
        kept += (f" ({result.metric} {result.metric_at(result.best_epoch):.4f}, before "
                 f"fine-tuning {result.metric_at(0):.4f})")
    if result.augmentation:
        lines.insert(0, f"training views: {result.augmentation}")
    if result.skipped:
        lines.append(f"not trained: {result.skipped}")
    lines.append(f"{kept}; peak lr {result.lr:.0e}; {result.samples_per_second:.0f} samples/s; "
                 f"{result.seconds:.1f} s; wrote {output}")
    return "\n".join(lines)
