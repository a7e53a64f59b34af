"""The chain forms the graph pass can splice, by name: each one's stage layout at a rank and its
stage weights from per-group factors, and what a chain costs (MACs, parameters)."""

from __future__ import annotations

import dataclasses
from types import ModuleType

from onnx_cp.graph import cp_chain, spatial_svd_chain, svd_chain, tucker2_chain
from onnx_cp.graph.sites import ConvSite
from onnx_cp.graph.stages import chain_macs, chain_params

SPLICES: dict[str, ModuleType] = {m.FORM: m for m in (cp_chain, tucker2_chain, svd_chain, spatial_svd_chain)}
Rank = int | tuple[int, int]


def macs_after(site: ConvSite, form: str, rank: Rank) -> int:
    return chain_macs(site, _layout(site, form, rank))


def params_after(site: ConvSite, form: str, rank: Rank) -> int:
    return chain_params(_layout(site, form, rank))


def _layout(site: ConvSite, form: str, rank: Rank):
    """The form's stages; an LSTM's as its splice runs them, each rank component reading only its own
    direction's states and feeding only its own direction's gates (graph/lstm.direction_factors)."""
    shapes = SPLICES[form].layout(site, rank)
    if site.is_lstm:
        first, *middle, last = shapes
        shapes = [dataclasses.replace(first, in_per_group=first.in_per_group // site.blocks), *middle,
                  dataclasses.replace(last, out_channels=last.out_channels // site.blocks)]
    return shapes
