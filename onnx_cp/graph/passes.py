"""The graph pass: replace the Convs a Plan names by their low-rank chains (CP, Tucker-2, channel
SVD or spatial SVD, as each LayerPlan's form says; see the form modules and graph/stages.py).

The pass knows nothing of how factors are found or ranks chosen: it reads a Plan (layer -> form,
rank and factors) and returns one LayerOutcome per Conv with its result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnx_cp import cp
from onnx_cp.errors import UsageError
from onnx_cp.graph import stages
from onnx_cp.graph.forms import SPLICES, macs_after, params_after
from onnx_cp.graph.plan import LayerPlan, Plan
from onnx_cp.graph.sites import ConvSite, find_conv_sites
from onnx_cp.lowrank import FORMS


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
    rank: int | list[int] | None = None  # Tucker-2: [R_in, R_out]
    rel_error: float | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    max_component_norm: float | None = None
    op: str = "Conv"  # or "Gemm"
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
    """Splice the planned chain (of the LayerPlan's form) in place of every Conv the plan names.

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
        shared: dict[tuple, tuple[list[ir.Value], LayerOutcome]] = {}
        replaced_weights: list[ir.Value] = []
        for site in sites:
            layer = self.plan.layers.get(site.name) if site.eligible else None
            if layer is None:
                outcomes.append(_skipped(site, self.plan.refusal(site)))
                continue
            refusal = site.refusal_for(layer.form)
            if refusal is not None:
                raise UsageError(f"plan for {site.name!r} asks for a {layer.form} chain: {refusal}")
            key = (id(site.weight), layer.form, _hashable(layer.rank))
            if key in shared:
                weights, first = shared[key]
                outcome = _decomposed(site, layer, first.rel_error, first.max_component_norm)
                outcome.extra["shares_weights_with"] = first.name
            else:
                weights, outcome = _chain_weights(model.graph, site, layer)
                shared[key] = (weights, outcome)
            replaced_weights.extend(site.replaced_values)
            stages.splice(model.graph, site, layer.form, SPLICES[layer.form].layout(site, layer.rank), weights)
            outcomes.append(outcome)
        if model.ir_version is not None and model.ir_version < 4:
            # IR < 4 requires every initializer to be listed as a graph input too.
            model.graph.inputs.extend(w for weights, _ in shared.values() for w in weights)
        remove_dead_values(model.graph, replaced_weights)
        return ChainPassResult(model, modified=bool(replaced_weights), outcomes=outcomes)


LowRankPass = CPConvPass  # the same pass, under the name that says it splices every form


def _hashable(rank):
    return tuple(rank) if isinstance(rank, (list, tuple)) else rank


def _chain_weights(graph: ir.Graph, site: ConvSite, layer: LayerPlan) -> tuple[list[ir.Value], LayerOutcome]:
    if layer.form not in SPLICES:
        raise UsageError(f"plan for {site.name!r}: unknown form {layer.form!r}; forms are {', '.join(SPLICES)}")
    per_group = [[np.asarray(f, dtype=np.float64) for f in fs] for fs in layer.factors]
    if len(per_group) != site.group:
        raise UsageError(f"plan for {site.name!r} has factors for {len(per_group)} groups, the Conv has {site.group}")
    kernel = site.kernel.astype(np.float64)
    approx = np.concatenate([FORMS[layer.form].reconstruct(f) for f in per_group])
    if approx.shape != kernel.shape:
        raise UsageError(f"plan for {site.name!r}: its {layer.form} factors rebuild a {list(approx.shape)} kernel, "
                         f"the Conv's is {list(kernel.shape)}")
    rel_error = cp.relative_error(kernel, approx)
    splice = SPLICES[layer.form]
    arrays, max_norm = splice.weights(site, per_group)
    weights = stages.register_weights(graph, site.name, layer.form, splice.layout(site, layer.rank), arrays,
                                      site.kernel.dtype, matrices=site.is_matrix)
    return weights, _decomposed(site, layer, rel_error, max_norm)


def remove_dead_values(graph: ir.Graph, values: Sequence[ir.Value]) -> None:
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
                           status="skipped", reason=reason, op=site.node.op_type)
    if site.kernel is not None and site.kernel.ndim == 4:
        outcome.macs_before = outcome.macs_after = site.macs_before()
        outcome.params_before = outcome.params_after = site.params_before()
    return outcome


def _decomposed(site: ConvSite, layer: LayerPlan, rel_error: float, max_norm: float | None) -> LayerOutcome:
    rank = list(layer.rank) if isinstance(layer.rank, (list, tuple)) else layer.rank
    return LayerOutcome(
        name=site.name, kernel_shape=site.kernel_shape, group=site.group, status="decomposed",
        form=layer.form, note=layer.note, rank=rank, rel_error=rel_error, macs_before=site.macs_before(),
        macs_after=macs_after(site, layer.form, layer.rank), params_before=site.params_before(),
        params_after=params_after(site, layer.form, layer.rank), max_component_norm=max_norm,
        op=site.node.op_type,
    )
