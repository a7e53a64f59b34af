"""CP by non-linear least squares: Gauss-Newton with Levenberg-Marquardt damping.

Each step solves (J^T J + ridge I + lambda I) p = -g by preconditioned conjugate gradients, never
forming the Jacobian J: the (n, m) block of J^T J applied to P_m is A_n (H_nm * (P_m^T A_m)) with
H_nm the Hadamard product of the other two factors' Gram matrices, and the diagonal block is
P_n Gamma_n (Tensorlab's cpd_nls does the same). The block-Jacobi preconditioner inverts the
diagonal blocks, (Gamma_n + (ridge + lambda) I) (x) I, exactly. A step costs one GEMM with the
kernel to evaluate the objective and one more, when accepted, to finish the gradient.

lambda follows Nielsen's rule from the gain ratio rho = actual / predicted decrease; only steps
that lower the objective are accepted, so the objective history never increases.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from onnx_cp.cp import ops
from onnx_cp.cp.result import balance

CG_MAX_ITER = 15
CG_TOL = 1e-6


class Gramian:
    """J^T J + shift * I at fixed factors, with its block-Jacobi preconditioner."""

    def __init__(self, factors: list[np.ndarray], gram: list[np.ndarray], ridge: float):
        self.factors = factors
        self.ridge = ridge
        self.gamma = [ops.hadamard_except(gram, (n,)) for n in range(ops.NMODES)]
        # pair[n, m] = Hadamard product of the Grams other than n and m; zero on the diagonal so
        # that all off-diagonal blocks are one batched product.
        r = gram[0].shape[0]
        self.pair = np.zeros((ops.NMODES, ops.NMODES, r, r))
        for n in range(ops.NMODES):
            for m in range(ops.NMODES):
                if n != m:
                    self.pair[n, m] = ops.hadamard_except(gram, (n, m))
        self.sizes = [a.size for a in factors]
        self.shapes = [a.shape for a in factors]
        self.offsets = np.cumsum(self.sizes)[:-1]

    def split(self, v: np.ndarray) -> list[np.ndarray]:
        return [p.reshape(s) for p, s in zip(np.split(v, self.offsets), self.shapes)]

    def apply(self, v: np.ndarray, damping: float) -> np.ndarray:
        p = self.split(v)
        cross = np.stack([pm.T @ am for pm, am in zip(p, self.factors)])
        mix = np.einsum("nmrs,mrs->nrs", self.pair, cross)
        shift = self.ridge + damping
        return np.concatenate([(pn @ self.gamma[n] + an @ mix[n] + shift * pn).ravel()
                               for n, (pn, an) in enumerate(zip(p, self.factors))])

    def preconditioner(self, damping: float):
        inv = [np.linalg.inv(g + (self.ridge + damping) * np.eye(g.shape[0])) for g in self.gamma]

        def apply(v: np.ndarray) -> np.ndarray:
            return np.concatenate([(pn @ m).ravel() for pn, m in zip(self.split(v), inv)])

        return apply


def pcg(apply_a, b: np.ndarray, precond, max_iter: int, tol: float) -> np.ndarray:
    """Preconditioned conjugate gradients for A x = b from x = 0."""
    x = np.zeros_like(b)
    r = b.copy()
    z = precond(r)
    p = z.copy()
    rz = float(r @ z)
    b_norm = float(np.linalg.norm(b))
    for _ in range(max_iter):
        ap = apply_a(p)
        pap = float(p @ ap)
        if pap <= 0.0:
            break
        alpha = rz / pap
        x += alpha * p
        r -= alpha * ap
        if np.linalg.norm(r) <= tol * b_norm:
            break
        z = precond(r)
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def nls(kt: ops.KernelTensor, factors: list[np.ndarray], *, ridge: float, max_iter: int,
        tol: float, tol_step: float, deadline: float | None,
        history: list[float]) -> tuple[list[np.ndarray], int, str]:
    """Levenberg-Marquardt iterations; returns (factors, iterations, stop reason)."""
    pt = ops.evaluate(kt, balance(factors), ridge)
    if not history or pt.f < history[-1]:
        history.append(pt.f)
    grad = np.concatenate([g.ravel() for g in ops.complete_gradient(kt, pt)])
    gramian = Gramian(pt.factors, pt.gram, ridge)
    damping = 1e-3 * max(float(np.max(np.diag(g))) for g in gramian.gamma)
    nu = 2.0
    for it in range(1, max_iter + 1):
        if pt.f <= ops.EXACT_F:
            return pt.factors, it - 1, "tol"
        step = pcg(functools.partial(gramian.apply, damping=damping), -grad, gramian.preconditioner(damping),
                   CG_MAX_ITER, CG_TOL)
        predicted = -(float(grad @ step) + 0.5 * float(step @ gramian.apply(step, 0.0)))
        x_norm = np.sqrt(sum(float(np.vdot(a, a)) for a in pt.factors))
        small_step = np.linalg.norm(step) <= tol_step * max(x_norm, 1e-300)
        trial_factors = [a + p for a, p in zip(pt.factors, gramian.split(step))]
        trial = ops.evaluate(kt, trial_factors, ridge)
        actual = pt.f - trial.f
        if predicted > 0 and actual > 0:
            rho = actual / predicted
            pt = trial
            history.append(pt.f)
            grad = np.concatenate([g.ravel() for g in ops.complete_gradient(kt, pt)])
            gramian = Gramian(pt.factors, pt.gram, ridge)
            damping *= max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
            nu = 2.0
            if small_step or ops.stalled(history, tol):
                return pt.factors, it, "tol"
        else:
            if small_step:
                return pt.factors, it, "tol"
            damping *= nu
            nu *= 2.0
        if deadline is not None and time.perf_counter() > deadline:
            return pt.factors, it, "time_limit"
    return pt.factors, max_iter, "max_iter"
