"""The graph pass: replace eligible 2-D Convs by the four-conv CP chain.

For a Conv with kernel K (T, S/G, kh, kw) and group G, each group's kernel is approximated by
K_g[t,s,y,x] ~ sum_r Kt[t,r] Ks[s,r] Ky[y,r] Kx[x,r] and the Conv becomes

    1x1 (S -> R*G, group G) -> kh x 1 (depthwise, vertical pads/stride/dilation)
        -> 1 x kw (depthwise, horizontal pads/stride/dilation) -> 1x1 (R*G -> T, group G, bias)

This is exact for any pads: zero padding commutes with the bias-free first 1x1 conv, and the
separable spatial stages split the padding per axis. SAME_* auto_pad is kept on the two spatial
stages: along the axis a stage does not touch (kernel 1, stride 1) SAME adds no padding, so each
stage pads exactly as the original along its own axis, even with symbolic spatial sizes.

The pass knows nothing of how factors are found or ranks chosen: it reads a Plan (layer -> rank and
factors) and returns one LayerOutcome per Conv with its result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnx_cp import cp
from onnx_cp.errors import UsageError
from onnx_cp.graph import naming
from onnx_cp.graph.plan import LayerPlan, Plan
from onnx_cp.graph.sites import ConvSite, conv_attributes, find_conv_sites


@dataclass
class LayerOutcome:
    """What the pass did to one Conv; the report's row for it."""

    name: str
    kernel_shape: list[int] | None
    group: int
    status: str  # "decomposed" or "skipped"
    reason: str | None = None
    form: str | None = None
    note: str | None = None
    rank: int | None = None
    rel_error: float | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    max_component_norm: float | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        row = {k: v for k, v in self.__dict__.items() if k != "extra" and (k != "note" or v)}
        row.update(self.extra)
        return row


@dataclass
class ChainPassResult(ir.passes.PassResult):
    """The pass result, with one LayerOutcome per Conv of the model (the report's rows)."""

    outcomes: list[LayerOutcome] = field(default_factory=list)


class CPConvPass(ir.passes.InPlacePass):
    """Splice a CP chain in place of every Conv the plan names.

    `sites`: the model's Conv sites when already found (with shapes for MAC counts); else found here.
    """

    def __init__(self, plan: Plan, *, sites: Sequence[ConvSite] | None = None) -> None:
        super().__init__()
        self.plan = plan
        self.sites = sites

    def call(self, model: ir.Model) -> ChainPassResult:
        sites = self.sites if self.sites is not None else find_conv_sites(model)
        outcomes = []
        # A weight shared by several Convs is decomposed once and its chain weights reused.
        shared: dict[tuple[int, int], tuple[list[ir.Value], LayerOutcome]] = {}
        replaced_weights: list[ir.Value] = []
        for site in sites:
            layer = self.plan.layers.get(site.name) if site.eligible else None
            if layer is None:
                outcomes.append(_skipped(site, self.plan.refusal(site)))
                continue
            key = (id(site.weight), layer.rank)
            if key in shared:
                weights, first = shared[key]
                outcome = _decomposed(site, layer, first.rel_error, first.max_component_norm)
                outcome.extra["shares_weights_with"] = first.name
            else:
                weights, outcome = _chain_weights(model.graph, site, layer)
                shared[key] = (weights, outcome)
            replaced_weights.append(site.weight)
            _splice(model.graph, site, layer.rank, weights)
            outcomes.append(outcome)
        if model.ir_version is not None and model.ir_version < 4:
            # IR < 4 requires every initializer to be listed as a graph input too.
            model.graph.inputs.extend(w for weights, _ in shared.values() for w in weights)
        _remove_dead_values(model.graph, replaced_weights)
        return ChainPassResult(model, modified=bool(replaced_weights), outcomes=outcomes)


def _chain_weights(graph: ir.Graph, site: ConvSite, layer: LayerPlan) -> tuple[list[ir.Value], LayerOutcome]:
    per_group = [[np.asarray(f, dtype=np.float64) for f in fs] for fs in layer.factors]
    if len(per_group) != site.group:
        raise UsageError(f"plan for {site.name!r} has factors for {len(per_group)} groups, the Conv has {site.group}")
    approx = np.concatenate([cp.reconstruct(f) for f in per_group])
    rel_error = cp.relative_error(site.kernel.astype(np.float64), approx)
    per_group = [cp.balance(f) for f in per_group]
    weights = _chain_initializers(graph, site.name, per_group, site.kernel.dtype, site.folds_input_stage)
    norm = float(np.linalg.norm(site.kernel.astype(np.float64)))
    max_norm = max(float(cp.component_norms(f).max()) for f in per_group) / norm if norm > 0 else 0.0
    return weights, _decomposed(site, layer, rel_error, max_norm)


def _splice(graph: ir.Graph, site: ConvSite, rank: int, weights: list[ir.Value]) -> None:
    conv = site.node
    attrs = conv_attributes(conv)
    channels = rank * site.group
    x = conv.inputs[0]
    bias = conv.inputs[2] if len(conv.inputs) > 2 else None
    vertical_pads = [attrs["pads"][0], 0, attrs["pads"][2], 0]
    horizontal_pads = [0, attrs["pads"][1], 0, attrs["pads"][3]]
    stages = {
        "in": {"group": site.group},
        "vertical": {"group": 1 if site.folds_input_stage else channels, "strides": [attrs["strides"][0], 1],
                     "dilations": [attrs["dilations"][0], 1], **_padding(attrs, vertical_pads)},
        "horizontal": {"group": channels, "strides": [1, attrs["strides"][1]],
                       "dilations": [1, attrs["dilations"][1]], **_padding(attrs, horizontal_pads)},
        "out": {"group": site.group},
    }
    if site.folds_input_stage:
        del stages["in"]
    nodes: list[ir.Node] = []
    for (stage, stage_attrs), weight in zip(stages.items(), weights):
        inputs = [nodes[-1].outputs[0] if nodes else x, weight]
        if stage == "out" and bias is not None:
            inputs.append(bias)
        kernel_shape = list(weight.const_value.shape[2:])
        node = ir.node(
            "Conv",
            inputs,
            {"kernel_shape": kernel_shape, **stage_attrs},
            name=naming.node_name(site.name, stage),
            metadata_props={naming.LAYER_METADATA_KEY: site.name},
        )
        node.outputs[0].name = naming.node_name(site.name, stage) + ".output"
        nodes.append(node)
    ir.convenience.replace_nodes_and_values(
        graph, conv, [conv], nodes, [conv.outputs[0]], [nodes[-1].outputs[0]]
    )


def _chain_initializers(
    graph: ir.Graph, layer: str, per_group: list[list[np.ndarray]], dtype: np.dtype, fold_input: bool
) -> list[ir.Value]:
    """The chain's weight tensors, group-major channel order (channel g*R + r): four, or three
    when the input stage (then a (R, 1) column) is folded into the vertical one."""
    kt = np.concatenate([f[0] for f in per_group])  # (T, R): output channel g*T/G + t
    ks = np.concatenate([f[1].T for f in per_group])  # (G*R, S/G)
    ky = np.concatenate([f[2].T for f in per_group])  # (G*R, kh)
    kx = np.concatenate([f[3].T for f in per_group])  # (G*R, kw)
    arrays = {
        "in": ks[:, :, None, None],
        "vertical": ky[:, None, :, None],
        "horizontal": kx[:, None, None, :],
        "out": kt[:, :, None, None],
    }
    if fold_input:
        arrays["vertical"] = arrays.pop("in") * arrays["vertical"]
    values = []
    for stage, array in arrays.items():
        name = _unique_initializer_name(graph, naming.weight_name(layer, stage))
        tensor = ir.tensor(np.ascontiguousarray(array.astype(dtype)), name=name)
        value = ir.Value(name=name, const_value=tensor, shape=tensor.shape,
                         type=ir.TensorType(tensor.dtype))
        graph.register_initializer(value)
        values.append(value)
    return values


def _unique_initializer_name(graph: ir.Graph, name: str) -> str:
    candidate, n = name, 1
    while candidate in graph.initializers:
        candidate, n = f"{name}_{n}", n + 1
    return candidate


def _padding(attrs: dict, explicit_pads: list[int]) -> dict:
    if attrs["auto_pad"] in ("SAME_UPPER", "SAME_LOWER"):
        return {"auto_pad": attrs["auto_pad"]}
    if attrs["auto_pad"] == "VALID" or not any(explicit_pads):
        return {}
    return {"pads": explicit_pads}


def _remove_dead_values(graph: ir.Graph, values: Sequence[ir.Value]) -> None:
    """Drop weights (and the Constant/fold nodes that made them) that the splice left unused."""
    pending = list(values)
    graph_outputs = set(graph.outputs)
    while pending:
        value = pending.pop()
        is_initializer = graph.initializers.get(value.name) is value
        if value.uses() or value in graph_outputs:
            continue
        if value in graph.inputs:
            if not is_initializer:
                continue  # a real input of the model: never removed
            graph.inputs.remove(value)  # IR < 4 lists weights as inputs too
        producer = value.producer()
        if producer is not None:
            if any(out.uses() or out in graph_outputs for out in producer.outputs):
                continue
            if producer.graph is graph:
                inputs = [v for v in producer.inputs if v is not None]  # removal detaches them
                graph.remove(producer, safe=True)
                pending.extend(inputs)
        elif is_initializer:
            del graph.initializers[value.name]


def _skipped(site: ConvSite, reason: str) -> LayerOutcome:
    outcome = LayerOutcome(name=site.name, kernel_shape=site.kernel_shape, group=site.group,
                           status="skipped", reason=reason)
    if site.kernel is not None and site.kernel.ndim == 4:
        outcome.macs_before = outcome.macs_after = site.macs_before()
        outcome.params_before = outcome.params_after = site.params_before()
    return outcome


def _decomposed(site: ConvSite, layer: LayerPlan, rel_error: float, max_norm: float) -> LayerOutcome:
    rank = layer.rank
    return LayerOutcome(
        name=site.name, kernel_shape=site.kernel_shape, group=site.group, status="decomposed",
        form=layer.form, note=layer.note, rank=rank, rel_error=rel_error, macs_before=site.macs_before(),
        macs_after=site.macs_after(rank), params_before=site.params_before(),
        params_after=site.params_after(rank), max_component_norm=max_norm,
    )
