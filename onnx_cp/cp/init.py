"""Starting points for the solvers.

"svd" (the default) is data-driven in every mode, including the small spatial modes that an
HOSVD start (tensorly's init="svd") fills with random columns whenever R > kh*kw: it takes the
leading singular vectors of the T and S unfoldings, forms the Tucker core slices
G[i, j] = K x_T u_i x_S v_j (each a kh x kw matrix), and keeps the R largest singular triplets
(sigma, y, x) over all slices as rank-one terms sigma * u_i o v_j o y o x.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnx_cp.errors import UsageError


def leading_vectors(unfolding: np.ndarray, count: int) -> np.ndarray:
    """The `count` leading left singular vectors of a wide matrix, via its small Gram matrix."""
    w, v = np.linalg.eigh(unfolding @ unfolding.T)
    return v[:, np.argsort(-w, kind="stable")[:count]]


def svd_init(kernel: np.ndarray, rank: int, seed: int) -> list[np.ndarray]:
    t, s, y, x = kernel.shape
    u_t = leading_vectors(kernel.reshape(t, -1), min(t, rank))
    u_s = leading_vectors(kernel.transpose(1, 0, 2, 3).reshape(s, -1), min(s, rank))
    core = np.einsum("tsyx,ti,sj->ijyx", kernel, u_t, u_s, optimize=True)
    ni, nj = core.shape[:2]
    uy, sig, vx = np.linalg.svd(core.reshape(ni * nj, y, x), full_matrices=False)
    k = sig.shape[1]
    order = np.argsort(-sig.ravel(), kind="stable")
    if rank > order.size:  # more terms than candidates: repeat them, slightly perturbed below
        order = np.resize(order, rank)
    order = order[:rank]
    slab, trip = np.divmod(order, k)
    i, j = np.divmod(slab, nj)
    factors = [u_t[:, i], u_s[:, j], uy[slab, :, trip].T * sig[slab, trip], vx[slab, trip, :].T]
    if rank > ni * nj * k:
        rng = np.random.default_rng(seed)
        factors = [a + 1e-3 * rng.standard_normal(a.shape) for a in factors]
    return [np.ascontiguousarray(a) for a in factors]


def random_init(shape: tuple[int, ...], rank: int, seed: int) -> list[np.ndarray]:
    """Gaussian factors scaled so the model's norm is about that of a unit-norm kernel."""
    rng = np.random.default_rng(seed)
    scale = rank ** (-1.0 / 8.0)  # 4 factors: product of scales = rank^-1/2
    return [rng.standard_normal((n, rank)) * (scale / np.sqrt(n)) for n in shape]


def initial_factors(kernel: np.ndarray, rank: int, init, seed: int) -> list[np.ndarray]:
    """Factors for a unit-norm kernel from init = "auto" | "svd" | "random" | four arrays."""
    if isinstance(init, str):
        if init in ("auto", "svd"):
            return svd_init(kernel, rank, seed)
        if init == "random":
            return random_init(kernel.shape, rank, seed)
        raise UsageError(f"unknown CP init {init!r} (use 'auto', 'svd', 'random' or four arrays)")
    if not isinstance(init, Sequence) or len(init) != 4:
        raise UsageError("CP init must be 'auto', 'svd', 'random' or a list of four factor arrays")
    factors = [np.array(a, dtype=np.float64) for a in init]
    for n, (a, size) in enumerate(zip(factors, kernel.shape)):
        if a.shape != (size, rank):
            raise UsageError(f"CP init factor {n} has shape {a.shape}, expected {(size, rank)}")
    return factors
