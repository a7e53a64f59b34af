"""How the nodes and weights of a CP chain are named, so that every tool maps them back to the
layer they replaced (profiles, reports, fine-tuning)."""

from __future__ import annotations

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

