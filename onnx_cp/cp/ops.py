"""Tensor algebra shared by the solvers: MTTKRPs as two GEMMs, Gram matrices, objective.

The kernel K (T, S, Y, X) is kept as one matrix of shape (T*Y*X, S). Every quantity a solver step
needs comes from two matrix products with it: K x_S A_S (which yields the T, Y and X MTTKRPs) and
K^T (A_T kr A_Y kr A_X) (the S MTTKRP). Both are plain BLAS GEMMs, so a step costs about
2 * T*S*Y*X*R flops and never builds an intermediate larger than the kernel times R / S.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Mode order everywhere: 0 = T (out channels), 1 = S (in channels), 2 = Y (kh), 3 = X (kw).
NMODES = 4


class KernelTensor:
    """A float64 4-way kernel in the layout the GEMMs want."""

    def __init__(self, kernel: np.ndarray):
        t, s, y, x = kernel.shape
        self.shape = (t, s, y, x)
        # rows ordered (t, y, x), columns s: contiguous for both GEMMs.
        self.k_tqs = np.ascontiguousarray(kernel.transpose(0, 2, 3, 1)).reshape(t * y * x, s)

    def contract_s(self, a_s: np.ndarray) -> np.ndarray:
        """K x_S A_S as an array (T, Y, X, R)."""
        t, _, y, x = self.shape
        return (self.k_tqs @ a_s).reshape(t, y, x, a_s.shape[1])

    def mttkrp_s(self, a_t: np.ndarray, a_y: np.ndarray, a_x: np.ndarray) -> np.ndarray:
        """The mode-S MTTKRP, (S, R)."""
        w = a_t[:, None, :] * spatial_kr(a_y, a_x)[None, :, :]
        return self.k_tqs.T @ w.reshape(-1, a_t.shape[1])


def spatial_kr(a_y: np.ndarray, a_x: np.ndarray) -> np.ndarray:
    """Column-wise Kronecker product of the spatial factors, (Y*X, R), row index y*X + x."""
    return (a_y[:, None, :] * a_x[None, :, :]).reshape(-1, a_y.shape[1])


# The batched contractions below use plain np.einsum on 3-D views: numpy's optimize=True path
# turns them into transposed copies plus batched matmuls, measured 14-25x slower here.
def mttkrp_t(ks: np.ndarray, a_y: np.ndarray, a_x: np.ndarray) -> np.ndarray:
    """Mode-T MTTKRP from ks = K x_S A_S (T, Y, X, R)."""
    t, y, x, r = ks.shape
    return np.einsum("tqr,qr->tr", ks.reshape(t, y * x, r), spatial_kr(a_y, a_x))


def spatial_slab(ks: np.ndarray, a_t: np.ndarray) -> np.ndarray:
    """K x_S A_S x_T A_T taken column-wise: (Y, X, R); the Y and X MTTKRPs contract it once more."""
    t, y, x, r = ks.shape
    return np.einsum("tqr,tr->qr", ks.reshape(t, y * x, r), a_t).reshape(y, x, r)


def grams(factors: list[np.ndarray]) -> list[np.ndarray]:
    return [a.T @ a for a in factors]


def hadamard_except(gram_list: list[np.ndarray], skip: tuple[int, ...]) -> np.ndarray:
    r = gram_list[0].shape[0]
    out = np.ones((r, r))
    for n, g in enumerate(gram_list):
        if n not in skip:
            out = out * g
    return out


def model_norm2(gram_list: list[np.ndarray]) -> float:
    """||[[A]]||^2 = sum of the Hadamard product of all four Gram matrices."""
    return float(hadamard_except(gram_list, ()).sum())


def penalty(factors: list[np.ndarray], ridge: float) -> float:
    return 0.5 * ridge * sum(float(np.vdot(a, a)) for a in factors)


def objective(inner: float, gram_list: list[np.ndarray], factors: list[np.ndarray],
              ridge: float) -> float:
    """0.5 ||K - [[A]]||^2 + 0.5 ridge sum ||A_n||^2 for a unit-norm K, from <K, [[A]]> and Grams."""
    fit = 0.5 * max(1.0 - 2.0 * inner + model_norm2(gram_list), 0.0)
    return fit + penalty(factors, ridge)


@dataclass
class Point:
    """Factors with everything a Gauss-Newton step needs at them."""

    factors: list[np.ndarray]
    gram: list[np.ndarray]
    mttkrp: list[np.ndarray | None]
    f: float


def evaluate(kt: KernelTensor, factors: list[np.ndarray], ridge: float) -> Point:
    """Objective at `factors` (one GEMM); the mode-S MTTKRP is left for `complete_gradient`."""
    a_t, a_s, a_y, a_x = factors
    ks = kt.contract_s(a_s)
    m_t = mttkrp_t(ks, a_y, a_x)
    slab = spatial_slab(ks, a_t)
    m_y = np.einsum("yxr,xr->yr", slab, a_x)
    m_x = np.einsum("yxr,yr->xr", slab, a_y)
    g = grams(factors)
    inner = float(np.vdot(m_t, a_t))
    return Point(factors, g, [m_t, None, m_y, m_x], objective(inner, g, factors, ridge))


def complete_gradient(kt: KernelTensor, pt: Point) -> list[np.ndarray]:
    """Gradient of the objective: A_n (Gamma_n + ridge I) - MTTKRP_n (second GEMM for mode S)."""
    a_t, _, a_y, a_x = pt.factors
    if pt.mttkrp[1] is None:
        pt.mttkrp[1] = kt.mttkrp_s(a_t, a_y, a_x)
    return [a @ hadamard_except(pt.gram, (n,)) - m for n, (a, m) in
            enumerate(zip(pt.factors, pt.mttkrp))]


# Objective of a unit-norm kernel below which the fit is exact to rounding (relative error ~4e-8):
# the objective is computed from <K, model> and ||model||^2, which cancel to about 1e-16.
EXACT_F = 1e-15
STALL_WINDOW = 10


def stalled(history: list[float], tol: float) -> bool:
    """True when the fit is exact, or the objective fell by less than tol (relative to its
    value) per iteration on average over the last STALL_WINDOW iterations."""
    f = history[-1]
    if f <= EXACT_F:
        return True
    if len(history) <= STALL_WINDOW:
        return False
    return history[-1 - STALL_WINDOW] - f <= STALL_WINDOW * tol * f


def reconstruct(factors) -> np.ndarray:
    """The (T, S, kh, kw) tensor sum_r a_t[:, r] o a_s[:, r] o a_y[:, r] o a_x[:, r]."""
    a_t, a_s, a_y, a_x = (np.asarray(a, dtype=np.float64) for a in factors)
    r = a_t.shape[1]
    # (T*Y*X, R) @ (R, S) keeps the intermediate at kernel size * R / S, never T*S*R.
    w = (a_t[:, None, :] * spatial_kr(a_y, a_x)[None, :, :]).reshape(-1, r)
    full = (w @ a_s.T).reshape(a_t.shape[0], a_y.shape[0], a_x.shape[0], a_s.shape[0])
    return np.ascontiguousarray(full.transpose(0, 3, 1, 2))


def relative_error(kernel: np.ndarray, approx: np.ndarray) -> float:
    """||K - K_hat|| / ||K|| (0.0 for an all-zero kernel)."""
    norm = float(np.linalg.norm(kernel))
    return float(np.linalg.norm(kernel - approx)) / norm if norm > 0 else 0.0


def pooled_relative_error(kernels: Sequence[np.ndarray], errors: Sequence[float]) -> float:
    """The relative error of the stacked kernels from each part's own relative error (groups of a
    grouped conv are decomposed one by one)."""
    squares = [float((np.asarray(k, dtype=np.float64) ** 2).sum()) for k in kernels]
    total = sum(squares)
    return (sum(e * e * s for e, s in zip(errors, squares)) / total) ** 0.5 if total > 0 else 0.0
