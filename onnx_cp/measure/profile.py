"""Where the time goes: a per-layer latency breakdown from onnxruntime's profiler.

The profiler reports kernels under the names of the *optimised* graph, which at ORT_ENABLE_ALL are
not the model's: fused Conv+Relu and NCHWc convs are named after an output value plus a suffix
("r1_nchwc"), transformers add "_token_N" suffixes, layout conversions appear as ReorderInput /
ReorderOutput. Each kernel is mapped back to an original node (exact node name, else the longest
original node or value name it starts with), a fused kernel is attributed to the node of its own
op type (the Conv, not the Relu fused into it), and the node to its layer (a CP chain's four
convs count for the layer they replaced). Layout conversions are listed as "(reorder)"."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnx_cp.graph import naming
from onnx_cp.graph.naming import LAYER_METADATA_KEY, layer_of
from onnx_cp.progress import progress
from onnx_cp.runtime.inputs import measured_feeds, measured_shapes
from onnx_cp.runtime.model_io import ModelLike
from onnx_cp.runtime.session import (
    LoadedModel,
    load,
    make_session,
    resolve_threads,
    run,
    session_options,
)

REORDER = "(reorder)"
REORDER_OPS = {"ReorderInput", "ReorderOutput"}
DEFAULT_PROFILE_RUNS = 20
_KERNEL_SUFFIX = "_kernel_time"


@dataclass
class LayerTime:
    """One original layer's median time and the optimised graph's kernels that make it up."""

    name: str
    ms: float
    share: float  # of the profile's total_ms
    ops: list[str]
    kernels: list[str]


@dataclass
class LayerProfile:
    """Where one model's time goes; the fields are the profile JSON keys."""

    name: str
    path: str | None
    threads: int
    batch: int
    input_shapes: dict[str, list[int]]
    optimization: str
    runs: int
    total_ms: float  # sum of the layers' medians
    run_median_ms: float  # median over runs of all kernel time
    layers: list[LayerTime]  # in graph order, "(reorder)" last

    def to_json(self) -> dict:
        return {"kind": "profile", **dataclasses.asdict(self)}


def layer_profile(
    model: ModelLike,
    *,
    threads: int | str | None = 1,
    batch: int = 1,
    input_shapes: dict[str, list[int]] | None = None,
    runs: int = DEFAULT_PROFILE_RUNS,
    warmup: int = 5,
    optimization: str = "all",
    label: str | None = None,
    seed: int = 0,
) -> LayerProfile:
    """Median milliseconds per original layer over `runs` profiled runs (after `warmup`)."""
    threads = resolve_threads(threads)
    loaded = _named_copy(load(model, label))
    feeds = measured_feeds(loaded.ir_model, input_shapes, batch, seed)
    with tempfile.TemporaryDirectory(prefix="onnx-cp-profile-") as tmp:
        options = session_options(threads=threads, optimization=optimization,
                                  profile_prefix=os.path.join(tmp, "profile"))
        session = make_session(loaded, options)
        for _ in progress(range(warmup + runs), total=warmup + runs, desc="profiling"):
            run(session, feeds, loaded.path or loaded.label)
        trace_file = session.end_profiling()
        events = json.loads(Path(trace_file).read_text())

    per_run = _kernels_per_run(events)[warmup:]
    mapper = NodeMapper(loaded.ir_model)
    # kernel time summed per layer within each run, then the median over runs
    layer_runs: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(per_run))
    ops: dict[str, set[str]] = defaultdict(set)
    kernels: dict[str, set[str]] = defaultdict(set)
    for r, kernel_events in enumerate(per_run):
        for name, op, dur_us in kernel_events:
            layer = mapper.layer(name, op)
            layer_runs[layer][r] += dur_us / 1e3
            ops[layer].add(op)
            kernels[layer].add(name)
    medians = {layer: float(np.median(values)) for layer, values in layer_runs.items()}
    # The total is the sum of the per-layer medians, so that tables and plots add up; on a busy
    # machine the median of whole-run sums can be far off it (runs hit by preemption).
    total = sum(medians.values())
    run_median = float(np.median([sum(k[2] for k in events) for events in per_run]) / 1e3) \
        if per_run else 0.0
    order = mapper.order()
    layers = [
        LayerTime(layer, ms, ms / total if total > 0 else 0.0, sorted(ops[layer]), sorted(kernels[layer]))
        for layer, ms in sorted(medians.items(), key=lambda item: order(item[0]))
    ]
    return LayerProfile(
        name=loaded.label,
        path=loaded.path,
        threads=threads,
        batch=batch,
        input_shapes=measured_shapes(loaded.ir_model, input_shapes, batch),
        optimization=optimization,
        runs=len(per_run),
        total_ms=total,
        run_median_ms=run_median,
        layers=layers,
    )


class NodeMapper:
    """Maps profiler kernel names of the optimised graph back to the model's layers."""

    def __init__(self, model: ir.Model):
        self.node_layer: dict[str, str] = {}
        self.node_op: dict[str, str] = {}
        self.value_producer: dict[str, ir.Node] = {}
        self._position: dict[str, int] = {}
        self._cache: dict[tuple[str, str], str] = {}
        for index, node in enumerate(model.graph):
            layer = node.metadata_props.get(LAYER_METADATA_KEY) or layer_of(node.name)
            self.node_layer[node.name] = layer
            self.node_op[node.name] = node.op_type
            self._position.setdefault(layer, index)
            for value in node.outputs:
                if value.name:
                    self.value_producer[value.name] = node
        # longest first, so "conv10" wins over "conv1" for "conv10_nchwc"
        self._prefixes = sorted(
            [(name, "node") for name in self.node_layer] + [(name, "value") for name in self.value_producer],
            key=lambda item: -len(item[0]),
        )

    def layer(self, kernel: str, op: str) -> str:
        key = (kernel, op)
        if key not in self._cache:
            self._cache[key] = self._layer(kernel, op)
        return self._cache[key]

    def _layer(self, kernel: str, op: str) -> str:
        if op in REORDER_OPS:
            return REORDER
        if kernel in self.node_layer:
            return self.node_layer[kernel]
        for name, kind in self._prefixes:
            if name and kernel.startswith(name) and _boundary(kernel, len(name)):
                node = self.value_producer[name] if kind == "value" else None
                if node is None:
                    return self.node_layer[name]
                return self.node_layer[_owner(node, op).name]
        return kernel  # a node ORT made up that we cannot place: show it under its own name

    def order(self):
        """Sort key: graph position of the layer, unknown kernels after, reorder last."""
        last = len(self._position)

        def key(layer: str):
            if layer == REORDER:
                return (2, 0, layer)
            if layer in self._position:
                return (0, self._position[layer], layer)
            return (1, last, layer)

        return key


def _boundary(kernel: str, end: int) -> bool:
    return end == len(kernel) or not kernel[end].isalnum()


def _owner(node: ir.Node, op: str) -> ir.Node:
    """The node whose op type the fused kernel has: search the producers upwards (a Relu, Add or
    BatchNormalization fused into the Conv before it), nearest first."""
    wanted = op.removeprefix("Fused")  # FusedConv, FusedGemm, ...
    frontier = [node]
    for _ in range(4):
        for candidate in frontier:
            if candidate.op_type == wanted:
                return candidate
        frontier = [
            producer for candidate in frontier for value in candidate.inputs
            if value is not None and (producer := value.producer()) is not None
        ]
    return node


def _kernels_per_run(events: list[dict]) -> list[list[tuple[str, str, float]]]:
    """Kernel events (name, op, microseconds) grouped by the model_run they fall in."""
    runs = sorted(
        (e["ts"], e["ts"] + e["dur"]) for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    )
    grouped: list[list[tuple[str, str, float]]] = [[] for _ in runs]
    starts = [start for start, _ in runs]
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith(_KERNEL_SUFFIX):
            continue
        index = int(np.searchsorted(starts, event["ts"], side="right")) - 1
        if index < 0 or event["ts"] > runs[index][1]:
            continue
        name = event["name"][: -len(_KERNEL_SUFFIX)]
        op = event.get("args", {}).get("op_name", "")
        grouped[index].append((name, op, float(event["dur"])))
    return grouped


def _named_copy(loaded: LoadedModel) -> LoadedModel:
    """Give unnamed nodes a stable name (op type and index) so their time can be reported."""
    if not naming.name_unnamed_nodes(loaded.ir_model.graph, lambda node, index: f"{node.op_type}_{index}"):
        return loaded
    if isinstance(loaded.source, str):  # external data: bring it into memory for serialising
        ir.external_data.load_to_model(loaded.ir_model)
    source = ir.to_proto(loaded.ir_model).SerializeToString()
    return LoadedModel(loaded.ir_model, source, loaded.path, loaded.label)


def format_profile(profile: LayerProfile, top: int | None = None) -> str:
    """A short text table of a layer profile: layer, ms, share."""
    layers = profile.layers
    if top is not None:
        layers = sorted(layers, key=lambda layer: -layer.ms)[:top]
    width = max([len("layer")] + [len(layer.name) for layer in layers])
    lines = [f"{'layer'.ljust(width)}  {'ms':>8}  {'share':>6}  ops", "-" * (width + 24)]
    for layer in layers:
        lines.append(f"{layer.name.ljust(width)}  {layer.ms:8.3f}  {layer.share:6.1%}  "
                     f"{'+'.join(layer.ops)}")
    lines.append(f"{'total'.ljust(width)}  {profile.total_ms:8.3f}")
    return "\n".join(lines)
