"""What the graph pass is told to do: a plan maps layer names to the form, rank and factors of their
replacement, and says why every other eligible layer is left alone. Plans are values: rank
policies build them, the pass reads them, nothing writes onto shared objects."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnx_cp.errors import UsageError
from onnx_cp.graph.sites import ConvSite

CP = "cp"


@dataclass(frozen=True)
class LayerPlan:
    """Replace one Conv by its chain of `form` at `rank`; `factors` holds one list per group, as the
    form's module in onnx_cp/graph says: CP [(T/G,R), (S/G,R), (kh,R), (kw,R)] (any scaling: the
    pass balances them); Tucker-2 (rank (R_in, R_out)) [(T/G,R_out), (R_out,R_in,kh,kw), (S/G,R_in)];
    SVD [(T/G,R), (R,S/G,kh,kw)]; spatial SVD [(T/G,R,kw), (R,S/G,kh)]. float64."""

    rank: int | tuple[int, int]
    factors: Sequence[Sequence[np.ndarray]]
    form: str = CP
    note: str | None = None


@dataclass(frozen=True)
class Plan:
    layers: Mapping[str, LayerPlan] = field(default_factory=dict)
    refusals: Mapping[str, str] = field(default_factory=dict)  # eligible layers left alone, and why

    def refusal(self, site: ConvSite) -> str:
        """Why the site is left alone: its own reason, the policy's, else CP's (the default form)."""
        return site.refusal or self.refusals.get(site.name) or site.refusal_for(CP) or "no rank chosen"


def as_factors(result: object) -> list[np.ndarray]:
    """Four float64 factors from a decomposer's return value (the factors, or an object with .factors)."""
    factors = [np.asarray(f, dtype=np.float64) for f in getattr(result, "factors", result)]
    if len(factors) != 4:
        raise UsageError(f"decomposer returned {len(factors)} factors, expected 4")
    return factors


def plan_with(
    sites: Sequence[ConvSite],
    rank_for: Callable[[ConvSite], int | None],
    decomposer: Callable[[np.ndarray, int], object],
    form: str = CP,
) -> Plan:
    """A plan from a rank rule and any decomposer(kernel (T,S,kh,kw) float64, rank) -> factors: the
    graph pass on its own, without onnx-cp's rank policies and solver. `form`: the chain the
    decomposer's factors are for (as LayerPlan describes them)."""
    layers: dict[str, LayerPlan] = {}
    refusals: dict[str, str] = {}
    by_weight: dict[tuple, LayerPlan] = {}  # a weight shared by several Convs is decomposed once
    for site in sites:
        if not site.eligible:
            continue
        if site.refusal_for(form):
            refusals[site.name] = site.refusal_for(form)
            continue
        rank = rank_for(site)
        if rank is None:
            continue
        key = (id(site.weight), tuple(rank) if isinstance(rank, (list, tuple)) else rank)
        if key not in by_weight:
            factors = [_factors(decomposer(k, rank), form) for k in site.group_kernels()]
            by_weight[key] = LayerPlan(rank, factors, form=form)
        layers[site.name] = by_weight[key]
    return Plan(layers, refusals)


def _factors(result: object, form: str) -> list[np.ndarray]:
    if form == CP:
        return as_factors(result)
    return [np.asarray(f, dtype=np.float64) for f in getattr(result, "factors", result)]
