"""The one rank grid: ranks on onnxruntime's preferred channel grid (multiples of its NCHWc block:
depthwise stages are ~3x faster there) whose chain cuts a layer's MACs by a required factor."""

from __future__ import annotations

from onnx_cp.graph import ConvSite
from onnx_cp.runtime.cpu import channel_block

# Multiples of the block offered as menu options: roughly geometric, since each option costs a solve
# and a latency measurement.
MENU_MULTIPLES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)


def rank_ceiling(site: ConvSite, min_gain: float) -> int:
    """The largest rank whose CP chain has at least `min_gain` times fewer MACs than the Conv (0 for
    Convs CP cannot serve, such as 1x1 convs)."""
    if site.refusal_for("cp"):
        return 0
    return int(site.macs_before() / min_gain) // max(site.macs_after(1), 1)


def grid_ranks(site: ConvSite, min_gain: float) -> list[int]:
    """Every multiple of the channel block up to the ceiling (every rank, for layers too small for
    one block)."""
    ceiling = rank_ceiling(site, min_gain)
    if ceiling < 1:
        return []
    block = channel_block()
    step = block if ceiling >= block else 1
    return list(range(step, ceiling + 1, step))


def menu_ranks(site: ConvSite, min_gain: float) -> list[int]:
    """The roughly geometric part of the grid (block x MENU_MULTIPLES); the largest power of two
    for layers too small for one block."""
    ranks = grid_ranks(site, min_gain)
    block = channel_block()
    menu = [r for r in ranks if r % block == 0 and r // block in MENU_MULTIPLES]
    if not menu and ranks:
        menu = [1 << (max(ranks).bit_length() - 1)]
    return menu
