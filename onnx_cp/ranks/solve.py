"""Decomposing layers in batches: the solver the rank policies call, and the error of a layer from its
groups' results. `solve_many([(kernel, rank), ...], quick=False)` returns results with `.factors` and
`.rel_error`; quick asks for a cheap estimate (a few ALS sweeps) to screen and search ranks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from onnx_cp import cp
from onnx_cp.errors import UsageError
from onnx_cp.graph import ConvSite, LayerPlan, Plan
from onnx_cp.graph.plan import CP, as_factors
from onnx_cp.lowrank import FORM_NAMES

SolveMany = Callable[..., Sequence[object]]
QUICK_ALS_SWEEPS = 20  # ~0.02-0.04 above the converged error: enough to screen and search ranks


AUTO = "auto"
DECOMPOSITIONS = (AUTO, *FORM_NAMES)


@dataclass(frozen=True)
class SolverSettings:
    """method: "nls" (Gauss-Newton, the paper's) or "als"; workers: solver processes (None: one per
    core); decomposer(kernel (T,S,kh,kw) float64, rank) -> CP factors (or a result with .factors)
    replaces onnx-cp's CP solver (and restricts the choice to CP); decomposition: the low-rank forms
    the rank policies choose from: "auto" (CP, Tucker-2, channel SVD, spatial SVD) or one of them."""

    method: str = "nls"
    workers: int | None = None
    decomposer: Callable[[np.ndarray, int], object] | None = None
    decomposition: str = AUTO

    @property
    def forms(self) -> tuple[str, ...]:
        if self.decomposer is not None:
            return (CP,)
        return FORM_NAMES if self.decomposition == AUTO else (self.decomposition,)

    def __post_init__(self) -> None:
        if self.decomposition not in DECOMPOSITIONS:
            raise UsageError(f"expected one of {', '.join(DECOMPOSITIONS)}, got {self.decomposition!r}",
                             option="decomposition")
        if self.decomposer is not None and self.decomposition not in (AUTO, CP):
            raise UsageError("a custom decomposer gives CP factors: it cannot be combined with "
                             f"decomposition={self.decomposition!r}", option="decomposition")
        if self.method not in cp.METHODS:
            raise UsageError(f"expected one of {', '.join(cp.METHODS)}, got {self.method!r}", option="method")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise UsageError(f"expected an integer of at least 1, got {self.workers!r}", option="workers")


@dataclass(frozen=True)
class Solved:
    factors: list[np.ndarray]
    rel_error: float


def make_solver(settings: SolverSettings, seed: int) -> SolveMany:
    """A batched CP solver: the user's decomposer in a loop, or onnx_cp.cp in worker processes. It
    carries the forms the policies may choose from as `.forms` (see solver_forms)."""
    solver = _cp_solver(settings, seed)
    solver.forms = settings.forms
    return solver


def solver_forms(solve_many: SolveMany) -> tuple[str, ...]:
    """The forms a solver serves: CP only for a plain callable (one given in place of make_solver's)."""
    return tuple(getattr(solve_many, "forms", (CP,)))


def _cp_solver(settings: SolverSettings, seed: int) -> SolveMany:
    if settings.decomposer is not None:
        def solve_with_decomposer(jobs, quick: bool = False) -> list[Solved]:
            solved = []
            for kernel, rank in jobs:
                factors = as_factors(settings.decomposer(kernel, rank))
                solved.append(Solved(factors, cp.relative_error(kernel, cp.reconstruct(factors))))
            return solved
        return solve_with_decomposer

    def solve_many(jobs: Sequence[tuple[np.ndarray, int]], quick: bool = False) -> list:
        if not jobs:
            return []
        if quick:
            return cp.decompose_many(list(jobs), workers=settings.workers, method="als",
                                     max_iter=QUICK_ALS_SWEEPS, seed=seed, desc="estimating")
        return cp.decompose_many(list(jobs), workers=settings.workers, method=settings.method, seed=seed)

    return solve_many


def solve_layers(layers: Sequence[tuple[ConvSite, int]], solve_many: SolveMany,
                 quick: bool = False) -> dict[tuple[str, int], list]:
    """Decompose each (site, rank), every group of each site, in one solver batch; the
    per-group results come back keyed by (layer name, rank)."""
    jobs = [(site.name, rank, kernel) for site, rank in layers for kernel in site.group_kernels()]
    pairs = [(kernel, rank) for _, rank, kernel in jobs]
    results = solve_many(pairs, quick=True) if quick else solve_many(pairs)
    grouped: dict[tuple[str, int], list] = {}
    for (name, rank, _), result in zip(jobs, results):
        grouped.setdefault((name, rank), []).append(result)
    return grouped


def kernel_error(site: ConvSite, group_results: Sequence[object]) -> float:
    """Relative error over the whole kernel from the per-group results."""
    return cp.pooled_relative_error(site.group_kernels(), [r.rel_error for r in group_results])


def layer_plan(rank, group_results: Sequence[object], note: str | None = None, form: str = CP) -> LayerPlan:
    return LayerPlan(rank, [list(r.factors) for r in group_results], form=form, note=note)


class Refiner:
    """Full solves in place of quick estimates, for the layers of a plan: a search plans on quick
    estimates and refines only the plans it builds for good. Each (layer, form, rank) is solved once;
    CP in one solver batch, the other forms here (their solvers are cheap). The closed-form solves
    (SVD forms) are final already and kept: with data they are the data-aware ones."""

    def __init__(self, sites: Sequence[ConvSite], solve_many: SolveMany) -> None:
        self.sites = {s.name: s for s in sites}
        self.solve_many = solve_many
        self.solved: dict[tuple, list] = {}

    def __call__(self, plan: Plan) -> Plan:
        from onnx_cp.ranks.forms import EXACT_FORMS, solve_form  # forms builds on this module

        wanted = {(name, layer.form, layer.rank) for name, layer in plan.layers.items()
                  if not (layer.form in EXACT_FORMS and layer.factors)}
        missing = sorted(wanted - set(self.solved), key=repr)
        cp_solved = solve_layers([(self.sites[n], r) for n, f, r in missing if f == CP], self.solve_many)
        self.solved.update({(n, CP, r): results for (n, r), results in cp_solved.items()})
        self.solved.update({(n, f, r): solve_form(self.sites[n], f, r) for n, f, r in missing if f != CP})
        layers = {name: dataclasses.replace(layer, factors=[list(r.factors) for r in self.solved[key]])
                  if (key := (name, layer.form, layer.rank)) in wanted else layer
                  for name, layer in plan.layers.items()}
        return Plan(layers, plan.refusals)
