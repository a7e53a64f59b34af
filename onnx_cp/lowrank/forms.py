"""The low-rank forms by name: how each is solved at a rank and how its factors rebuild the kernel,
so that callers (rank policies, the graph pass, tests) treat every form alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnx_cp import cp
from onnx_cp.lowrank import svd, tucker2

CP = "cp"
TUCKER2 = "tucker2"
SVD = "svd"
SPATIAL_SVD = "spatial_svd"
FORM_NAMES = (CP, TUCKER2, SVD, SPATIAL_SVD)

Rank = int | tuple[int, int]  # Tucker-2: (R_in, R_out); every other form: one rank


@dataclass(frozen=True)
class Solution:
    """What the rank policies and the graph pass need of any form's result."""

    factors: list[np.ndarray]
    rel_error: float
    form: str = CP


@dataclass(frozen=True)
class Form:
    name: str
    solve: Callable[[np.ndarray, Rank], Solution]
    reconstruct: Callable[[list[np.ndarray]], np.ndarray]


def _solve_tucker2(kernel: np.ndarray, rank: Rank) -> Solution:
    result = tucker2.tucker2(kernel, rank)
    return Solution(result.factors, result.rel_error, TUCKER2)


def _solve_cp(kernel: np.ndarray, rank: Rank) -> Solution:
    result = cp.decompose(kernel, rank, seed=0)
    return Solution(result.factors, result.rel_error)


def _svd_solver(fn: Callable[[np.ndarray, int], svd.SVDResult], form: str) -> Callable[[np.ndarray, Rank], Solution]:
    def solve(kernel: np.ndarray, rank: Rank) -> Solution:
        result = fn(kernel, rank)
        return Solution(result.factors, result.rel_error, form)
    return solve


FORMS: dict[str, Form] = {
    CP: Form(CP, _solve_cp, cp.reconstruct),
    TUCKER2: Form(TUCKER2, _solve_tucker2, tucker2.reconstruct),
    SVD: Form(SVD, _svd_solver(svd.channel_svd, SVD), svd.reconstruct_channel),
    SPATIAL_SVD: Form(SPATIAL_SVD, _svd_solver(svd.spatial_svd, SPATIAL_SVD), svd.reconstruct_spatial),
}


def reconstruct(result: object) -> np.ndarray:
    """The kernel a result's factors rebuild, whatever its form (CP results carry no form)."""
    return FORMS[getattr(result, "form", CP)].reconstruct(list(result.factors))
