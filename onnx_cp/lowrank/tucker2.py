"""Tucker-2 of a conv kernel: K[t,s,y,x] ~ sum_{a,b} U_out[t,b] C[b,a,y,x] U_in[s,a] (Kim et al.,
ICLR 2016), i.e. a 1x1 conv S -> R_in, a kh x kw conv R_in -> R_out, a 1x1 conv R_out -> T.

Found by HOOI (alternating projections on the two channel modes) from an HOSVD start. Each factor
update is the leading eigenvectors of a small Gram matrix (T x T or S x S) rather than an SVD of a
wide unfolding: the cost per sweep is two tensor contractions, which is what makes it much cheaper
than a general Tucker solver on these shapes."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from onnx_cp.cp.blas import blas_threads
from onnx_cp.errors import UsageError

DEFAULT_MAX_ITER = 100
DEFAULT_TOL = 1e-9  # stop when the captured energy improves by less than this fraction


@dataclass
class Tucker2Result:
    """u_out (T, R_out) and u_in (S, R_in) with orthonormal columns; core (R_out, R_in, kh, kw);
    rel_error = ||K - K_hat|| / ||K|| (0.0 for a zero kernel)."""

    u_out: np.ndarray
    core: np.ndarray
    u_in: np.ndarray
    rel_error: float
    iterations: int
    seconds: float

    @property
    def factors(self) -> list[np.ndarray]:
        return [self.u_out, self.core, self.u_in]

    @property
    def rank(self) -> tuple[int, int]:
        return int(self.u_in.shape[1]), int(self.u_out.shape[1])


def tucker2(kernel: np.ndarray, ranks: tuple[int, int], *, max_iter: int = DEFAULT_MAX_ITER,
            tol: float = DEFAULT_TOL) -> Tucker2Result:
    """Tucker-2 of `kernel` (T, S, kh, kw) at ranks (R_in, R_out), R_in <= S, R_out <= T."""
    kernel = np.asarray(kernel, dtype=np.float64)
    r_in, r_out = _check(kernel, ranks)
    # Small products: several BLAS threads on a busy machine spin more than they compute (30x
    # slower measured on 2 shared cores), as for the CP solver (cp/blas.py).
    with blas_threads(1):
        return _hooi(kernel, r_in, r_out, max_iter, tol)


def _hooi(kernel: np.ndarray, r_in: int, r_out: int, max_iter: int, tol: float) -> Tucker2Result:
    start = time.perf_counter()
    total = float(np.sum(kernel * kernel))
    # HOSVD start: the leading singular vectors of each channel unfolding.
    u_in, _ = _leading(_gram(kernel, mode=1), r_in)
    u_out, _ = _leading(_gram(kernel, mode=0), r_out)
    captured, iterations = 0.0, 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        u_out, _ = _leading(_gram(_project(kernel, u_in, mode=1), mode=0), r_out)
        # ||core||^2 is the sum of the leading eigenvalues of the last update: the energy captured.
        u_in, energy = _leading(_gram(_project(kernel, u_out, mode=0), mode=1), r_in)
        previous, captured = captured, energy
        if total == 0 or captured - previous <= tol * total:
            break
    core = _core(kernel, u_out, u_in)
    approx = reconstruct([u_out, core, u_in])
    error = float(np.linalg.norm(kernel - approx) / np.sqrt(total)) if total > 0 else 0.0
    return Tucker2Result(u_out, core, u_in, error, iterations, time.perf_counter() - start)


def reconstruct(factors: list[np.ndarray]) -> np.ndarray:
    u_out, core, u_in = factors
    return np.einsum("bayx,tb,sa->tsyx", core, u_out, u_in, optimize=True)


def _check(kernel: np.ndarray, ranks: tuple[int, int]) -> tuple[int, int]:
    if kernel.ndim != 4:
        raise UsageError(f"expected a (T, S, kh, kw) kernel, got shape {kernel.shape}")
    if len(ranks) != 2 or any(isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1 for r in ranks):
        raise UsageError(f"Tucker-2 ranks must be two integers of at least 1, got {ranks!r}")
    r_in, r_out = int(ranks[0]), int(ranks[1])
    t, s = kernel.shape[:2]
    if r_in > s or r_out > t:
        raise UsageError(f"Tucker-2 ranks ({r_in}, {r_out}) exceed the kernel's channels (S={s}, T={t})")
    return r_in, r_out


def _gram(tensor: np.ndarray, mode: int) -> np.ndarray:
    """The Gram matrix of the mode-`mode` unfolding (its left singular vectors are its eigenvectors)."""
    unfolded = np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)
    return unfolded @ unfolded.T


def _leading(gram: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    """The `rank` leading eigenvectors of a symmetric PSD matrix, largest first, sign-fixed so that
    results are deterministic, and the sum of their eigenvalues."""
    values, vectors = np.linalg.eigh(gram)
    top = vectors[:, ::-1][:, :rank]
    signs = np.sign(top[np.argmax(np.abs(top), axis=0), np.arange(rank)])
    return top * np.where(signs == 0, 1.0, signs), float(values[::-1][:rank].sum())


def _project(kernel: np.ndarray, factor: np.ndarray, mode: int) -> np.ndarray:
    """The kernel with channel mode `mode` projected onto the columns of `factor` (mode kept in place)."""
    return np.moveaxis(np.tensordot(factor, kernel, axes=([0], [mode])), 0, mode)


def _core(kernel: np.ndarray, u_out: np.ndarray, u_in: np.ndarray) -> np.ndarray:
    return _project(_project(kernel, u_out, mode=0), u_in, mode=1)
