"""Alternating least squares: each sweep solves exactly for one factor at a time.

A sweep costs two GEMMs with the kernel (see ops.KernelTensor): K x_S A_S serves the T, Y and X
updates, K^T (A_T kr A_Y kr A_X) the S update. With a ridge penalty every update is the exact
minimiser of the penalised objective over that factor, so the objective never increases.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.linalg

from onnx_cp.cp import ops
from onnx_cp.cp.result import balance


def solve_factor(mttkrp: np.ndarray, gamma: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_A 0.5 ||K_(n) - A W^T||^2 + 0.5 ridge ||A||^2, i.e. A = M (Gamma + ridge I)^-1."""
    lhs = gamma + ridge * np.eye(gamma.shape[0])
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(lhs), mttkrp.T).T
    except (np.linalg.LinAlgError, ValueError):
        # Singular Gram (e.g. ridge=0 with repeated or zero columns): least-norm solution.
        return np.linalg.lstsq(lhs, mttkrp.T, rcond=None)[0].T


def als(kt: ops.KernelTensor, factors: list[np.ndarray], *, ridge: float, max_iter: int,
        tol: float, deadline: float | None, history: list[float]) -> tuple[list[np.ndarray], int, str]:
    """Run ALS sweeps; returns (factors, sweeps, stop reason). Appends the objective to history."""
    a = [f.copy() for f in factors]
    g = ops.grams(a)
    if not history:
        history.append(ops.evaluate(kt, a, ridge).f)
    for sweep in range(1, max_iter + 1):
        ks = kt.contract_s(a[1])
        a[0] = solve_factor(ops.mttkrp_t(ks, a[2], a[3]), ops.hadamard_except(g, (0,)), ridge)
        g[0] = a[0].T @ a[0]
        slab = ops.spatial_slab(ks, a[0])
        m_y = np.einsum("yxr,xr->yr", slab, a[3])
        a[2] = solve_factor(m_y, ops.hadamard_except(g, (2,)), ridge)
        g[2] = a[2].T @ a[2]
        m_x = np.einsum("yxr,yr->xr", slab, a[2])
        a[3] = solve_factor(m_x, ops.hadamard_except(g, (3,)), ridge)
        g[3] = a[3].T @ a[3]
        m_s = kt.mttkrp_s(a[0], a[2], a[3])
        a[1] = solve_factor(m_s, ops.hadamard_except(g, (1,)), ridge)
        g[1] = a[1].T @ a[1]
        f = ops.objective(float(np.vdot(m_s, a[1])), g, a, ridge)
        a = balance(a)
        g = ops.grams(a)
        history.append(f)
        if ops.stalled(history, tol):
            return a, sweep, "tol"
        if deadline is not None and time.perf_counter() > deadline:
            return a, sweep, "time_limit"
    return a, max_iter, "max_iter"
