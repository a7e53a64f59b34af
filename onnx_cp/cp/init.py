"""Starting points for the solvers.

"svd" (the default) is data-driven in every mode, including the small spatial modes that an
HOSVD start (tensorly's init="svd") fills with random columns whenever R > kh or R > kw: term r
takes u_i and v_j, leading singular vectors of the T and S unfoldings (i = r, j = r while R fits,
then further distinct (i, j) pairs), and the best rank-one y o x of the kh x kw matrix
K x_T u_i x_S v_j. Tried against picking the R strongest Tucker-core triplets (which reuses u_0
across terms and left ALS and NLS stuck at 15% error on a noisy rank-8 tensor) and HOSVD with
random fill: as good or better on trained-like kernels and robust on the recovery tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnx_cp.errors import UsageError


def leading_vectors(unfolding: np.ndarray, count: int) -> np.ndarray:
    """The `count` leading left singular vectors of a wide matrix, via its small Gram matrix."""
    w, v = np.linalg.eigh(unfolding @ unfolding.T)
    return v[:, np.argsort(-w, kind="stable")[:count]]


def svd_init(kernel: np.ndarray, rank: int) -> list[np.ndarray]:
    t, s, _, _ = kernel.shape
    u_t = leading_vectors(kernel.reshape(t, -1), min(t, rank))
    u_s = leading_vectors(kernel.transpose(1, 0, 2, 3).reshape(s, -1), min(s, rank))
    r = np.arange(rank)
    # Distinct (i, j) pairs: the diagonal first, then shifted diagonals once a mode runs out.
    i = r % u_t.shape[1]
    j = (r + r // u_t.shape[1]) % u_s.shape[1]
    slabs = np.einsum("tsyx,tr,sr->ryx", kernel, u_t[:, i], u_s[:, j], optimize=True)
    uy, sig, vx = np.linalg.svd(slabs, full_matrices=False)
    factors = [u_t[:, i], u_s[:, j], uy[:, :, 0].T * sig[:, 0], vx[:, 0, :].T]
    return [np.ascontiguousarray(a) for a in factors]


def hosvd_init(kernel: np.ndarray, rank: int) -> list[np.ndarray]:
    """Leading singular vectors of each unfolding; a mode smaller than R repeats its vectors
    (cyclically) instead of adding random columns. The first ALS sweep then fits the repeated
    spatial columns to the data, since the T and S columns are orthonormal."""
    out = []
    for n, size in enumerate(kernel.shape):
        u = leading_vectors(np.moveaxis(kernel, n, 0).reshape(size, -1), min(size, rank))
        out.append(np.ascontiguousarray(u[:, np.arange(rank) % u.shape[1]]))
    return out


def random_init(shape: tuple[int, ...], rank: int, seed: int) -> list[np.ndarray]:
    """Gaussian factors scaled so the model's norm is about that of a unit-norm kernel."""
    rng = np.random.default_rng(seed)
    scale = rank ** (-1.0 / 8.0)  # 4 factors: product of scales = rank^-1/2
    return [rng.standard_normal((n, rank)) * (scale / np.sqrt(n)) for n in shape]


def initial_factors(kernel: np.ndarray, rank: int, init, seed: int) -> list[np.ndarray]:
    """Factors for a unit-norm kernel from init = "auto" | "svd" | "hosvd" | "random" | arrays."""
    if isinstance(init, str):
        if init in ("auto", "svd"):
            return svd_init(kernel, rank)
        if init == "hosvd":
            return hosvd_init(kernel, rank)
        if init == "random":
            return random_init(kernel.shape, rank, seed)
        raise UsageError(f"unknown CP init {init!r} (use 'auto', 'svd', 'hosvd', 'random' or four arrays)")
    if not isinstance(init, Sequence) or len(init) != 4:
        raise UsageError("CP init must be 'auto', 'svd', 'random' or a list of four factor arrays")
    factors = [np.array(a, dtype=np.float64) for a in init]
    for n, (a, size) in enumerate(zip(factors, kernel.shape)):
        if a.shape != (size, rank):
            raise UsageError(f"CP init factor {n} has shape {a.shape}, expected {(size, rank)}")
    return factors
