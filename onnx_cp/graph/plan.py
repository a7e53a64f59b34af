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
    """Replace one Conv by its CP chain at `rank`; `factors` holds one [(T/G,R), (S/G,R), (kh,R), (kw,R)]
    list per group (float64, any scaling: the pass balances them)."""

    rank: int
    factors: Sequence[Sequence[np.ndarray]]
    form: str = CP
    note: str | None = None


@dataclass(frozen=True)
class Plan:
    layers: Mapping[str, LayerPlan] = field(default_factory=dict)
    refusals: Mapping[str, str] = field(default_factory=dict)  # eligible layers left alone, and why

    def refusal(self, site: ConvSite) -> str:
        return site.refusal or self.refusals.get(site.name) or "no rank chosen"


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
) -> Plan:
    """A plan from a rank rule and any decomposer(kernel (T,S,kh,kw) float64, rank) -> factors: the
    graph pass on its own, without onnx-cp's rank policies and solver."""
    layers: dict[str, LayerPlan] = {}
    by_weight: dict[tuple[int, int], LayerPlan] = {}  # a weight shared by several Convs is decomposed once
    for site in sites:
        rank = rank_for(site) if site.eligible else None
        if rank is None:
            continue
        key = (id(site.weight), rank)
        if key not in by_weight:
            by_weight[key] = LayerPlan(rank, [as_factors(decomposer(k, rank)) for k in site.group_kernels()])
        layers[site.name] = by_weight[key]
    return Plan(layers)
