"""Ranks without a budget search: explicit ranks, and the error-budget policy.

Explicit ranks are clipped to each layer's FLOP break-even. The error budget picks per layer the
smallest rank on the channel grid whose relative error stays within `max_error`, among ranks that
at least halve the layer's MACs; a layer where no such rank exists is left alone, with the reason.
The error is the kernel's (no data needed) or, given an `ErrorOf` measured on sample inputs, the
layer output's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from onnx_cp.graph import ConvSite, LayerPlan, Plan
from onnx_cp.graph.plan import CP
from onnx_cp.ranks.grid import grid_ranks
from onnx_cp.ranks.policy import ErrorBudget, ExplicitRanks
from onnx_cp.ranks.solve import SolveMany, kernel_error, layer_plan, solve_layers

# The automatic policy only takes ranks that at least halve a layer's MACs: four small convs
# have overheads that FLOPs do not show.
MIN_AUTO_FLOP_GAIN = 2.0
SCREEN_MARGIN = 0.05  # how much better than a quick estimate a full solve may do
# error_of(site, per-group solver results) -> relative error of the layer (kernel or output).
ErrorOf = Callable[[ConvSite, Sequence[object]], float]


@dataclass(frozen=True)
class _Measure:
    error_of: ErrorOf
    what: str  # "kernel error" / "output error", for the report


def plan_ranks(
    sites: Sequence[ConvSite],
    policy: ExplicitRanks | ErrorBudget,
    solve_many: SolveMany,
    error_of: ErrorOf | None = None,
) -> Plan:
    """The plan for the candidate sites (eligible, not filtered out). error_of: what the error budget
    bounds (default: kernel error)."""
    fixed: dict[str, int] = {}
    notes: dict[str, str] = {}
    refusals: dict[str, str] = {}
    automatic: list[ConvSite] = []
    unique = unique_weights(sites)
    for site in unique:
        if site.refusal_for(CP):
            refusals[site.name] = site.refusal_for(CP)
            continue
        wanted = policy.rank_of(site.name) if isinstance(policy, ExplicitRanks) else None
        if wanted is None:
            automatic.append(site)
            continue
        ceiling = site.breakeven_rank()
        if ceiling < 1:
            refusals[site.name] = "no rank saves FLOPs on this layer"
        elif wanted > ceiling:
            fixed[site.name] = ceiling
            notes[site.name] = f"rank {wanted} clipped to {ceiling} (FLOP break-even)"
        else:
            fixed[site.name] = wanted
    by_name = {s.name: s for s in sites}
    solved = solve_layers([(by_name[name], rank) for name, rank in fixed.items()], solve_many)
    layers = {name: layer_plan(rank, solved[(name, rank)], notes.get(name)) for name, rank in fixed.items()}
    measure = _Measure(error_of or kernel_error, "kernel error" if error_of is None else "output error")
    auto_layers, auto_refusals = _search_automatic(automatic, policy.max_error, solve_many, measure)
    layers.update(auto_layers)
    refusals.update(auto_refusals)
    return share_plans(sites, unique, Plan(layers, refusals))


def _search_automatic(sites: Sequence[ConvSite], max_error: float, solve_many: SolveMany,
                      measure: _Measure) -> tuple[dict[str, LayerPlan], dict[str, str]]:
    """Per layer, the smallest candidate rank whose error meets the budget.

    Cheap first: a few ALS sweeps ("quick") at the top candidate screen out layers no rank can
    serve (3x3 kernels usually), a quick bisection finds the rank, and only the chosen rank is
    solved in full (stepping up when the full solve misses the budget). Layers go in lockstep,
    so that every round is one parallel batch."""
    candidates = {s.name: grid_ranks(s, MIN_AUTO_FLOP_GAIN) for s in sites}
    by_name = {s.name: s for s in sites}
    refusals = {name: f"no rank gives at least {MIN_AUTO_FLOP_GAIN:g}x fewer MACs"
                for name, ranks in candidates.items() if not ranks}
    top = {n: len(c) - 1 for n, c in candidates.items() if c}
    screened = _errors(by_name, candidates, top, solve_many, measure, quick=True)
    for name, (error, _) in screened.items():
        if error > max_error + SCREEN_MARGIN:
            refusals[name] = (f"{measure.what} about {error:.2f} at rank {candidates[name][-1]}, the largest "
                              f"rank that halves its MACs, exceeds the budget {max_error:g}")
    chosen = _quick_bisection(by_name, candidates, {n: i for n, i in top.items() if n not in refusals},
                              max_error, solve_many, measure)
    best: dict[str, LayerPlan] = {}
    while chosen:
        full = _errors(by_name, candidates, chosen, solve_many, measure, quick=False)
        retry = {}
        for name, (error, results) in full.items():
            if error <= max_error:
                best[name] = layer_plan(candidates[name][chosen[name]], results,
                                        f"smallest grid rank with {measure.what} {error:.3f} <= {max_error:g}")
            elif chosen[name] + 1 < len(candidates[name]):
                retry[name] = chosen[name] + 1
            else:
                refusals[name] = (f"{measure.what} {error:.3f} at rank {candidates[name][-1]}, the largest "
                                  f"rank that halves its MACs, exceeds the budget {max_error:g}")
        chosen = retry
    return best, refusals


def _quick_bisection(by_name, candidates, tops: dict[str, int], max_error: float, solve_many,
                     measure: _Measure) -> dict[str, int]:
    """Smallest candidate index whose quick error meets the budget (the top when none does)."""
    chosen = dict(tops)
    bounds = {name: [0, top - 1] for name, top in tops.items() if top > 0}
    while bounds:
        probes = {name: (lo + hi) // 2 for name, (lo, hi) in bounds.items()}
        for name, (error, _) in _errors(by_name, candidates, probes, solve_many, measure, quick=True).items():
            lo, hi = bounds[name]
            if error <= max_error:
                chosen[name], hi = probes[name], probes[name] - 1
            else:
                lo = probes[name] + 1
            if lo > hi:
                del bounds[name]
            else:
                bounds[name] = [lo, hi]
    return chosen


def _errors(by_name, candidates, index: dict[str, int], solve_many, measure: _Measure,
            quick: bool) -> dict[str, tuple[float, list]]:
    """Error and per-group results of each named layer at its candidate rank `index`."""
    ranks = {name: candidates[name][i] for name, i in index.items()}
    solved = solve_layers([(by_name[name], rank) for name, rank in ranks.items()], solve_many, quick)
    return {name: (measure.error_of(by_name[name], solved[(name, rank)]), solved[(name, rank)])
            for name, rank in ranks.items()}


def unique_weights(sites: Sequence[ConvSite]) -> list[ConvSite]:
    """Sites, one per shared weight (the first Conv that uses it)."""
    seen, unique = set(), []
    for site in sites:
        if id(site.weight) not in seen:
            seen.add(id(site.weight))
            unique.append(site)
    return unique


def share_plans(sites: Sequence[ConvSite], unique: Sequence[ConvSite], plan: Plan) -> Plan:
    """Convs that share a weight share its plan (and its fate)."""
    first_by_weight = {id(s.weight): s.name for s in unique}
    layers, refusals = dict(plan.layers), dict(plan.refusals)
    for site in sites:
        first = first_by_weight.get(id(site.weight))
        if first is None or first == site.name:
            continue
        if first in layers:
            layers[site.name] = layers[first]
        elif first in refusals:
            refusals[site.name] = refusals[first]
    return Plan(layers, refusals)
