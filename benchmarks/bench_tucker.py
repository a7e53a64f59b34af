"""onnx-cp's Tucker-2 solver (HOOI from an HOSVD start) against tensorly's partial_tucker on trained
convolution kernels (not part of CI).

    python benchmarks/bench_tucker.py        # writes benchmarks/results/tucker.{md,json}

Kernels: every Conv of models/charnet.onnx and models/charresnet.onnx with a spatial extent and
at least 16 input channels, at ranks (R_in, R_out) = 1/4 and 1/2 of (S, T). Both solvers run in this
process one after the other (the order alternates between kernels), on one BLAS thread, float64;
the time is the best of --repeats runs. tensorly: partial_tucker(modes=[0, 1], init="svd",
n_iter_max=100, tol=1e-8). onnx-cp: lowrank.tucker2() with defaults (at most 100 sweeps, stop when
the captured energy grows by less than 1e-9 of the kernel's).
"""

from __future__ import annotations

import os
import sys

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"  # before numpy loads: both solvers on the same single-threaded BLAS

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_cp.lowrank import tucker2  # noqa: E402

MODELS = [ROOT / "models" / "charnet.onnx", ROOT / "models" / "charresnet.onnx"]


def kernels() -> list[tuple[str, np.ndarray]]:
    out = []
    for path in MODELS:
        model = onnx.load(str(path))
        inits = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Conv" and node.input[1] in inits:
                kernel = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
                if kernel.ndim == 4 and kernel.shape[2] * kernel.shape[3] > 1 and kernel.shape[1] >= 16:
                    out.append((f"{path.stem}:{node.name}", kernel))
    return out


def relative_error(kernel: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(kernel - approx) / np.linalg.norm(kernel))


def run_ours(kernel: np.ndarray, ranks: tuple[int, int], repeats: int) -> dict:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = tucker2(kernel, ranks)
        best = min(best, time.perf_counter() - start)
    approx = np.einsum("bayx,tb,sa->tsyx", result.core, result.u_out, result.u_in)
    return {"rel_error": relative_error(kernel, approx), "seconds": best, "iterations": result.iterations}


def run_tensorly(kernel: np.ndarray, ranks: tuple[int, int], repeats: int) -> dict:
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    best, approx = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        (core, factors), _ = partial_tucker(kernel, rank=[ranks[1], ranks[0]], modes=[0, 1], init="svd",
                                            n_iter_max=100, tol=1e-8)
        best = min(best, time.perf_counter() - start)
        approx = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
    return {"rel_error": relative_error(kernel, approx), "seconds": best}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tucker"))
    args = parser.parse_args()
    import tensorly

    rows = []
    for index, (label, kernel) in enumerate(kernels()):
        t, s = kernel.shape[:2]
        for fraction in (4, 2):
            ranks = (max(1, s // fraction), max(1, t // fraction))
            order = ["ours", "tensorly"] if index % 2 == 0 else ["tensorly", "ours"]
            results = {}
            for who in order:
                results[who] = (run_ours if who == "ours" else run_tensorly)(kernel, ranks, args.repeats)
            row = {"kernel": label, "shape": list(kernel.shape), "ranks": list(ranks), **{
                f"{who}_{k}": v for who, r in results.items() for k, v in r.items()},
                "time_ratio": results["tensorly"]["seconds"] / results["ours"]["seconds"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"command": "python benchmarks/bench_tucker.py " + " ".join(sys.argv[1:]), "machine": platform.machine(),
            "python": platform.python_version(), "numpy": np.__version__, "tensorly": tensorly.__version__,
            "blas_threads": 1}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Tucker-2: onnx-cp HOOI vs tensorly partial_tucker on trained kernels", "",
             f"`{meta['command'].strip()}` (numpy {meta['numpy']}, tensorly {meta['tensorly']}, one BLAS thread, "
             f"best of {args.repeats})", "",
             "| kernel | shape | ranks (R_in, R_out) | error onnx-cp | error tensorly | time onnx-cp | time tensorly "
             "| tensorly / onnx-cp time | sweeps |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {'x'.join(map(str, r['shape']))} | ({r['ranks'][0]}, {r['ranks'][1]}) | "
                     f"{r['ours_rel_error']:.5f} | {r['tensorly_rel_error']:.5f} | {1e3 * r['ours_seconds']:.1f} ms | "
                     f"{1e3 * r['tensorly_seconds']:.1f} ms | {r['time_ratio']:.1f}x | {r['ours_iterations']} |")
    worse = [r for r in rows if r["ours_rel_error"] > r["tensorly_rel_error"] + 1e-9]
    lines += ["", f"onnx-cp's error is lower or equal on {len(rows) - len(worse)} of {len(rows)} (kernel, ranks); "
              f"median time ratio {np.median([r['time_ratio'] for r in rows]):.1f}x."]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
