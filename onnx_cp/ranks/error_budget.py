"""Ranks without a budget search: explicit ranks, and the error-budget policy.

Explicit ranks are clipped to each layer's FLOP break-even; they are CP ranks unless the solver
serves one other form only (`decomposition`). The error budget picks per layer and form the
smallest rank on the channel grid whose relative error stays within `max_error`, among ranks that
at least halve the layer's MACs, and across forms the one with the fewest MACs (this policy measures
no latency: the searches do); a layer where no form meets it is left alone, with the reason.
The error is the kernel's (no data needed) or, given an `ErrorOf` measured on sample inputs, the
layer output's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from onnx_cp.graph import ConvSite, LayerPlan, Plan
from onnx_cp.graph.forms import macs_after
from onnx_cp.graph.plan import CP
from onnx_cp.lowrank import TUCKER2
from onnx_cp.ranks.forms import form_ranks, rank_label, smallest_rank, solve_form
from onnx_cp.ranks.grid import grid_ranks
from onnx_cp.ranks.output_error import OutputError
from onnx_cp.ranks.policy import ErrorBudget, ExplicitRanks
from onnx_cp.ranks.solve import SolveMany, kernel_error, layer_plan, solve_layers, solver_forms

# The automatic policy only takes ranks that at least halve a layer's MACs: four small convs
# have overheads that FLOPs do not show.
MIN_AUTO_FLOP_GAIN = 2.0
SCREEN_MARGIN = 0.05  # how much better than a quick estimate a full solve may do
# error_of(site, per-group solver results) -> relative error of the layer (kernel or output).
ErrorOf = Callable[[ConvSite, Sequence[object]], float]
TimeRatio = Callable[[ConvSite, str, object], float]  # (site, form, rank) -> chain time / layer time


@dataclass(frozen=True)
class _Measure:
    error_of: ErrorOf
    what: str  # "kernel error" / "output error", for the report
    grams: Callable[[ConvSite], list | None] = lambda site: None  # for data-aware channel SVD


def plan_ranks(
    sites: Sequence[ConvSite],
    policy: ExplicitRanks | ErrorBudget,
    solve_many: SolveMany,
    error_of: ErrorOf | None = None,
    time_ratio: TimeRatio | None = None,
) -> Plan:
    """The plan for the candidate sites (eligible, not filtered out). error_of: what the error budget
    bounds (default: kernel error); time_ratio(site, form, rank): the chain's measured time over
    its layer's, which leaves a layer the budget chose whose chain is slower (ranks given by the
    user are kept as given)."""
    forms = solver_forms(solve_many)
    measure = _Measure(error_of or kernel_error, "kernel error" if error_of is None else "output error")
    if isinstance(error_of, OutputError):  # layer outputs on sample data: channel SVD solved on it too
        measure = dataclasses.replace(measure, grams=error_of.grams)
    unique = unique_weights(sites)
    if CP not in forms:  # one other form, named by the user
        return share_plans(sites, unique, _plan_form(unique, forms[0], policy, measure))
    fixed: dict[str, int] = {}
    notes: dict[str, str] = {}
    refusals: dict[str, str] = {}
    automatic: list[ConvSite] = []
    for site in unique:
        wanted = policy.rank_of(site.name) if isinstance(policy, ExplicitRanks) else None
        if site.refusal_for(CP) and (wanted is not None or forms == (CP,)):
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
    cp_sites = [s for s in automatic if not s.refusal_for(CP)]
    auto_layers, auto_refusals = _search_automatic(cp_sites, policy.max_error, solve_many, measure)
    others = [f for f in forms if f != CP]
    if others:
        auto_layers, auto_refusals = _across_forms(automatic, others, policy.max_error, measure,
                                                   auto_layers, auto_refusals)
    if time_ratio is not None:
        auto_layers, slower = _faster_only(by_name, auto_layers, time_ratio)
        auto_refusals.update(slower)
    layers.update(auto_layers)
    refusals.update(auto_refusals)
    return share_plans(sites, unique, Plan(layers, refusals))


def _faster_only(by_name: dict[str, ConvSite], layers: dict[str, LayerPlan], time_ratio: TimeRatio
                 ) -> tuple[dict[str, LayerPlan], dict[str, str]]:
    """The layers whose chain measured faster than the layer, and why the others are left: fewer
    MACs is not less time where a chain widens a thin input at full resolution (OriNet's 3-channel
    stem at CP rank 8: half the MACs, 2.9x the time, and the whole model 0.93x)."""
    kept, slower = {}, {}
    for name, layer in layers.items():
        ratio = time_ratio(by_name[name], layer.form, layer.rank)
        if ratio < 1:
            kept[name] = layer
        else:
            rank = "x".join(map(str, layer.rank)) if isinstance(layer.rank, (list, tuple)) else layer.rank
            slower[name] = (f"its {layer.form} chain at rank {rank}, within the budget, measured {ratio:.2f}x "
                            f"the layer's time on this CPU")
    return kept, slower


def _across_forms(sites: Sequence[ConvSite], forms: Sequence[str], max_error: float, measure: _Measure,
                  cp_layers: dict[str, LayerPlan], cp_refusals: dict[str, str]
                  ) -> tuple[dict[str, LayerPlan], dict[str, str]]:
    """Per layer, the form whose smallest rank within the budget costs the fewest MACs (CP's choice
    from the CP search); the note says which forms met the budget at what cost."""
    layers, refusals = {}, {}
    for site in sites:
        found = {}  # form -> (rank, results, error)
        if site.name in cp_layers:
            found[CP] = (cp_layers[site.name].rank, None, None)
        grams = measure.grams(site)
        for form in forms:
            ranks = form_ranks(site, form, MIN_AUTO_FLOP_GAIN, menu=False)
            hit = smallest_rank(site, form, ranks, max_error, measure.error_of, grams=grams)
            if hit is not None:
                found[form] = hit
        if not found:
            tried = "/".join(f for f in forms if not site.refusal_for(f))
            others = (f"no {tried} grid rank with at least {MIN_AUTO_FLOP_GAIN:g}x fewer MACs meets the "
                      f"{measure.what} budget {max_error:g}" if tried else "")
            refusals[site.name] = "; ".join(r for r in (cp_refusals.get(site.name) or site.refusal_for(CP), others)
                                            if r)
            continue
        cost = {form: macs_after(site, form, hit[0]) for form, hit in found.items()}
        best = min(found, key=lambda form: cost[form])
        others = ", ".join(f"{rank_label(f, found[f][0]) if f != CP else f'cp {found[f][0]}'} {cost[f]:,} MACs"
                           for f in found if f != best)
        if best == CP:
            layer = cp_layers[site.name]
            note = (layer.note or "") + (f"; fewest MACs of the forms within budget (also: {others})" if others else "")
            layers[site.name] = LayerPlan(layer.rank, layer.factors, layer.form, note)
            continue
        rank, results, error = found[best]
        note = (f"{best}: smallest grid rank with {measure.what} {error:.3f} <= {max_error:g}, the fewest MACs "
                f"({cost[best]:,}) of the forms within budget" + (f" (also: {others})" if others else ""))
        layers[site.name] = layer_plan(rank, results, note, best)
    return layers, refusals


def _plan_form(sites: Sequence[ConvSite], form: str, policy: ExplicitRanks | ErrorBudget,
               measure: _Measure) -> Plan:
    """The plan when the user named one form other than CP: explicit ranks of that form (Tucker-2:
    R for both channel modes, each clipped to its channels), the error budget on its grid."""
    layers, refusals = {}, {}
    for site in sites:
        if site.refusal_for(form):
            refusals[site.name] = site.refusal_for(form)
            continue
        wanted = policy.rank_of(site.name) if isinstance(policy, ExplicitRanks) else None
        if wanted is not None:
            rank = _clipped(site, form, wanted)
            if rank is None:
                refusals[site.name] = f"no {form} rank saves FLOPs on this layer"
            else:
                results = solve_form(site, form, rank)
                note = None if rank == (wanted if form != TUCKER2 else (wanted, wanted)) else (
                    f"rank {wanted} clipped to {rank_label(form, rank)} (channels / FLOP break-even)")
                layers[site.name] = layer_plan(rank, results, note, form)
            continue
        max_error = policy.max_error
        hit = smallest_rank(site, form, form_ranks(site, form, MIN_AUTO_FLOP_GAIN, menu=False), max_error,
                            measure.error_of, grams=measure.grams(site))
        if hit is None:
            refusals[site.name] = (f"no {form} grid rank with at least {MIN_AUTO_FLOP_GAIN:g}x fewer MACs "
                                   f"meets the {measure.what} budget {max_error:g}")
        else:
            rank, results, error = hit
            layers[site.name] = layer_plan(rank, results, f"smallest {form} grid rank with {measure.what} "
                                                          f"{error:.3f} <= {max_error:g}", form)
    return Plan(layers, refusals)


def _clipped(site: ConvSite, form: str, wanted: int):
    """`wanted` as a rank of `form`, clipped to the layer's channels and FLOP break-even (None: none saves)."""
    t, s, kh, kw = site.kernel.shape
    t //= site.group
    if form == TUCKER2:
        rank = (min(wanted, s), min(wanted, t))
        while rank[0] > 1 and macs_after(site, form, rank) >= site.macs_before():
            rank = (max(1, rank[0] - 1), max(1, rank[1] - 1))
    else:
        rank = min(wanted, min(t, s * kh * kw) if form == "svd" else min(s * kh, t * kw))
        while rank > 1 and macs_after(site, form, rank) >= site.macs_before():
            rank -= 1
    return rank if macs_after(site, form, rank) < site.macs_before() else None


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
