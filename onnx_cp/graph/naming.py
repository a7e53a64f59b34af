"""How the nodes and weights of a CP chain are named, so that every tool maps them back to the
layer they replaced (profiles, reports, fine-tuning)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

N = TypeVar("N")

STAGES = ("in", "vertical", "horizontal", "out")
SEPARATOR = "/cp/"
LAYER_METADATA_KEY = "onnx_cp.layer"


def node_name(layer: str, stage: str) -> str:
    return f"{layer}{SEPARATOR}{stage}"


def weight_name(layer: str, stage: str) -> str:
    return f"{node_name(layer, stage)}.weight"


def layer_of(name: str) -> str:
    """The original layer a chain node (or weight) came from; other names map to themselves."""
    head, sep, tail = name.rpartition(SEPARATOR)
    if sep and tail.split(".")[0] in STAGES:
        return head
    return name



def find_chains(nodes: Iterable[N]) -> dict[str, list[N]]:
    """The CP chains among `nodes` (anything with a .name: onnx NodeProtos or onnx_ir Nodes), by
    layer in graph order, each as its stage nodes in chain order: four, or three when the input
    stage was folded into the vertical one. Incomplete chains are left out."""
    by_layer: dict[str, dict[str, N]] = {}
    for node in nodes:
        name = node.name or ""
        layer = layer_of(name)
        if layer != name:
            by_layer.setdefault(layer, {})[name.rpartition(SEPARATOR)[2]] = node
    return {layer: [stages[s] for s in STAGES if s in stages] for layer, stages in by_layer.items()
            if set(stages) - {"in"} == set(STAGES[1:])}
