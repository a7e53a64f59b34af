"""The low-rank forms as the rank policies see them: the ranks each form is offered at on a layer
(all on onnxruntime's channel grid), its solutions there, and the smallest rank of a form that
meets an error budget. CP keeps its own batched solver (ranks/solve.py); the other forms' solvers
(SVD, Tucker-2 HOOI) are cheap and run here, in process."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from onnx_cp.graph import ConvSite
from onnx_cp.graph.forms import macs_after
from onnx_cp.graph.plan import CP
from onnx_cp.lowrank import FORMS, SPATIAL_SVD, SVD, TUCKER2, Solution, channel_svd, tucker2
from onnx_cp.ranks.grid import MENU_MULTIPLES, grid_ranks, menu_ranks
from onnx_cp.runtime.cpu import channel_block

# Forms whose solver is closed-form: a menu's solution is already the final one (and with data, the
# data-aware one), so refinement keeps it.
EXACT_FORMS = (SVD, SPATIAL_SVD)
FINE_MULTIPLES = 32  # a matrix's menu holds every multiple of the channel block up to this many
QUICK_HOOI_SWEEPS = 10  # from the HOSVD start, trained kernels are within ~1e-3 of converged by then
Rank = int | tuple[int, int]
ErrorOf = Callable[[ConvSite, Sequence[object]], float]


def form_ranks(site: ConvSite, form: str, min_gain: float, *, menu: bool = True) -> list[Rank]:
    """The ranks of `form` on the channel grid whose chain has at least `min_gain` times fewer MACs
    than the Conv, in increasing cost; `menu`: only the roughly geometric multiples (each menu option
    costs a latency measurement)."""
    if site.refusal_for(form):
        return []
    if form == CP:
        return menu_ranks(site, min_gain) if menu else grid_ranks(site, min_gain)
    t, s, kh, kw = site.kernel.shape
    t //= site.group
    if form == TUCKER2:
        ranks = [(a, _nearest(_grid(t, menu), a * t / s)) for a in _grid(s, menu)]
    elif form == SVD:
        ranks = _grid(min(t, s * kh * kw), menu, fine=site.is_matrix)
    elif form == SPATIAL_SVD:
        ranks = _grid(min(s * kh, t * kw), menu)
    else:
        return []
    before = site.macs_before()
    fitting = [r for r in dict.fromkeys(ranks) if before >= min_gain * macs_after(site, form, r)]
    return sorted(fitting, key=lambda r: macs_after(site, form, r))


def solve_form(site: ConvSite, form: str, rank: Rank, quick: bool = False,
               grams: Sequence[np.ndarray] | None = None) -> list[Solution]:
    """Each group's solution of `form` at `rank` (not CP: see ranks/solve.py); with `grams` (each
    group's input Gram matrix, from sample data) channel SVD is the one optimal on that data."""
    if form == SVD and grams is not None:
        return [Solution(r.factors, r.rel_error, SVD) for r in
                (channel_svd(k, rank, gram=g) for k, g in zip(site.group_kernels(), grams))]
    if form == TUCKER2 and quick:
        results = [tucker2(k, rank, max_iter=QUICK_HOOI_SWEEPS) for k in site.group_kernels()]
        return [Solution(r.factors, r.rel_error, TUCKER2) for r in results]
    return [FORMS[form].solve(k, rank) for k in site.group_kernels()]


def smallest_rank(site: ConvSite, form: str, ranks: Sequence[Rank], max_error: float,
                  error_of: ErrorOf, quick: bool = False, grams: Sequence[np.ndarray] | None = None
                  ) -> tuple[Rank, list[Solution], float] | None:
    """The cheapest of `ranks` (in increasing cost, errors falling with it) whose error meets
    `max_error`, by bisection: (rank, per-group solutions, error), or None if even the last does not."""
    cache: dict[int, tuple[list[Solution], float]] = {}

    def at(index: int) -> tuple[list[Solution], float]:
        if index not in cache:
            solutions = solve_form(site, form, ranks[index], quick, grams)
            cache[index] = (solutions, error_of(site, solutions))
        return cache[index]

    if not ranks or at(len(ranks) - 1)[1] > max_error:
        return None
    lo, hi = 0, len(ranks) - 1  # ranks[hi] meets the budget
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid)[1] <= max_error:
            hi = mid
        else:
            lo = mid + 1
    solutions, error = at(hi)
    return ranks[hi], solutions, error


def rank_label(form: str, rank: Rank | None) -> int | str | None:
    """How a rank is shown in reports and search traces: CP's as the plain number (as always),
    others with their form ("svd 16", "tucker2 16x32")."""
    if rank is None or form == CP:
        return rank
    return f"{form} {'x'.join(map(str, rank)) if isinstance(rank, tuple) else rank}"


def _grid(limit: int, menu: bool, fine: bool = False) -> list[int]:
    """Ranks up to `limit` on the channel grid (every rank below one block; a menu takes the
    geometric multiples, or the largest power of two below one block; `fine`: every multiple up to
    FINE_MULTIPLES too, for a matrix, whose time follows its rank closely and whose solves are cheap:
    a CRNN's LSTM measured 1.60x at rank 128 and 1.32x at 192, and a 1.3x target had nothing between;
    with per-direction products, rank 256 measured 1.50x and the next option was 384)."""
    if limit < 1:
        return []
    block = channel_block()
    if limit < block:
        return [1 << (limit.bit_length() - 1)] if menu else list(range(1, limit + 1))
    multiples = range(1, limit // block + 1)
    return [block * m for m in multiples if not menu or m in MENU_MULTIPLES or fine and m <= FINE_MULTIPLES]


def _nearest(grid: Sequence[int], value: float) -> int:
    return min(grid, key=lambda g: (abs(np.log(g / max(value, 1e-9))), g))
