"""Train the shipped character models from scratch and export them to ONNX.

    python models/train.py charnet --seed 0        # -> models/charnet.onnx
    python models/train.py charresnet --seed 0     # -> models/charresnet.onnx

Data: `onnx_cp.data.chars.generate_chars` (train split, this seed; val split for model selection;
the test split is never looked at here). Rendered once and cached as npz in --cache-dir.
Everything is seeded; CPU results are reproducible up to thread-scheduling float differences.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import ARCHITECTURES
from export import export_onnx

from onnx_cp.data.chars import generate_chars

RECIPES = {
    # name: (train images, epochs, batch, peak lr, weight decay)
    # Less than one pass over 200k fresh renders (140k and 100k images seen): what a shared 2-core
    # machine trains in ~45 min. No image repeats, so there is little to overfit; the val split
    # (other fonts) picks the best epoch when there are several.
    "charnet": {"train_n": 200_000, "epochs": 0.7, "batch": 64, "lr": 1.5e-3, "wd": 1e-4},
    "charresnet": {"train_n": 200_000, "epochs": 0.5, "batch": 64, "lr": 3e-3, "wd": 5e-4},
}
VAL_N = 10_000


def cached_chars(n: int, seed: int, split: str, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    path = cache_dir / f"{split}_{n}_s{seed}.npz"
    if path.exists():
        with np.load(path) as data:
            return data["x"], data["y"]
    t0 = time.time()
    x, y = generate_chars(n, seed=seed, split=split)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=x, y=y)
    tmp.replace(path)
    print(f"rendered {n} {split} images in {time.time() - t0:.0f} s -> {path}", flush=True)
    return x, y


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        logits = model(torch.from_numpy(x[i:i + batch]))
        correct += int((logits.argmax(1).numpy() == y[i:i + batch]).sum())
    return correct / len(x)


def train(name: str, seed: int, cache_dir: Path, out: Path, epochs: int | None,
          train_n: int | None, threads: int = 2) -> None:
    recipe = dict(RECIPES[name])
    recipe["epochs"] = epochs if epochs is not None else recipe["epochs"]
    recipe["train_n"] = train_n or recipe["train_n"]
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x_train, y_train = cached_chars(recipe["train_n"], seed, "train", cache_dir)
    x_val, y_val = cached_chars(VAL_N, seed, "val", cache_dir)
    model = ARCHITECTURES[name]()
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {params} parameters, recipe {recipe}", flush=True)

    steps_per_epoch = math.ceil(len(x_train) / recipe["batch"])
    total_steps = math.ceil(recipe["epochs"] * steps_per_epoch)  # epochs may be fractional
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["wd"])
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe["lr"], total_steps=total_steps, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    best_acc, best_state = -1.0, None
    t_start = time.time()
    for epoch in range(math.ceil(recipe["epochs"])):
        model.train()
        order = rng.permutation(len(x_train))
        t0, seen, loss_sum = time.time(), 0, 0.0
        for step in range(min(steps_per_epoch, total_steps - epoch * steps_per_epoch)):
            idx = np.sort(order[step * recipe["batch"]:(step + 1) * recipe["batch"]])
            xb, yb = torch.from_numpy(x_train[idx]), torch.from_numpy(y_train[idx])
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            loss_sum += float(loss.detach()) * len(idx)
            if step % 250 == 0:
                probe = accuracy(model, x_val[:1000], y_val[:1000])
                model.train()
                print(f"  epoch {epoch} step {step}/{steps_per_epoch} loss {float(loss):.3f} "
                      f"val[:1000] {probe:.3f} {seen / (time.time() - t0):.0f} img/s", flush=True)
        val_acc = accuracy(model, x_val, y_val)
        print(f"epoch {epoch}: train loss {loss_sum / seen:.4f}, val acc {val_acc:.4f}, "
              f"{time.time() - t0:.0f} s (total {time.time() - t_start:.0f} s)", flush=True)
        if val_acc > best_acc:
            best_acc = val_acc
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    ckpt = cache_dir / f"{name}_s{seed}.pt"
    torch.save(model.state_dict(), ckpt)
    print(f"best val acc {best_acc:.4f}; checkpoint {ckpt}", flush=True)
    export_onnx(model, out)
    print(f"exported {out}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(RECIPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/onnx-cp-chars"))
    parser.add_argument("--out", type=Path, default=None, help="default models/<model>.onnx")
    parser.add_argument("--epochs", type=float, default=None, help="override the recipe")
    parser.add_argument("--train-n", type=int, default=None, help="override the recipe")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--export-only", action="store_true",
                        help="only re-export the checkpoint of an earlier run from --cache-dir")
    args = parser.parse_args()
    out = args.out or Path(__file__).resolve().parent / f"{args.model}.onnx"
    if args.export_only:
        model = ARCHITECTURES[args.model]()
        model.load_state_dict(torch.load(args.cache_dir / f"{args.model}_s{args.seed}.pt"))
        export_onnx(model.eval(), out)
        return
    train(args.model, args.seed, args.cache_dir, out, args.epochs, args.train_n, args.threads)


if __name__ == "__main__":
    main()
