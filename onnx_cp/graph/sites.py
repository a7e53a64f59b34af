"""The Convs of a model as the planner sees them: each one's constant kernel, group, spatial sizes
and, when it cannot be decomposed, the reason, found once and never changed afterwards.

A Gemm with a constant weight is a site too: y = alpha A B + beta C is the 1x1 conv of A's rows with
the kernel alpha B^T (N, K, 1, 1), so it plans, solves and reports as one, and only the SVD form
(two thin MatMuls) applies (a CRNN recogniser's 8210-class output layer is a third of its time).

An LSTM is a site too: its kernel is the joint recurrence of its directions (graph/lstm.py), a
(4DH, DH) matrix as a 1x1 conv of the T*N states it reads, SVD its only form (the LSTM unrolled)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnx_cp.graph import lstm
from onnx_cp.graph.constants import constant_array


@dataclass(frozen=True)
class ConvSite:
    """One Conv node of the model and what the pass knows about it."""

    node: ir.Node
    name: str
    kernel: np.ndarray | None = None  # (T, S/G, kh, kw) in the weight's dtype
    group: int = 1
    input_hw: tuple[int, int] | None = None
    output_hw: tuple[int, int] | None = None
    refusal: str | None = None  # why the Conv cannot be decomposed; None if it can
    steps: int | None = None  # an LSTM's time steps, which its splice unrolls

    @property
    def is_gemm(self) -> bool:
        return self.node.op_type == "Gemm"

    @property
    def is_lstm(self) -> bool:
        return self.node.op_type == "LSTM"

    @property
    def is_matrix(self) -> bool:
        """A matrix product of rows (a Gemm's, or an LSTM's recurrence), not a Conv."""
        return self.is_gemm or self.is_lstm

    @property
    def eligible(self) -> bool:
        """Some low-rank form may replace it (see refusal_for for each form)."""
        return self.refusal is None

    def refusal_for(self, form: str) -> str | None:
        """Why this Conv cannot be replaced by a chain of `form` (None if it can)."""
        if self.refusal is None and self.is_matrix and form != "svd":
            return f"{self.node.op_type}: a matrix has one low-rank form, SVD"
        return self.refusal or form_refusal(self.kernel.shape, self.group, form)

    @property
    def weight(self) -> ir.Value:
        """The weight the chain replaces (an LSTM's recurrence R)."""
        return self.node.inputs[2] if self.is_lstm else self.node.inputs[1]

    @property
    def replaced_values(self) -> list[ir.Value]:
        """The weights the splice leaves unused: an LSTM's W, R and B are all rewritten."""
        return [v for v in self.node.inputs[1:4] if v is not None] if self.is_lstm else [self.weight]

    @property
    def kernel_shape(self) -> list[int] | None:
        return list(self.kernel.shape) if self.kernel is not None else None

    def group_kernels(self) -> list[np.ndarray]:
        """Each group's (T/G, S/G, kh, kw) kernel in float64, the solver's working precision."""
        t_per_group = self.kernel.shape[0] // self.group
        kernel = self.kernel.astype(np.float64)
        return [kernel[g * t_per_group:(g + 1) * t_per_group] for g in range(self.group)]

    @property
    def blocks(self) -> int:
        """Diagonal blocks of the kernel (an LSTM's directions): the rest of it is zeros."""
        return len(lstm.directions(self.node)) if self.is_lstm else 1

    def macs_before(self) -> int:
        t, s, kh, kw = self.kernel.shape
        return t * s * kh * kw * _area(self.output_hw) // self.blocks

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
        return int(np.prod(self.kernel.shape)) // self.blocks

    def params_after(self, rank: int) -> int:
        t, s, kh, kw = self.kernel.shape
        input_stage = 0 if self.folds_input_stage else s
        return rank * self.group * (input_stage + kh + kw) + t * rank

    def breakeven_rank(self) -> int:
        """The largest rank whose chain still costs fewer MACs than the Conv (0 if none)."""
        per_rank = self.macs_after(1)
        return max(0, (self.macs_before() - 1) // per_rank) if per_rank else 0


def form_refusal(kernel_shape: Sequence[int], group: int, form: str) -> str | None:
    """Why a (T, S/G, kh, kw) kernel of an otherwise eligible Conv does not suit `form`: each form
    needs something to split (a spatial extent for CP, two spatial axes for spatial SVD, input
    channels for Tucker-2 to reduce beyond what channel SVD does)."""
    _, s, kh, kw = kernel_shape
    if form == "cp":
        return "1x1 conv: CP gains nothing" if kh * kw == 1 else None
    if form == "tucker2":
        if kh * kw == 1:
            return "1x1 conv: Tucker-2 is the SVD form there"
        return "one input channel: Tucker-2 gains nothing over SVD" if s == 1 else None
    if form == "spatial_svd":
        return f"{kh}x{kw} kernel: no two spatial axes to split" if kh == 1 or kw == 1 else None
    if form == "svd":
        return None
    return f"unknown form {form!r}"


def find_conv_sites(
    model: ir.Model,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> list[ConvSite]:
    """Every Conv and Gemm of the model (subgraphs included, for the report), with refusal reasons.

    `shapes` maps value names to concrete shapes (from shape inference) for FLOP counts.
    """
    shapes = shapes or {}
    sites = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type not in ("Conv", "Gemm", "LSTM") or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Gemm":
            sites.append(_gemm_site(node, model, shapes))
            continue
        if node.op_type == "LSTM":
            sites.append(_lstm_site(node, model, shapes))
            continue
        kernel, group, refusal = _inspect(node, model.graph, model.ir_version)
        input_hw = output_hw = None
        if kernel is not None and kernel.ndim == 4:
            input_hw = _hw(shapes.get(node.inputs[0].name)) if node.inputs[0] else None
            output_hw = _hw(shapes.get(node.outputs[0].name))
        sites.append(ConvSite(node, layer_name(node), kernel, group, input_hw, output_hw, refusal))
    return sites


def layer_name(node: ir.Node) -> str:
    return node.name or node.outputs[0].name or "conv"


def filter_sites(
    sites: Sequence[ConvSite], include: str | None = None, exclude: str | None = None
) -> dict[str, str]:
    """Why each eligible site outside `include` / inside `exclude` (regex search) is left alone."""
    refusals = {}
    for site in sites:
        if not site.eligible:
            continue
        if include and not re.search(include, site.name):
            refusals[site.name] = f"not matched by the layer filter {include!r}"
        elif exclude and re.search(exclude, site.name):
            refusals[site.name] = f"matched by the exclusion filter {exclude!r}"
    return refusals


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


def conv_bias(site: ConvSite) -> np.ndarray | None:
    if site.is_lstm:  # its gates' bias is added with the input projection, apart from the recurrence
        return None
    if len(site.node.inputs) < 3 or site.node.inputs[2] is None:
        return None
    bias = constant_array(site.node.inputs[2])
    return bias.reshape(-1) if site.is_gemm and bias is not None else bias


def _inspect(node: ir.Node, main_graph: ir.Graph, ir_version: int | None) -> tuple[np.ndarray | None, int, str | None]:
    """(kernel, group, refusal reason) of one Conv."""
    if node.graph is not main_graph:
        return None, 1, "inside a subgraph (If/Loop/Scan body): left unchanged"
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None, 1, "Conv without a weight input"
    weight = node.inputs[1]
    kernel = constant_array(weight)
    if kernel is None:
        return None, 1, "weight is not a constant (computed at run time)"
    if weight in main_graph.inputs and (ir_version or 4) >= 4:
        # IR >= 4: an initializer that is also a graph input is only a default, overridable at run time
        # (IR < 4 lists every initializer as an input)
        return kernel, 1, "weight is also a graph input (can be overridden at run time)"
    if not np.issubdtype(kernel.dtype, np.floating):
        return kernel, 1, f"{kernel.dtype} weights (quantized model): not decomposed"
    if kernel.ndim != 4:
        return kernel, 1, f"{kernel.ndim - 2}-D conv: only 2-D convs are decomposed"
    group_attr = node.attributes.get("group")
    if group_attr is not None and group_attr.type != ir.AttributeType.INT:
        return kernel, 1, f"invalid group attribute (type {group_attr.type.name}, expected an int)"
    group = group_attr.as_int() if group_attr is not None else 1
    if group < 1 or kernel.shape[0] % group:
        return kernel, group, f"invalid group {group} for {kernel.shape[0]} output channels"
    if kernel.shape[1] == 1 and group > 1:
        return kernel, group, "depthwise conv: no low-rank form gains anything"
    if not np.all(np.isfinite(kernel)):
        return kernel, group, "weight holds NaN or infinity"
    malformed = _malformed_attributes(node, kernel.shape[2:])
    if malformed:
        return kernel, group, malformed
    return kernel, group, None


def _gemm_site(node: ir.Node, model: ir.Model, shapes: Mapping[str, Sequence[int]]) -> ConvSite:
    """A Gemm as the 1x1 conv of its rows: kernel alpha B^T as (N, K, 1, 1), rows as the height."""
    kernel, refusal = _gemm_kernel(node, model.graph, model.ir_version)
    rows = shapes.get(node.inputs[0].name) if node.inputs and node.inputs[0] is not None else None
    hw = (int(rows[0]), 1) if rows is not None and len(rows) == 2 and isinstance(rows[0], int) and rows[0] > 0 \
        else None
    return ConvSite(node, layer_name(node), kernel, 1, hw, hw, refusal)


def _lstm_site(node: ir.Node, model: ir.Model, shapes: Mapping[str, Sequence[int]]) -> ConvSite:
    """An LSTM as the 1x1 conv of the T*N joint states its recurrence reads."""
    steps = lstm.sequence_length(node, shapes)
    refusal = lstm.lstm_refusal(node, model.graph, steps)
    if refusal is None and (model.ir_version or 4) < 4:
        refusal = f"IR version {model.ir_version}: the unrolled LSTM's constants need IR 4 or later"
    recurrence = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    kernel = None
    if recurrence is not None and recurrence.ndim == 3:
        kernel = lstm.joint_recurrence(recurrence)[:, :, None, None]
    hw = (steps * (lstm.batch_size(node, shapes) or 1), 1) if steps else None
    return ConvSite(node, layer_name(node), kernel, 1, hw, hw, refusal, steps)


def _gemm_kernel(node: ir.Node, main_graph: ir.Graph, ir_version: int | None) -> tuple[np.ndarray | None, str | None]:
    def attr(name: str, default):
        value = node.attributes.get(name)
        return value.value if value is not None else default

    if node.graph is not main_graph:
        return None, "inside a subgraph (If/Loop/Scan body): left unchanged"
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None, "Gemm without a weight input"
    weight = constant_array(node.inputs[1])
    if weight is None:
        return None, "weight is not a constant (computed at run time)"
    if weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating):
        return None, f"{weight.dtype} weight of shape {list(weight.shape)}: not decomposed"
    matrix = weight if attr("transB", 0) else weight.T  # (N, K)
    kernel = (matrix * np.asarray(attr("alpha", 1.0), matrix.dtype))[:, :, None, None]
    if node.inputs[1] in main_graph.inputs and (ir_version or 4) >= 4:
        return kernel, "weight is also a graph input (can be overridden at run time)"
    if attr("transA", 0):
        return kernel, "Gemm with transA=1: not decomposed"
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None:
        array = constant_array(bias)
        if array is None or array.shape not in ((matrix.shape[0],), (1, matrix.shape[0])) or attr("beta", 1.0) != 1.0:
            return kernel, "Gemm bias is not a constant row of N values with beta 1: not decomposed"
    if not np.all(np.isfinite(kernel)):
        return kernel, "weight holds NaN or infinity"
    return kernel, None


def _malformed_attributes(node: ir.Node, spatial: Sequence[int]) -> str | None:
    """Why the Conv's attributes do not describe a valid 2-D conv of this kernel (None if they do);
    onnxruntime refuses such a model too, but the splice must not be the one that trips on it."""
    expected = {"pads": 4, "strides": 2, "dilations": 2, "kernel_shape": 2}
    for name, length in expected.items():
        attr = node.attributes.get(name)
        if attr is None:
            continue
        if attr.type != ir.AttributeType.INTS:
            return f"invalid {name} attribute (type {attr.type.name}, expected a list of ints)"
        values = list(attr.as_ints())
        if len(values) != length:
            return f"invalid {name} {values}: a 2-D conv needs {length} values"
        if name == "pads" and any(v < 0 for v in values):
            return f"invalid pads {values}: negative"
        if name in ("strides", "dilations") and any(v < 1 for v in values):
            return f"invalid {name} {values}: values must be positive"
        if name == "kernel_shape" and values != [int(d) for d in spatial]:
            return f"kernel_shape {values} does not match the weight's {[int(d) for d in spatial]}"
    auto_pad = node.attributes.get("auto_pad")
    if auto_pad is not None:
        if auto_pad.type != ir.AttributeType.STRING or not isinstance(auto_pad.value, str):
            return f"invalid auto_pad attribute ({auto_pad.value!r}, expected a string)"
        if auto_pad.as_string() not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
            return f"invalid auto_pad {auto_pad.as_string()!r}"
    group = node.attributes.get("group")
    if group is not None and group.type != ir.AttributeType.INT:
        return f"invalid group attribute (type {group.type.name}, expected an int)"
    return None


def _hw(shape: Sequence[int] | None) -> tuple[int, int] | None:
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        return None
    return int(shape[2]), int(shape[3])


def _area(hw: tuple[int, int] | None) -> int:
    return hw[0] * hw[1] if hw else 1
