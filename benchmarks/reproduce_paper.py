"""Reproduce the paper's headline on the shipped character CNN (not part of CI).

Lebedev et al. (ICLR 2015) report, for Jaderberg et al.'s 36-class character CNN, an 8.5x CPU
speed-up of the whole network for a 1-point accuracy drop (91% -> 90%) after fine-tuning. This
script lets onnx-cp choose the ranks under that budget (`max_accuracy_drop=1`, fine-tuning each
candidate by distillation from the original on training data, selecting on validation data) and
reports on the held-out test split (fonts never seen in training or selection):

- accuracy before decomposition, after decomposition, after fine-tuning;
- whole-network latency (onnxruntime, 1 thread, batch 1, interleaved runs) of the original, the
  CP model, INT8 alone and CP + INT8, and per-layer speed-ups of conv2 and conv3;
- a table (results/paper.md), the raw numbers (results/paper.json) and a plot (results/paper.png);
- the optimized model as models/charnet-cp.onnx with its report (models/charnet-cp.md).

    python benchmarks/reproduce_paper.py            # about 30-60 minutes on 2 cores
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

from onnx_cp import model_io, optimize  # noqa: E402
from onnx_cp.data.chars import generate_chars  # noqa: E402
from onnx_cp.measure import benchmark_latency, evaluate, layer_profile  # noqa: E402
from onnx_cp.quantize import quantize_int8  # noqa: E402

PAPER = {"speedup": 8.5, "accuracy_before": 91.0, "accuracy_after": 90.0}


def data(folder: Path, split: str, n: int, seed: int) -> Path:
    path = folder / f"{split}-{n}-{seed}.npz"
    if not path.exists():
        x, y = generate_chars(n, seed=seed, split=split)
        np.savez(path, x=x, y=y)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "charnet.onnx"))
    parser.add_argument("--max-drop", type=float, default=1.0, help="accuracy budget in points")
    parser.add_argument("--train-n", type=int, default=40_000)
    parser.add_argument("--val-n", type=int, default=4_000)
    parser.add_argument("--test-n", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--runs", type=int, default=300, help="latency runs per model")
    parser.add_argument("--cache", default="/tmp/onnx-cp-paper", help="generated data (not committed)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--save-model", default=str(ROOT / "models" / "charnet-cp.onnx"))
    args = parser.parse_args()

    started = time.perf_counter()
    cache, out = Path(args.cache), Path(args.out)
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    train = data(cache, "train", args.train_n, seed=1)  # the models were trained on seed 0
    val = data(cache, "val", args.val_n, seed=0)
    test = data(cache, "test", args.test_n, seed=0)
    print(f"data ready ({time.perf_counter() - started:.0f} s)", flush=True)

    tuned = optimize(
        args.model, max_accuracy_drop=args.max_drop, finetune_data=str(train), val_data=str(val),
        teacher_from_input=True, eval_data=str(val),
        finetune_options={"epochs": args.epochs, "lr": args.lr, "batch_size": 64},
    )
    ranks = {row["name"]: row["rank"] for row in tuned.report["layers"] if row["status"] == "decomposed"}
    print(f"ranks chosen: {ranks} ({time.perf_counter() - started:.0f} s)", flush=True)
    decomposed = optimize(args.model, layer_ranks=ranks, layers="|".join(f"^{n}$" for n in ranks)).model
    int8 = quantize_int8(args.model, str(train))
    cp_int8 = quantize_int8(tuned.model, str(train))
    models = {"original": args.model, "CP (before fine-tuning)": decomposed, "CP (fine-tuned)": tuned.model,
              "INT8": int8, "CP + INT8": cp_int8}

    accuracy = {name: evaluate(m, str(test))["top1"] for name, m in models.items()}
    timed = ["original", "CP (fine-tuned)", "INT8", "CP + INT8"]
    latency = benchmark_latency([models[n] for n in timed], names=timed, threads=1, batch=1, runs=args.runs)
    speedups = {m["name"]: m["speedup_vs_first"] for m in latency["models"]}
    profiles = {n: layer_profile(models[n], threads=1, runs=100, label=n) for n in ("original", "CP (fine-tuned)")}
    per_layer = _per_layer(profiles["original"], profiles["CP (fine-tuned)"], ["conv2", "conv3"])

    results = {"paper": PAPER, "ranks": ranks, "accuracy_top1": accuracy, "speedup": speedups,
               "latency": latency, "per_layer_speedup": per_layer, "search": tuned.report.get("search"),
               "optimize_report": tuned.report, "seconds": round(time.perf_counter() - started),
               "command": "python benchmarks/reproduce_paper.py " + " ".join(sys.argv[1:])}
    (out / "paper.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "paper.md").write_text(_table(results))
    _plot(accuracy, speedups, out / "paper.png")
    model_io.save_model(model_io.to_ir(tuned.model), args.save_model, external_data=False)
    Path(args.save_model).with_suffix(".md").write_text(_table(results))
    print(_table(results))


def _per_layer(before: dict, after: dict, names: list[str]) -> dict:
    ms_before = {layer["name"]: layer["ms"] for layer in before["layers"]}
    ms_after = {layer["name"]: layer["ms"] for layer in after["layers"]}
    return {n: ms_before[n] / ms_after[n] for n in names if n in ms_before and ms_after.get(n)}


def _table(r: dict) -> str:
    acc, speed = r["accuracy_top1"], r["speedup"]
    lines = [
        "# charnet: the paper's headline reproduced with onnx-cp", "",
        f"Ranks chosen under a {r['optimize_report']['settings']['max_accuracy_drop']:g}-point budget: "
        + ", ".join(f"{k} {v}" for k, v in r["ranks"].items()), "",
        "| model | test top-1 | whole-net speed-up (1 thread, batch 1) |", "| --- | ---: | ---: |",
    ]
    for name, top1 in acc.items():
        shown = f"{speed[name]:.2f}x" if name in speed else "-"
        lines.append(f"| {name} | {100 * top1:.2f}% | {shown} |")
    lines += ["", "| per layer (fine-tuned CP vs original, onnxruntime profile) | speed-up |", "| --- | ---: |"]
    lines += [f"| {name} | {s:.2f}x |" for name, s in r["per_layer_speedup"].items()]
    lines += ["", "| | paper (Lebedev et al. 2015, CPU) | onnx-cp |", "| --- | ---: | ---: |",
              f"| whole-network speed-up | {PAPER['speedup']}x | {speed['CP (fine-tuned)']:.2f}x |",
              f"| accuracy before -> after fine-tuning | {PAPER['accuracy_before']:.0f}% -> "
              f"{PAPER['accuracy_after']:.0f}% | {100 * acc['original']:.2f}% -> {100 * acc['CP (fine-tuned)']:.2f}% |",
              "", f"Measured in {r['seconds']} s with `{r['command'].strip()}`.", ""]
    return "\n".join(lines)


def _plot(accuracy: dict, speedups: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, s in speedups.items():
        ax.scatter(s, 100 * accuracy[name], s=60)
        ax.annotate(name, (s, 100 * accuracy[name]), textcoords="offset points", xytext=(6, 4))
    ax.axvline(PAPER["speedup"], color="grey", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlim(0.8, max(16.0, 1.3 * max(speedups.values())))
    ticks = [t for t in (1, 2, 4, 8, 16, 32) if t <= ax.get_xlim()[1]]
    ax.set_xticks(ticks, [f"{t}x" for t in ticks])
    ax.minorticks_off()
    ax.text(PAPER["speedup"] * 1.03, ax.get_ylim()[0], "paper: 8.5x", color="grey", va="bottom")
    ax.set_xlabel("whole-network speed-up vs original (onnxruntime, 1 thread, batch 1)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title("charnet: accuracy vs speed-up")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
