"""The chain forms the graph pass can splice, by name: each one's stage layout at a rank and its
stage weights from per-group factors, and what a chain costs (MACs, parameters)."""

from __future__ import annotations

from types import ModuleType

from onnx_cp.graph import cp_chain, spatial_svd_chain, svd_chain, tucker2_chain
from onnx_cp.graph.sites import ConvSite
from onnx_cp.graph.stages import chain_macs, chain_params

SPLICES: dict[str, ModuleType] = {m.FORM: m for m in (cp_chain, tucker2_chain, svd_chain, spatial_svd_chain)}
Rank = int | tuple[int, int]


def macs_after(site: ConvSite, form: str, rank: Rank) -> int:
    return chain_macs(site, SPLICES[form].layout(site, rank))


def params_after(site: ConvSite, form: str, rank: Rank) -> int:
    return chain_params(SPLICES[form].layout(site, rank))
