"""The graph pass: replace eligible 2-D Convs by the four-conv CP chain.

For a Conv with kernel K (T, S/G, kh, kw) and group G, each group's kernel is approximated by
K_g[t,s,y,x] ~ sum_r Kt[t,r] Ks[s,r] Ky[y,r] Kx[x,r] and the Conv becomes

    1x1 (S -> R*G, group G) -> kh x 1 (depthwise, vertical pads/stride/dilation)
        -> 1 x kw (depthwise, horizontal pads/stride/dilation) -> 1x1 (R*G -> T, group G, bias)

This is exact for any pads: zero padding commutes with the bias-free first 1x1 conv, and the
separable spatial stages split the padding per axis. SAME_* auto_pad is kept on the two spatial
stages: along the axis a stage does not touch (kernel 1, stride 1) SAME adds no padding, so each
stage pads exactly as the original along its own axis, even with symbolic spatial sizes.

The pass knows nothing of how factors are found: it takes a `decomposer(kernel, rank)` that
returns the four factors (or an object with `.factors`), and a `rank_for(site)` policy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from onnx_cp import chain_names

CPFactors = Sequence[np.ndarray]  # (T,R), (S,R), (kh,R), (kw,R)
Decomposer = Callable[[np.ndarray, int], object]

# Ops whose constant inputs we fold to find a weight. Quantize/Dequantize are left out on
# purpose: folding them would silently turn a quantized layer back into a float one.
_FOLDABLE_OPS = {
    "Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Slice",
    "Mul", "Div", "Add", "Sub", "Neg", "Split", "Gather", "Flatten", "Expand", "Tile",
    "ConstantOfShape",
}
_MAX_FOLD_DEPTH = 8


@dataclass
class ConvSite:
    """One Conv node of the main graph and what the pass knows about it."""

    node: ir.Node
    name: str
    kernel: np.ndarray | None = None  # (T, S/G, kh, kw) in the weight's dtype
    group: int = 1
    input_hw: tuple[int, int] | None = None
    output_hw: tuple[int, int] | None = None
    reason: str | None = None  # why the Conv cannot be decomposed; None if it can

    @property
    def eligible(self) -> bool:
        return self.reason is None

    @property
    def kernel_shape(self) -> list[int] | None:
        return list(self.kernel.shape) if self.kernel is not None else None

    def group_kernels(self) -> list[np.ndarray]:
        """Each group's (T/G, S/G, kh, kw) kernel in float64, the solver's working precision."""
        t_per_group = self.kernel.shape[0] // self.group
        kernel = self.kernel.astype(np.float64)
        return [kernel[g * t_per_group:(g + 1) * t_per_group] for g in range(self.group)]

    def macs_before(self) -> int:
        t, s, kh, kw = self.kernel.shape
        return t * s * kh * kw * _area(self.output_hw)

    @property
    def folds_input_stage(self) -> bool:
        """A Conv with one input channel gets a three-conv chain: its 1x1 input stage is a mere
        per-channel scale, folded into the vertical stage (fewer MACs and one Conv less: charnet's
        whole network at ranks 32/16/64 went 13.3x -> 13.8x faster)."""
        return self.kernel is not None and self.kernel.shape[1] == 1 and self.group == 1

    def macs_after(self, rank: int) -> int:
        """MACs of the chain: the first 1x1 runs at input resolution, the vertical stage at
        (output rows x input columns), the rest at output resolution."""
        t, s, kh, kw = self.kernel.shape
        channels = rank * self.group
        ho, wo = self.output_hw or (1, 1)
        hi, wi = self.input_hw or (ho, wo)
        input_stage = 0 if self.folds_input_stage else s * channels * hi * wi
        return (
            input_stage
            + channels * kh * ho * wi
            + channels * kw * ho * wo
            + channels * (t // self.group) * ho * wo
        )

    def params_before(self) -> int:
        return int(np.prod(self.kernel.shape))

    def params_after(self, rank: int) -> int:
        t, s, kh, kw = self.kernel.shape
        input_stage = 0 if self.folds_input_stage else s
        return rank * self.group * (input_stage + kh + kw) + t * rank

    def breakeven_rank(self) -> int:
        """The largest rank whose chain still costs fewer MACs than the Conv (0 if none)."""
        per_rank = self.macs_after(1)
        return max(0, (self.macs_before() - 1) // per_rank) if per_rank else 0


def find_conv_sites(
    model: ir.Model,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> list[ConvSite]:
    """Every Conv of the model (subgraphs included, for the report), with eligibility reasons.

    `shapes` maps value names to concrete shapes (from shape inference) for FLOP counts.
    """
    shapes = shapes or {}
    sites = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        site = ConvSite(node=node, name=layer_name(node))
        site.reason = _ineligibility(site, model.graph)
        if site.kernel is not None and site.kernel.ndim == 4:
            site.input_hw = _hw(shapes.get(node.inputs[0].name)) if node.inputs[0] else None
            site.output_hw = _hw(shapes.get(node.outputs[0].name))
        sites.append(site)
    return sites


def layer_name(node: ir.Node) -> str:
    return node.name or node.outputs[0].name or "conv"


def select_sites(
    sites: Sequence[ConvSite], layers: str | None = None, exclude: str | None = None
) -> None:
    """Mark eligible sites outside --layers / inside --exclude as skipped (regex search)."""
    for site in sites:
        if not site.eligible:
            continue
        if layers and not re.search(layers, site.name):
            site.reason = f"not matched by --layers {layers!r}"
        elif exclude and re.search(exclude, site.name):
            site.reason = f"matched by --exclude {exclude!r}"


@dataclass
class LayerOutcome:
    """What the pass did to one Conv; the report's row for it."""

    name: str
    kernel_shape: list[int] | None
    group: int
    status: str  # "decomposed" or "skipped"
    reason: str | None = None
    rank: int | None = None
    rel_error: float | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    max_component_norm: float | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        row = {k: v for k, v in self.__dict__.items() if k != "extra"}
        row.update(self.extra)
        return row


class CPConvPass(ir.passes.InPlacePass):
    """Splice a CP chain in place of every site that `rank_for` gives a rank.

    rank_for(site) -> int | None: the rank to use (None leaves the Conv alone).
    decomposer(kernel (T,S,kh,kw) float64, rank) -> four factors or an object with .factors.
    After the call, `self.outcomes` holds one LayerOutcome per Conv of the model.
    """

    def __init__(
        self,
        rank_for: Callable[[ConvSite], int | None],
        decomposer: Decomposer,
        *,
        sites: Sequence[ConvSite] | None = None,
    ) -> None:
        super().__init__()
        self.rank_for = rank_for
        self.decomposer = decomposer
        self.sites = sites
        self.outcomes: list[LayerOutcome] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites = self.sites if self.sites is not None else find_conv_sites(model)
        self.outcomes = []
        # A weight shared by several Convs is decomposed once and its chain weights reused.
        shared: dict[tuple[int, int], tuple[list[ir.Value], LayerOutcome]] = {}
        replaced_weights: list[ir.Value] = []
        for site in sites:
            rank = self.rank_for(site) if site.eligible else None
            if rank is None:
                self.outcomes.append(_skipped(site, site.reason or "no rank chosen"))
                continue
            key = (id(site.node.inputs[1]), rank)
            if key in shared:
                weights, first = shared[key]
                outcome = _decomposed(site, rank, first.rel_error, first.max_component_norm)
                outcome.extra["shares_weights_with"] = first.name
            else:
                weights, outcome = self._chain_weights(model.graph, site, rank)
                shared[key] = (weights, outcome)
            replaced_weights.append(site.node.inputs[1])
            self._splice(model.graph, site, rank, weights)
            self.outcomes.append(outcome)
        if model.ir_version is not None and model.ir_version < 4:
            # IR < 4 requires every initializer to be listed as a graph input too.
            new = [w for weights, _ in shared.values() for w in weights]
            model.graph.inputs.extend(new)
        _remove_dead_values(model.graph, replaced_weights)
        return ir.passes.PassResult(model, modified=bool(replaced_weights))

    def _chain_weights(self, graph: ir.Graph, site: ConvSite, rank: int):
        per_group = [_as_factors(self.decomposer(k, rank)) for k in site.group_kernels()]
        approx = np.concatenate([reconstruct(f) for f in per_group])
        kernel = site.kernel.astype(np.float64)
        norm = np.linalg.norm(kernel)
        rel_error = float(np.linalg.norm(kernel - approx) / norm) if norm > 0 else 0.0
        per_group = [balance(f) for f in per_group]
        weights = _chain_initializers(graph, site.name, per_group, site.kernel.dtype, site.folds_input_stage)
        outcome = _decomposed(site, rank, rel_error, _max_component_norm(per_group, norm))
        return weights, outcome

    @staticmethod
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
                name=chain_names.node_name(site.name, stage),
                metadata_props={chain_names.LAYER_METADATA_KEY: site.name},
            )
            node.outputs[0].name = chain_names.node_name(site.name, stage) + ".output"
            nodes.append(node)
        ir.convenience.replace_nodes_and_values(
            graph, conv, [conv], nodes, [conv.outputs[0]], [nodes[-1].outputs[0]]
        )


def reconstruct(factors: CPFactors) -> np.ndarray:
    t, s, y, x = factors
    return np.einsum("tr,sr,yr,xr->tsyx", t, s, y, x, optimize=True)


def balance(factors: CPFactors) -> list[np.ndarray]:
    """Give each rank-one term's four columns the same norm: float32 inference then sees no
    huge-times-tiny products, whatever scaling the solver left."""
    norms = np.stack([np.linalg.norm(f, axis=0) for f in factors])  # (4, R)
    alive = np.all(norms > 0, axis=0)
    target = np.where(alive, np.prod(norms, axis=0) ** 0.25, 0.0)
    safe = np.where(norms > 0, norms, 1.0)
    return [f * (target / safe[i]) for i, f in enumerate(factors)]


def _as_factors(result: object) -> list[np.ndarray]:
    factors = getattr(result, "factors", result)
    factors = [np.asarray(f, dtype=np.float64) for f in factors]
    if len(factors) != 4:
        raise ValueError(f"decomposer returned {len(factors)} factors, expected 4")
    return factors


def _max_component_norm(per_group: list[list[np.ndarray]], kernel_norm: float) -> float:
    if kernel_norm == 0:
        return 0.0
    largest = max(float(np.max(np.prod([np.linalg.norm(f, axis=0) for f in fs], axis=0)))
                  for fs in per_group)
    return largest / kernel_norm


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
        name = _unique_initializer_name(graph, chain_names.weight_name(layer, stage))
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


def conv_attributes(conv: ir.Node) -> dict:
    """strides, dilations, pads [top, left, bottom, right] and auto_pad with ONNX defaults."""
    def ints(name, default):
        attr = conv.attributes.get(name)
        return list(attr.as_ints()) if attr is not None else default

    auto_pad = conv.attributes.get("auto_pad")
    return {
        "strides": ints("strides", [1, 1]),
        "dilations": ints("dilations", [1, 1]),
        "pads": ints("pads", [0, 0, 0, 0]),
        "auto_pad": auto_pad.as_string() if auto_pad is not None else "NOTSET",
    }


def _padding(attrs: dict, explicit_pads: list[int]) -> dict:
    if attrs["auto_pad"] in ("SAME_UPPER", "SAME_LOWER"):
        return {"auto_pad": attrs["auto_pad"]}
    if attrs["auto_pad"] == "VALID" or not any(explicit_pads):
        return {}
    return {"pads": explicit_pads}


def _ineligibility(site: ConvSite, main_graph: ir.Graph) -> str | None:
    node = site.node
    if node.graph is not main_graph:
        return "inside a subgraph (If/Loop/Scan body): left unchanged"
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return "Conv without a weight input"
    kernel = constant_array(node.inputs[1])
    if kernel is None:
        return "weight is not a constant (computed at run time)"
    site.kernel = kernel
    if not np.issubdtype(kernel.dtype, np.floating):
        return f"{kernel.dtype} weights (quantized model): not decomposed"
    if kernel.ndim != 4:
        return f"{kernel.ndim - 2}-D conv: only 2-D convs are decomposed"
    group_attr = node.attributes.get("group")
    site.group = group_attr.as_int() if group_attr is not None else 1
    if site.group < 1 or kernel.shape[0] % site.group:
        return f"invalid group {site.group} for {kernel.shape[0]} output channels"
    if kernel.shape[2] * kernel.shape[3] == 1:
        return "1x1 conv: CP gains nothing"
    if kernel.shape[1] == 1 and site.group > 1:
        return "depthwise conv: CP gains nothing"
    if not np.all(np.isfinite(kernel)):
        return "weight holds NaN or infinity"
    return None


def constant_array(value: ir.Value, depth: int = 0) -> np.ndarray | None:
    """The value's array if it is an initializer, a Constant, or foldable from those."""
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is not None:
        return tensor.numpy()
    node = value.producer()
    if node is None or depth >= _MAX_FOLD_DEPTH:
        return None
    if node.domain not in ("", "ai.onnx") or node.op_type not in _FOLDABLE_OPS or node.graph is None:
        return None
    if any(attr.is_ref() for attr in node.attributes.values()):
        return None
    inputs = [constant_array(v, depth + 1) if v is not None else None for v in node.inputs]
    if any(a is None for a, v in zip(inputs, node.inputs) if v is not None):
        return None
    return _evaluate_node(node, inputs, value)


def _evaluate_node(node: ir.Node, inputs: list[np.ndarray | None], wanted: ir.Value) -> np.ndarray | None:
    names = [f"in{i}" if a is not None else "" for i, a in enumerate(inputs)]
    outputs = [f"out{i}" for i in range(len(node.outputs))]
    proto_node = onnx.helper.make_node(node.op_type, names, outputs)
    proto_node.attribute.extend(ir.serde.serialize_node(node).attribute)
    opset = node.graph.opset_imports.get("", 18) if node.graph is not None else 18
    feeds = {n: a for n, a in zip(names, inputs) if a is not None}
    try:
        results = ReferenceEvaluator(proto_node, opsets={"": opset}).run(None, feeds)
    except Exception:  # noqa: BLE001 - anything unfoldable is simply not a constant
        return None
    return np.asarray(results[list(node.outputs).index(wanted)])


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


def _decomposed(site: ConvSite, rank: int, rel_error: float, max_norm: float) -> LayerOutcome:
    return LayerOutcome(
        name=site.name, kernel_shape=site.kernel_shape, group=site.group, status="decomposed",
        rank=rank, rel_error=rel_error, macs_before=site.macs_before(),
        macs_after=site.macs_after(rank), params_before=site.params_before(),
        params_after=site.params_after(rank), max_component_norm=max_norm,
    )


def _hw(shape: Sequence[int] | None) -> tuple[int, int] | None:
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        return None
    return int(shape[2]), int(shape[3])


def _area(hw: tuple[int, int] | None) -> int:
    return hw[0] * hw[1] if hw else 1
