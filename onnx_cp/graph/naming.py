"""How chain nodes and weights are named, so that every tool maps them back to the layer they
replaced (profiles, reports, fine-tuning): `<layer>/<form>/<stage>`, e.g. conv/cp/vertical,
conv/tucker2/core, conv/svd/out."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

N = TypeVar("N")

STAGES = ("in", "vertical", "horizontal", "out")  # the CP chain's
FORM_STAGES = {
    "cp": STAGES,
    "tucker2": ("in", "core", "out"),
    "svd": ("in", "out", "bias"),
    "spatial_svd": ("vertical", "horizontal"),
}
# a one-input-channel CP chain folds its input stage; a Gemm's SVD chain adds its bias last (an Add)
OPTIONAL_STAGES = {"cp": {"in"}, "svd": {"bias"}}
SEPARATOR = "/cp/"
LAYER_METADATA_KEY = "onnx_cp.layer"


def separator(form: str = "cp") -> str:
    return f"/{form}/"


def node_name(layer: str, stage: str, form: str = "cp") -> str:
    return f"{layer}{separator(form)}{stage}"


def weight_name(layer: str, stage: str, form: str = "cp") -> str:
    return f"{node_name(layer, stage, form)}.weight"


def split_name(name: str) -> tuple[str, str, str] | None:
    """(layer, form, stage) of a chain node (or weight) name; None for other names."""
    for form, stages in FORM_STAGES.items():
        head, sep, tail = name.rpartition(separator(form))
        if sep and tail.split(".")[0] in stages:
            return head, form, tail.split(".")[0]
    return None


def layer_of(name: str) -> str:
    """The original layer a chain node (or weight) came from; other names map to themselves."""
    parts = split_name(name)
    return parts[0] if parts else name


def find_chains(nodes: Iterable[N], forms: Iterable[str] | None = None) -> dict[str, list[N]]:
    """The chains among `nodes` (anything with a .name: onnx NodeProtos or onnx_ir Nodes), of every
    form (or of `forms`), by layer in graph order, each as its stage nodes in chain order.
    Incomplete chains are left out."""
    wanted = set(FORM_STAGES if forms is None else forms)
    by_layer: dict[tuple[str, str], dict[str, N]] = {}
    for node in nodes:
        parts = split_name(node.name or "")
        if parts and parts[1] in wanted:
            by_layer.setdefault(parts[:2], {})[parts[2]] = node
    chains = {}
    for (layer, form), stages in by_layer.items():
        required = set(FORM_STAGES[form]) - OPTIONAL_STAGES.get(form, set())
        if required <= set(stages):
            chains[layer] = [stages[s] for s in FORM_STAGES[form] if s in stages]
    return chains


def chain_forms(nodes: Iterable[N]) -> dict[str, str]:
    """The form of each layer's chain among `nodes`."""
    forms = {}
    for node in nodes:
        parts = split_name(node.name or "")
        if parts:
            forms.setdefault(parts[0], parts[1])
    return forms


def name_unnamed_nodes(nodes: Iterable, name_of: Callable[[object, int], str]) -> bool:
    """Give every unnamed node a unique name, `name_of(node, index)` (made unique by appending "_"),
    since onnxruntime reports and excludes nodes by name; True when any node was renamed."""
    nodes = list(nodes)
    taken = {node.name for node in nodes if node.name}
    renamed = False
    for index, node in enumerate(nodes):
        if not node.name:
            name = name_of(node, index)
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            renamed = True
    return renamed
