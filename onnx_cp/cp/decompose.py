"""decompose(): validation, scaling, the solver pipeline, norm bounds, and the result."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from onnx_cp.cp import ops
from onnx_cp.cp.als import als
from onnx_cp.cp.blas import blas_threads
from onnx_cp.cp.init import initial_factors
from onnx_cp.cp.nls import nls
from onnx_cp.cp.result import CPResult, balance, component_norms, sort_components
from onnx_cp.errors import UsageError

METHODS = ("nls", "als")
# Defaults measured on trained kernels (benchmarks/bench_solver.py): NLS reaches ALS-500 error
# or better in a fraction of the time; ALS warm start makes the first LM steps cheap.
DEFAULT_MAX_ITER = {"nls": 100, "als": 500}
DEFAULT_ALS_WARM_START = 25
DEFAULT_TOL = 1e-4
DEFAULT_TOL_STEP = 1e-9
# Ridge penalty 0.5 * ridge * sum ||A_n||^2 on the factors of the unit-norm kernel. Any ridge > 0
# makes the problem well posed (no minimising sequence can run off to infinity), which rules out
# degenerate, cancelling terms. Measured (max term norm / ||K||, relative error): on a noise-like
# 128x48x9x9 kernel at rank 64, ridge 1e-6 -> 16.0, 0.8692; 1e-5 -> 7.8, 0.8697; 1e-4 -> 0.9,
# 0.8711; on a structured 128x128x3x3 kernel at rank 128, 1e-4 already costs 3% error.
DEFAULT_RIDGE = 1e-5
BOUND_ROUNDS = 12
# bound=None still keeps terms below 20 * ||K|| (by raising the ridge, without clipping): on
# charnet's trained 128x48x9x9 kernel at rank 64 the ridge-1e-5 solution had a term of 275 * ||K||
# (tensorly's: 35) for 1% lower error; trained 3x3 kernels stayed below 15.
DEFAULT_SOFT_BOUND = 20.0
# Fits better than this (relative error) get ridge-free refinement steps, see polish().
POLISH_BELOW = 1e-3


def check_args(kernel, rank, method, bound, ridge, time_limit, max_iter, tol) -> np.ndarray:
    arr = np.asarray(kernel)
    if arr.ndim != 4:
        raise UsageError(f"CP kernel must be 4-D (T, S, kh, kw), got shape {arr.shape}")
    if min(arr.shape) < 1:
        raise UsageError(f"CP kernel has an empty dimension: shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise UsageError(f"CP kernel must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise UsageError("CP kernel contains NaN or infinite values")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise UsageError(f"CP rank must be an integer >= 1, got {rank!r}")
    if method not in METHODS:
        raise UsageError(f"unknown CP method {method!r} (use 'nls' or 'als')")
    if bound is not None and not (bound > 0):
        raise UsageError(f"CP bound must be > 0, got {bound!r}")
    if not ridge >= 0:
        raise UsageError(f"CP ridge must be >= 0, got {ridge!r}")
    if time_limit is not None and not (time_limit > 0):
        raise UsageError(f"CP time_limit must be > 0 seconds, got {time_limit!r}")
    if max_iter is not None and (not isinstance(max_iter, (int, np.integer)) or max_iter < 0):
        raise UsageError(f"CP max_iter must be an integer >= 0, got {max_iter!r}")
    if not tol >= 0:
        raise UsageError(f"CP tol must be >= 0, got {tol!r}")
    return arr


def decompose(kernel: np.ndarray, rank: int, *, method: str = "nls", init="auto",
              max_iter: int | None = None, tol: float = DEFAULT_TOL, seed: int = 0,
              time_limit: float | None = None, bound: float | None = None,
              ridge: float = DEFAULT_RIDGE, als_warm_start: int = DEFAULT_ALS_WARM_START,
              tol_step: float = DEFAULT_TOL_STEP, threads: int | None = 1,
              callback: Callable[[int, float], None] | None = None, restarts: int = 1) -> CPResult:
    """Rank-`rank` CP decomposition of a (T, S, kh, kw) kernel, K ~ sum_r t_r o s_r o y_r o x_r.

    method: "nls" (Levenberg-Marquardt Gauss-Newton started by `als_warm_start` ALS sweeps) or "als".
    init: "auto"/"svd" (data-driven in every mode, see cp.init), "random" (uses `seed`), or four
        factor arrays (a warm start, e.g. from a neighbouring rank).
    max_iter: NLS steps or ALS sweeps (default 100 / 500).
    tol: stop when the objective falls by less than tol (relative to its value) per iteration,
        on average over the last 10 iterations (1e-4: the error still improves by under 0.005%
        per iteration), or when the fit is exact to rounding.
    time_limit: seconds; the solver returns its best factors so far when it runs out.
    bound: keep every rank-one term's norm at most bound * ||K|| (max_component_norm <= bound):
        the ridge penalty is raised until it holds, then any remaining term is scaled down.
        None: a soft limit of 20 (ridge raised, no scaling down); float("inf"): no limit.
    ridge: penalty 0.5 * ridge * sum ||A_n||^2 on the factors of K / ||K|| (keeps terms bounded).
    callback: called as callback(iteration, objective) at the start (0) and after every ALS sweep
        and accepted NLS step.
    restarts: number of starting points to solve from, keeping the lowest error: the first is
        `init`, then "hosvd", then random starts with seeds seed+1, seed+2, ... (low ranks have
        several local minima of similar error; each start costs a full solve).
    threads: OpenBLAS threads while solving (1 is fastest for these small GEMMs; None: unchanged).
    """
    if isinstance(restarts, bool) or not isinstance(restarts, (int, np.integer)) or restarts < 1:
        raise UsageError(f"CP restarts must be an integer >= 1, got {restarts!r}")
    check_args(kernel, rank, method, bound, ridge, time_limit, max_iter, tol)
    if isinstance(als_warm_start, bool) or not isinstance(als_warm_start, (int, np.integer)) \
            or als_warm_start < 0:
        raise UsageError(f"CP als_warm_start must be an integer >= 0, got {als_warm_start!r}")
    second = "svd" if isinstance(init, str) and init == "hosvd" else "hosvd"
    starts = [(init, seed), (second, seed)] + [("random", seed + k) for k in range(1, restarts)]
    best = None
    began = time.perf_counter()
    with blas_threads(threads):
        for start_init, start_seed in starts[:restarts]:
            left = None if time_limit is None else time_limit - (time.perf_counter() - began)
            if best is not None and left is not None and left <= 0:
                break
            res = _decompose(kernel, rank, method, start_init, max_iter, tol, start_seed,
                             max(left, 1e-9) if left is not None else None, bound, ridge,
                             als_warm_start, tol_step, callback)
            if best is None or res.rel_error < best.rel_error:
                best = res
            if best.rel_error == 0.0:
                break
    best.seconds = time.perf_counter() - began
    return best


class _History(list):
    """The objective history; reports each new value to the user's callback."""

    def __init__(self, callback):
        super().__init__()
        self.callback = callback

    def append(self, value: float) -> None:
        super().append(value)
        if self.callback is not None and not math.isnan(value):
            self.callback(len(self) - 1, value)


def _decompose(kernel, rank, method, init, max_iter, tol, seed, time_limit, bound, ridge,
               als_warm_start, tol_step, callback) -> CPResult:
    start = time.perf_counter()
    arr = check_args(kernel, rank, method, bound, ridge, time_limit, max_iter, tol)
    rank = int(rank)
    deadline = None if time_limit is None else start + float(time_limit)
    if max_iter is None:
        max_iter = DEFAULT_MAX_ITER[method]
    norm = float(np.linalg.norm(arr))
    if norm == 0.0:
        zeros = [np.zeros((n, rank)) for n in arr.shape]
        return CPResult(zeros, 0.0, 0, True, time.perf_counter() - start, 0.0, method, [0.0], ridge,
                        "zero kernel")
    unit = arr / norm
    if isinstance(init, str):
        factors = initial_factors(unit, rank, init, seed)
    else:
        factors = [a / norm ** 0.25 for a in initial_factors(unit, rank, init, seed)]
    kt = ops.KernelTensor(unit)
    history = _History(callback)

    def solve(factors, ridge, max_iter):
        if method == "als":
            return als(kt, factors, ridge=ridge, max_iter=max_iter, tol=tol, deadline=deadline,
                       history=history)
        warm = min(als_warm_start, max_iter) if max_iter else 0
        factors, n_als, reason = als(kt, factors, ridge=ridge, max_iter=warm, tol=tol,
                                     deadline=deadline, history=history) if warm else (factors, 0, "")
        if reason == "time_limit":
            return factors, n_als, reason
        factors, n_nls, reason = nls(kt, factors, ridge=ridge, max_iter=max_iter, tol=tol,
                                     tol_step=tol_step, deadline=deadline, history=history)
        return factors, n_als + n_nls, reason

    factors, iterations, reason = solve(factors, ridge, max_iter)
    if ridge > 0 and reason != "time_limit":
        factors, more = polish(unit, kt, factors, method, max_iter, tol, tol_step, deadline,
                               history)
        iterations += more
    limit = DEFAULT_SOFT_BOUND if bound is None else bound
    if math.isfinite(limit):
        rounds = 0
        while (component_norms(factors).max() > limit and rounds < BOUND_ROUNDS
               and reason != "time_limit"):
            # Raise the penalty and continue from where we are; history restarts its objective.
            # Gentle steps: a 10x jump overshoots and shrinks weak terms far below the bound.
            ridge = max(3.0 * ridge, 1e-4)
            history.append(math.nan)
            factors, more, reason = solve(factors, ridge, max(max_iter // 4, 10))
            iterations += more
            rounds += 1
        if bound is not None:
            factors = clip_components(factors, bound)
    factors = sort_components(balance(factors))
    comp = component_norms(factors)
    rel_error = float(np.linalg.norm(unit - ops.reconstruct(factors)))
    scale = norm ** 0.25
    return CPResult(
        factors=[a * scale for a in factors],
        rel_error=rel_error,
        iterations=int(iterations),
        converged=reason == "tol",
        seconds=time.perf_counter() - start,
        max_component_norm=float(comp.max()),
        method=method,
        history=list(history),
        ridge=ridge,
        stop_reason=reason,
    )


def polish(unit, kt, factors, method, max_iter, tol, tol_step, deadline, history):
    """Refine a near-exact fit without the ridge, whose bias (about `ridge` relative) would
    otherwise dominate its error. Kept only if it lowers the error without growing any term:
    an exactly representable kernel has no degenerate solution nearby to drift into."""
    fit = np.linalg.norm(unit - ops.reconstruct(factors))
    if fit > POLISH_BELOW:
        return factors, 0
    trial_history: list[float] = []
    if method == "nls":
        refined, steps, _ = nls(kt, factors, ridge=0.0, max_iter=min(max_iter, 20), tol=tol,
                                tol_step=tol_step, deadline=deadline, history=trial_history)
    else:
        refined, steps, _ = als(kt, factors, ridge=0.0, max_iter=min(max_iter, 100), tol=tol,
                                deadline=deadline, history=trial_history)
    new_fit = np.sqrt(2.0 * trial_history[-1])
    if new_fit < fit and component_norms(refined).max() <= 1.01 * component_norms(factors).max():
        history.append(math.nan)
        history.extend(trial_history)
        return refined, steps
    return factors, 0


def clip_components(factors: list[np.ndarray], bound: float) -> list[np.ndarray]:
    """Scale down any rank-one term whose norm exceeds `bound` (the hard guarantee)."""
    comp = component_norms(factors)
    shrink = np.where(comp > bound, bound / np.maximum(comp, 1e-300), 1.0) ** 0.25
    return [a * shrink for a in factors]
