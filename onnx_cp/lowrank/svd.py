"""Truncated SVD forms of a conv kernel (AIMET's weight SVD and spatial SVD).

Channel SVD: the (T, S*kh*kw) matrix of the kernel is U V, so the conv becomes a kh x kw conv
S -> R (V) and a 1x1 conv R -> T (U); for a 1x1 conv (or a Gemm weight) that is two thin 1x1 convs.
Spatial SVD: the (S*kh, T*kw) matrix [s,y ; t,x] is A B, so the conv becomes a kh x 1 conv S -> R
(A) and a 1 x kw conv R -> T (B). Both are optimal at every rank (Eckart-Young), and one SVD gives
the error of every rank.

With a Gram matrix G = X X^T of the layer's input patches (S*kh*kw square, from sample data),
channel SVD becomes data-aware (reduced-rank regression, as in whitened SVD-LLM / ASVD): the rank-R
kernel that moves the layer's outputs on that data the least, ||(K - U V) X||, is the truncated SVD
of K L (G = L L^T, with a small ridge) mapped back by L^-1; its error is then ||(K - U V) X|| / ||K X||."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

import numpy as np

from onnx_cp.errors import UsageError


@dataclass
class SVDResult:
    """factors: channel SVD [u (T, R), v (R, S, kh, kw)]; spatial SVD [h (T, R, kw), v (R, S, kh)];
    singular values split evenly (sqrt) between the two, so both stages are equally scaled."""

    factors: list[np.ndarray]
    rel_error: float
    seconds: float

    @property
    def rank(self) -> int:
        return int(self.factors[0].shape[1])


# Relative ridge on a Gram matrix: ||(K - K')X||^2 + ridge * mean(diag G) * ||K - K'||^2, so that
# directions the data never excites (dead channels) are fit as a weight SVD would, not arbitrarily.
GRAM_RIDGE = 1e-2


def channel_svd(kernel: np.ndarray, rank: int, gram: np.ndarray | None = None) -> SVDResult:
    """The rank-`rank` channel SVD of `kernel`; with `gram` (the layer's input-patch Gram matrix,
    S*kh*kw square) the one optimal on that data, its error relative to the layer's outputs."""
    kernel = _check(kernel, rank)
    t, s, kh, kw = kernel.shape
    start = time.perf_counter()
    matrix = kernel.reshape(t, s * kh * kw)
    if gram is None:
        left, right, error = _truncated(matrix, rank)
    else:
        root = _gram_root(gram, s * kh * kw)
        left, right, _ = _truncated(matrix @ root, rank)
        right = np.linalg.solve(root.T, right.T).T  # V L^-1
        error = _data_error(matrix, left @ right, gram)
    return SVDResult([left, right.reshape(-1, s, kh, kw)], error, time.perf_counter() - start)


def spatial_svd(kernel: np.ndarray, rank: int) -> SVDResult:
    kernel = _check(kernel, rank)
    t, s, kh, kw = kernel.shape
    start = time.perf_counter()
    left, right, error = _truncated(_spatial_matrix(kernel), rank)
    vertical = left.reshape(s, kh, -1).transpose(2, 0, 1)  # (R, S, kh)
    horizontal = right.reshape(-1, t, kw).transpose(1, 0, 2)  # (T, R, kw)
    return SVDResult([horizontal, vertical], error, time.perf_counter() - start)


def channel_svd_errors(kernel: np.ndarray) -> np.ndarray:
    """errors[r] = relative error of the channel SVD at rank r (r = 0 .. min(T, S*kh*kw))."""
    t = kernel.shape[0]
    return _tail_errors(np.linalg.svd(np.asarray(kernel, np.float64).reshape(t, -1), compute_uv=False))


def spatial_svd_errors(kernel: np.ndarray) -> np.ndarray:
    return _tail_errors(np.linalg.svd(_spatial_matrix(np.asarray(kernel, np.float64)), compute_uv=False))


def reconstruct_channel(factors: list[np.ndarray]) -> np.ndarray:
    u, v = factors
    return np.einsum("tr,rsyx->tsyx", u, v)


def reconstruct_spatial(factors: list[np.ndarray]) -> np.ndarray:
    h, v = factors
    return np.einsum("trx,rsy->tsyx", h, v)


def _spatial_matrix(kernel: np.ndarray) -> np.ndarray:
    t, s, kh, kw = kernel.shape
    return kernel.transpose(1, 2, 0, 3).reshape(s * kh, t * kw)


def _truncated(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    if rank > min(matrix.shape):
        raise UsageError(f"rank {rank} exceeds the matrix's smaller side {min(matrix.shape)}")
    u, sigma, vt = _svd(matrix)
    root = np.sqrt(sigma[:rank])
    error = _tail_errors(sigma)[rank]
    return u[:, :rank] * root, root[:, None] * vt[:rank], float(error)


def _svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The thin SVD of `matrix`, kept for the last matrix seen: a menu solves one layer at many
    ranks in a row, and every rank truncates the same SVD (a CRNN's 8210 x 1024 classifier: about a
    second each)."""
    key = (matrix.shape, hashlib.blake2b(np.ascontiguousarray(matrix).view(np.uint8), digest_size=16).digest())
    if _LAST_SVD.get("key") != key:
        _LAST_SVD.clear()
        _LAST_SVD.update(key=key, svd=np.linalg.svd(matrix, full_matrices=False))
    return _LAST_SVD["svd"]


_LAST_SVD: dict = {}


def _data_error(matrix: np.ndarray, approx: np.ndarray, gram: np.ndarray) -> float:
    """||(M - A) X|| / ||M X|| from G = X X^T."""
    def energy(m: np.ndarray) -> float:  # tr(m G m^T), as one matrix product (a 3-operand einsum
        return float(np.sum((m @ gram) * m))  # loops in C: 8 s for a CRNN's 8210 x 1024 classifier)
    total = energy(matrix)
    return math.sqrt(max(energy(matrix - approx), 0.0) / total) if total > 0 else 0.0


def _gram_root(gram: np.ndarray, size: int) -> np.ndarray:
    """L with G + ridge = L L^T (lower triangular), for a symmetric positive semi-definite G."""
    gram = np.asarray(gram, np.float64)
    if gram.shape != (size, size):
        raise UsageError(f"expected a ({size}, {size}) Gram matrix of the layer's input patches, got {gram.shape}")
    scale = float(np.trace(gram)) / size
    ridge = GRAM_RIDGE * scale if scale > 0 else 1.0
    return np.linalg.cholesky((gram + gram.T) / 2 + ridge * np.eye(size))


def _tail_errors(sigma: np.ndarray) -> np.ndarray:
    energy = sigma.astype(np.float64) ** 2
    total = energy.sum()
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    return np.sqrt(np.maximum(tail, 0.0) / total) if total > 0 else np.zeros_like(tail)


def _check(kernel: np.ndarray, rank: int) -> np.ndarray:
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 4:
        raise UsageError(f"expected a (T, S, kh, kw) kernel, got shape {kernel.shape}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise UsageError(f"a rank must be an integer of at least 1, got {rank!r}")
    return kernel
