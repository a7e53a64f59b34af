"""What a low-rank chain costs on this machine: onnxruntime latency of one Conv against its chain
(of any form) at several ranks, measured in isolation (interleaved, one process) and cached per shape, machine,
onnxruntime version and thread count, so that rank searches do not re-measure what they know."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnx_cp.errors import OnnxCpError
from onnx_cp.graph import ConvSite, CPConvPass, conv_attributes, find_conv_sites, plan_with
from onnx_cp.graph.constants import constant_array
from onnx_cp.graph.plan import CP
from onnx_cp.lowrank import FORMS, SVD, TUCKER2, tucker2
from onnx_cp.measure import benchmark_latency
from onnx_cp.runtime.cpu import cpu_name
from onnx_cp.runtime.files import atomic_write

CACHE_ENV = "ONNX_CP_CACHE_DIR"
_RUNS = 40
# Part of the cache key: bump it when the chain's structure or the way it is timed changes, so old
# ratios are not reused (2: one-input-channel Convs get a three-conv chain; 3: timed in blocks;
# 4: the fixed cost of running a one-layer model taken off both times).
_CACHE_VERSION = 4
# A chain's time is never taken as less than this share of its conv's: one that measures within
# the noise of the fixed cost still costs something inside a model.
_SMALLEST_RATIO = 0.02


@dataclass(frozen=True)
class LayerShape:
    """Everything about a Conv that decides its latency."""

    kernel: tuple[int, int, int, int]  # (T, S/G, kh, kw)
    group: int
    input_hw: tuple[int, int]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    auto_pad: str
    op: str = "Conv"  # or "Gemm" or "LSTM": input_hw is then (rows, 1)
    recurrent: tuple[int, ...] = ()  # an LSTM's (directions, input size, time steps)

    @classmethod
    def of(cls, site: ConvSite) -> LayerShape:
        if site.is_lstm:
            inputs = constant_array(site.node.inputs[1]).shape[2]
            return cls(tuple(site.kernel.shape), 1, site.input_hw, (1, 1), (1, 1), (0, 0, 0, 0), "NOTSET", "LSTM",
                       (site.blocks, int(inputs), site.steps))
        attrs = conv_attributes(site.node)
        return cls(tuple(site.kernel.shape), site.group, site.input_hw or ((32, 1) if site.is_gemm else (32, 32)),
                   tuple(attrs["strides"]), tuple(attrs["dilations"]), tuple(attrs["pads"]),
                   attrs["auto_pad"], site.node.op_type)

    def key(self) -> str:
        fields = [self.kernel, self.group, self.input_hw, self.strides, self.dilations, self.pads, self.auto_pad]
        if self.op == "Conv":
            return json.dumps(fields)  # Conv keys as before
        if self.op == "LSTM":  # timed with the per-direction recurrence (graph/lstm.direction_factors)
            return json.dumps([*fields, self.op, list(self.recurrent), "per direction, V and U"])
        return json.dumps([*fields, self.op])


def chain_time_ratios(shape: LayerShape, ranks: Sequence[int], *, threads: int = 1) -> dict[int, float]:
    """Latency of the CP chain at each rank divided by the Conv's (cached)."""
    return form_time_ratios(shape, CP, ranks, threads=threads)


def form_time_ratios(shape: LayerShape, form: str, ranks: Sequence, *, threads: int = 1) -> dict:
    """Latency of the chain of `form` at each rank divided by the Conv's (cached per shape, form and
    rank; CP's entries keep their old keys, so caches stay valid)."""
    cache = _Cache.open()
    prefix = f"{_machine_key(threads)}|v{_CACHE_VERSION}|{shape.key()}"

    def key(rank) -> str:
        return f"{prefix}|{rank}" if form == CP else f"{prefix}|{form}|{json.dumps(rank)}"

    missing = [r for r in ranks if key(r) not in cache.data]
    if missing:
        conv = single_conv_model(shape)
        chains = [chain_model(conv, r, form=form) for r in missing]
        result = benchmark_latency([conv, pass_through_model(shape), *chains], threads=threads, runs=_RUNS,
                                   warmup=5)
        conv_ms, fixed_ms = result.models[0].median_ms, result.models[1].median_ms
        for rank, model in zip(missing, result.models[2:]):
            cache.data[key(rank)] = _layer_ratio(model.median_ms, conv_ms, fixed_ms)
        cache.save()
    return {r: cache.data[key(r)] for r in ranks}


def time_ratio(site: ConvSite, form: str, rank, *, threads: int = 1) -> float:
    """The latency of the site's chain of `form` at `rank` over the layer's (cached)."""
    rank = tuple(rank) if isinstance(rank, list) else rank
    return form_time_ratios(LayerShape.of(site), form, [rank], threads=threads)[rank]


def _layer_ratio(chain_ms: float, conv_ms: float, fixed_ms: float) -> float:
    """The chain's time over the conv's, both without the fixed cost of running a one-layer model
    (the call, the copies in and out, the layout reorders at its ends), which the layer does not pay
    inside a model. Left in, it pulls small layers' ratios towards 1: on charresnet's 3x3 convs at
    3x3 to 24x24 it is 4-5 us of 30-100 us, and the predicted speed-ups were 2.4x where the models
    measured 3.9x-4.4x [AVX-512 VNNI, AMX]."""
    layer_ms = conv_ms - fixed_ms
    if layer_ms <= 0:  # the conv is lost in the noise: nothing to take off
        return chain_ms / conv_ms if conv_ms > 0 else 1.0
    return max((chain_ms - fixed_ms) / layer_ms, _SMALLEST_RATIO)


def pass_through_model(shape: LayerShape) -> onnx.ModelProto:
    """The fixed cost of a one-layer model of this shape: its input returned as it is."""
    return _one_node_model(helper.make_node("Identity", ["x"], ["y"]), _input_dims(shape), [])


def _input_dims(shape: LayerShape, batch: int | str = 1) -> list:
    _, s, _, _ = shape.kernel
    if shape.op == "Gemm":
        return [shape.input_hw[0], s]
    if shape.op == "LSTM":
        _, inputs, steps = shape.recurrent
        return [steps, shape.input_hw[0] // steps, inputs]
    return [batch, s * shape.group, *shape.input_hw]


def single_conv_model(shape: LayerShape, seed: int = 0, kernel: np.ndarray | None = None,
                      batch: int | str = 1) -> onnx.ModelProto:
    """One Conv of this shape (a Gemm of shape.input_hw[0] rows for a Gemm shape), with `kernel`
    (random when None) and a zero bias."""
    t, s, kh, kw = shape.kernel
    if kernel is None:
        kernel = np.random.default_rng(seed).standard_normal(shape.kernel)
    if shape.op == "LSTM":
        return _lstm_model(shape, np.random.default_rng(seed))
    bias = numpy_helper.from_array(np.zeros(t, np.float32), "B")
    if shape.op == "Gemm":
        return _one_node_model(helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="gemm", transB=1),
                               _input_dims(shape),
                               [numpy_helper.from_array(np.asarray(kernel, np.float32).reshape(t, s), "W"), bias])
    weight = numpy_helper.from_array(np.asarray(kernel, dtype=np.float32), "W")
    attrs = {"kernel_shape": [kh, kw], "group": shape.group, "strides": list(shape.strides),
             "dilations": list(shape.dilations)}
    if shape.auto_pad in ("NOTSET", ""):
        attrs["pads"] = list(shape.pads)
    else:
        attrs["auto_pad"] = shape.auto_pad
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", **attrs)
    return _one_node_model(node, _input_dims(shape, batch), [weight, bias])


def _lstm_model(shape: LayerShape, rng: np.random.Generator) -> onnx.ModelProto:
    """One LSTM of this shape with random weights (small enough that its gates do not saturate)."""
    directions, inputs, _ = shape.recurrent
    hidden = shape.kernel[1] // directions
    arrays = {"W": (directions, 4 * hidden, inputs), "R": (directions, 4 * hidden, hidden),
              "B": (directions, 8 * hidden)}
    weights = [numpy_helper.from_array((rng.standard_normal(dims) / np.sqrt(hidden)).astype(np.float32), name)
               for name, dims in arrays.items()]
    node = helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], name="lstm", hidden_size=hidden,
                            direction="bidirectional" if directions == 2 else "forward")
    return _one_node_model(node, _input_dims(shape), weights)


def _one_node_model(node: onnx.NodeProto, input_shape: list, initializers: list) -> onnx.ModelProto:
    """A model of one node from input x to output y."""
    graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", 1, input_shape)],
                              [helper.make_tensor_value_info("y", 1, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def chain_model(conv: onnx.ModelProto, rank, seed: int = 0, form: str = CP) -> ir.Model:
    """The conv's chain of `form` at `rank`, with random factors (latency does not depend on values)."""
    rng = np.random.default_rng(seed)
    model = ir.from_proto(conv)
    sites = find_conv_sites(model)
    if form == CP:
        def decomposer(k, r):
            return [rng.standard_normal((n, r)) for n in k.shape]
    elif form == SVD and sites[0].is_lstm:
        def decomposer(k, r):  # solved: the SVD of the block-diagonal recurrence keeps to its directions,
            return FORMS[SVD].solve(k, r)  # which the splice times as per-direction products
    elif form == SVD:
        def decomposer(k, r):  # [U (T, R), V (R, S, kh, kw)]: no solve (a CRNN's classifier is 8210 x 1024)
            return [rng.standard_normal((k.shape[0], r)), rng.standard_normal((r, *k.shape[1:]))]
    else:
        def decomposer(k, r):  # any factors of the right shapes: one cheap solve of a random kernel
            if form == TUCKER2:
                return tucker2(rng.standard_normal(k.shape), r, max_iter=1)
            return FORMS[form].solve(rng.standard_normal(k.shape), r)
    plan = plan_with(sites, lambda site: rank, decomposer, form=form)
    CPConvPass(plan, sites=sites)(model)
    return model


def _machine_key(threads: int) -> str:
    return f"{platform.machine()}|{cpu_name()}|ort{ort.__version__}|t{threads}"


class _Cache:
    def __init__(self, path: Path, data: dict) -> None:
        self.path = path
        self.data = data

    @classmethod
    def open(cls) -> _Cache:
        folder = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "onnx-cp")
        path = folder / "layer_latency.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        return cls(path, data if isinstance(data, dict) else {})

    def save(self) -> None:
        """Best effort and atomic: a cache that cannot be written only costs re-measuring."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.path) as f:
                json.dump(self.data, f)
        except (OSError, OnnxCpError):
            pass
