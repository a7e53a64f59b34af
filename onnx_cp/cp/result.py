"""The result of a decomposition, and the scaling conventions of its factors."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class CPResult:
    """A rank-R CP decomposition of a (T, S, kh, kw) kernel.

    factors: [(T,R), (S,R), (kh,R), (kw,R)] float64; the weights are folded in and every rank-one
        term has equal column norms in all four factors (norm balancing), sorted by term norm.
    rel_error: ||K - K_hat||_F / ||K||_F, computed from the reconstruction (0.0 for a zero kernel).
    max_component_norm: largest rank-one term norm / ||K||_F. Values far above 1 mean cancelling
        terms (a degenerate decomposition) whose float32 weights lose accuracy.
    history: objective per iteration, 0.5 ||K - K_hat||^2 / ||K||^2 plus the ridge penalty, for
        ALS sweeps and accepted NLS steps; it never increases.
    """

    factors: list[np.ndarray]
    rel_error: float
    iterations: int
    converged: bool
    seconds: float
    max_component_norm: float
    method: str
    history: list[float] = field(default_factory=list, repr=False)
    ridge: float = 0.0
    stop_reason: str = ""

    @property
    def rank(self) -> int:
        return int(self.factors[0].shape[1])


def column_norms(factors: list[np.ndarray]) -> np.ndarray:
    """(4, R) array of the column norms of each factor."""
    return np.stack([np.linalg.norm(a, axis=0) for a in factors])


def component_norms(factors: list[np.ndarray]) -> np.ndarray:
    """Frobenius norm of each rank-one term: the product of its four column norms."""
    return np.prod(column_norms(factors), axis=0)


def balance(factors: list[np.ndarray]) -> list[np.ndarray]:
    """Rescale each term so its four columns have the same norm (the term is unchanged).

    Balanced factors have the smallest possible sum of squared norms for the same tensor, which
    keeps float32 weights well scaled and never increases the ridge penalty.
    """
    norms = column_norms(factors)
    comp = np.prod(norms, axis=0)
    target = comp ** (1.0 / len(factors))
    out = []
    for a, n in zip(factors, norms):
        scale = np.divide(target, n, out=np.zeros_like(n), where=n > 0)
        out.append(a * scale)
    return out


def sort_components(factors: list[np.ndarray]) -> list[np.ndarray]:
    """Order the terms by decreasing norm (stable, so ties keep their order)."""
    order = np.argsort(-component_norms(factors), kind="stable")
    return [np.ascontiguousarray(a[:, order]) for a in factors]
