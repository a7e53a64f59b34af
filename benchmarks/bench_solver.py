"""onnx-cp's CP solver against tensorly's ALS on trained convolution kernels (not part of CI).

    python benchmarks/bench_solver.py            # writes benchmarks/results/solver.{md,json}

Kernels come from the trained models in models/ (charnet.onnx: conv2 128x48x9x9, conv3
512x64x8x8; the ResNet-like model: 3x3 convs 128x128 and 256x128). A shape with no trained
kernel on disk falls back to a synthetic trained-like kernel, marked "synthetic" in the table.
For each (kernel, rank) both solvers run in this process, one after the other (the order
alternates between pairs), with the same number of BLAS threads (--threads, default 1), float64.
tensorly: parafac(init="svd", n_iter_max=500, tol=1e-8). onnx-cp: decompose() with defaults.
"""

from __future__ import annotations

import argparse
import os
import sys

# Thread counts are fixed before numpy loads so both solvers get the same BLAS.
_THREADS = "1"
for i, arg in enumerate(sys.argv):
    if arg == "--threads" and i + 1 < len(sys.argv):
        _THREADS = sys.argv[i + 1]
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = _THREADS

import glob  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_cp.cp import decompose  # noqa: E402

# (label, wanted shape, ranks)
TARGETS = [
    ("charnet conv2", (128, 48, 9, 9), [16, 64]),
    ("charnet conv3", (512, 64, 8, 8), [64]),
    ("3x3 128x128", (128, 128, 3, 3), [32, 64, 128]),
    ("3x3 256x128", (256, 128, 3, 3), [64, 128]),
]


def conv_kernels(path: Path) -> list[tuple[str, np.ndarray]]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
            out.append((f"{path.name}:{node.name or node.input[1]}",
                        numpy_helper.to_array(inits[node.input[1]])))
    return out


def find_kernels(model_dir: Path) -> dict[tuple[int, ...], tuple[str, np.ndarray]]:
    """The first trained kernel of each wanted shape found in model_dir/*.onnx."""
    found: dict[tuple[int, ...], tuple[str, np.ndarray]] = {}
    wanted = {shape for _, shape, _ in TARGETS}
    for path in sorted(glob.glob(str(model_dir / "*.onnx"))):
        try:
            kernels = conv_kernels(Path(path))
        except Exception as exc:  # a model being written right now, or not a model
            print(f"skipping {path}: {exc}", file=sys.stderr)
            continue
        for name, k in kernels:
            if k.shape in wanted and k.shape not in found:
                found[k.shape] = (name, k)
    return found


def synthetic_trained_like(shape, seed=0) -> np.ndarray:
    """Smooth filters mixed by decaying low-rank channel maps, plus 30% noise."""
    t, s, kh, kw = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, kh), np.linspace(-1, 1, kw), indexing="ij")
    kernel = np.zeros(shape)
    r = min(t, s)
    for d in range(kh * kw):
        a, b, c = rng.standard_normal(3)
        filt = np.cos(3 * (a * yy + b * xx) + c) * np.exp(-(yy**2 + xx**2) / (0.5 + rng.random()))
        u = np.linalg.qr(rng.standard_normal((t, r)))[0]
        v = np.linalg.qr(rng.standard_normal((s, r)))[0]
        sv = np.exp(-np.arange(r) / (r / 4)) * np.exp(-d / 3)
        kernel += np.einsum("tr,r,sr,yx->tsyx", u, sv, v, filt)
    kernel += 0.3 * np.linalg.norm(kernel) / np.sqrt(kernel.size) * rng.standard_normal(shape)
    return kernel.astype(np.float32)


def run_tensorly(kernel: np.ndarray, rank: int) -> dict:
    import tensorly as tl
    from tensorly.decomposition import parafac

    tl.set_backend("numpy")
    start = time.perf_counter()
    cp = parafac(tl.tensor(kernel), rank, init="svd", n_iter_max=500, tol=1e-8)
    seconds = time.perf_counter() - start
    approx = tl.cp_to_tensor(cp)
    norm = np.linalg.norm(kernel)
    comps = np.abs(cp.weights) * np.prod([np.linalg.norm(f, axis=0) for f in cp.factors], axis=0)
    return {"rel_error": float(np.linalg.norm(kernel - approx) / norm), "seconds": seconds,
            "max_component_norm": float(comps.max() / norm)}


def run_ours(kernel: np.ndarray, rank: int, method: str) -> dict:
    res = decompose(kernel, rank, method=method, threads=None)
    return {"rel_error": res.rel_error, "seconds": res.seconds, "iterations": res.iterations,
            "max_component_norm": res.max_component_norm, "stop": res.stop_reason}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=str(ROOT / "models"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "solver"))
    ap.add_argument("--threads", default="1")
    ap.add_argument("--only", default=None, help="comma-separated labels to run")
    ap.add_argument("--no-als", action="store_true", help="skip onnx-cp's own ALS column")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="only combine earlier .json results (e.g. runs with --only) into --out")
    args = ap.parse_args()
    if args.merge:
        runs = [json.loads(Path(p).read_text()) for p in args.merge]
        write(Path(args.out), [r for run in runs for r in run["rows"]], runs[0]["meta"])
        return 0

    found = find_kernels(Path(args.models))
    rows = []
    pair = 0
    for label, shape, ranks in TARGETS:
        if args.only and label not in args.only.split(","):
            continue
        if shape in found:
            source, kernel = found[shape]
        else:
            source, kernel = "synthetic", synthetic_trained_like(shape)
        kernel = kernel.astype(np.float64)
        for rank in ranks:
            ours_first = pair % 2 == 0
            pair += 1
            results = {}
            order = ["ours", "tensorly"] if ours_first else ["tensorly", "ours"]
            for who in order:
                results[who] = run_ours(kernel, rank, "nls") if who == "ours" else run_tensorly(kernel, rank)
            if not args.no_als:
                results["ours_als"] = run_ours(kernel, rank, "als")
            row = {"kernel": label, "shape": list(shape), "source": source, "rank": rank, **results,
                   "time_ratio": results["tensorly"]["seconds"] / results["ours"]["seconds"],
                   "error_ratio": results["ours"]["rel_error"] / results["tensorly"]["rel_error"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"threads": args.threads, "python": platform.python_version(), "numpy": np.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import tensorly
        meta["tensorly"] = tensorly.__version__
    except ImportError:
        pass
    write(Path(args.out), rows, meta)
    return 0


def write(out: Path, rows: list[dict], meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "| kernel | shape | rank | tensorly error | tensorly s | onnx-cp NLS error | onnx-cp NLS s"
        " | speed-up | error ratio | max term tensorly / NLS | onnx-cp ALS error | onnx-cp ALS s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        t, o = r["tensorly"], r["ours"]
        a = r.get("ours_als", {})
        lines.append(
            f"| {r['source']} | {'x'.join(map(str, r['shape']))} | {r['rank']} "
            f"| {t['rel_error']:.4f} | {t['seconds']:.1f} | {o['rel_error']:.4f} | {o['seconds']:.2f} "
            f"| {r['time_ratio']:.1f}x | {r['error_ratio']:.4f} "
            f"| {t['max_component_norm']:.2f} / {o['max_component_norm']:.2f} "
            f"| {a.get('rel_error', float('nan')):.4f} | {a.get('seconds', float('nan')):.2f} |")
    lines.append("")
    lines.append(
        f"Relative error ||K - K_hat|| / ||K||, wall seconds, one process, {meta['threads']} BLAS "
        f"thread(s), float64, {meta['date']}, {meta.get('cpus')} CPUs shared with other work. "
        "tensorly: parafac(init='svd', n_iter_max=500, tol=1e-8). onnx-cp: decompose() defaults "
        "(NLS: 25 ALS sweeps, then Levenberg-Marquardt). speed-up: tensorly s / NLS s; error ratio: "
        "NLS error / tensorly error. 'max term': largest rank-one term norm / ||K||.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
