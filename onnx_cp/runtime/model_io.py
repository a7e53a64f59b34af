"""Loading and saving ONNX models safely.

Everything that touches model files goes through here:
- loading refuses what is not a readable ONNX model, and external-data locations that
  point outside the model's folder (a model file must not make the tool read arbitrary files);
  before any work it also refuses, with a reason, what would make later steps compute another
  function or fail obscurely (check_proto: IR version and opsets onnxruntime cannot run, duplicate
  initializers or values, dangling inputs, cycles, onnx.checker's findings, external data past
  the end of its file);
- saving is atomic (temporary files in the destination folder, then rename), writes external
  data beside the output when the input had some or the model is too large for one protobuf,
  and never leaves a half-written file behind.
"""

from __future__ import annotations

import heapq
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx_ir import external_data as ir_external_data

from onnx_cp.errors import OnnxCpError, first_line
from onnx_cp.runtime.files import check_replaceable
from onnx_cp.runtime.inputs import MAX_INPUT_ELEMENTS

ModelLike = str | os.PathLike | onnx.ModelProto | ir.Model

# protobuf refuses messages over 2 GiB; stay clear of the limit.
PROTOBUF_SAFE_BYTES = 1_800_000_000
# IR versions onnxruntime runs: 3 (ONNX 1.0's first with opsets) up to what this onnx package knows
# (onnx.IR_VERSION, 14 for onnx 1.23; onnxruntime 1.32 runs 3..14); newer ones are refused by
# onnx.checker too.
MIN_IR_VERSION = 3
# Default-domain opsets from 1 up to what this onnx knows. onnxruntime has no kernels for several ops
# below 7 (Relu-1, Gemm-6), but others run there (Clip-6, Pad-2): a model it cannot run is refused
# when its session is made, naming the op.
MIN_OPSET = 1


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file as an onnx_ir model; external data is memory-mapped lazily."""
    path = Path(path)
    if not path.exists():
        raise OnnxCpError(f"{path}: no such file")
    if not path.is_file():
        raise OnnxCpError(f"{path}: not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise OnnxCpError(f"{path}: not a valid ONNX model ({first_line(exc, 200)})") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise OnnxCpError(f"{path}: not a valid ONNX model (no graph)")
    _check_external_locations(proto, path.parent)
    proto = check_proto(proto, str(path), base=path.parent)
    model = _deserialize(proto, str(path))
    ir_external_data.set_base_dir(model.graph, str(path.parent))
    return model


def to_ir(model: ModelLike) -> ir.Model:
    """Accept a path, an onnx.ModelProto or an ir.Model; return an ir.Model (never the caller's)."""
    if isinstance(model, ir.Model):
        return model.clone()  # new graph objects; tensors are shared, never written
    if isinstance(model, onnx.ModelProto):
        # No onnx.checker here: onnx-cp's own stages hand protos through to_ir too (a fine-tuned
        # copy may carry value_info without shapes, which the checker refuses); files get it all.
        return _deserialize(check_proto(model, "the model", checker=False), "the model")
    return load_model(model)


def _deserialize(proto: onnx.ModelProto, label: str) -> ir.Model:
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx_ir raises various types on malformed graphs
        raise OnnxCpError(f"{label}: malformed ONNX model ({first_line(exc, 200)})") from None
    return model


def check_proto(
    proto: onnx.ModelProto, label: str, base: Path | None = None, *, checker: bool = True
) -> onnx.ModelProto:
    """Refuse, with one line starting with `label`, a model that onnx-cp would rewrite into another
    function or fail on obscurely; return the proto to deserialize (the same one, or a copy whose
    nodes are topologically sorted when the file lists them out of order: `proto` is never changed).

    `base` is the model's folder, for the external-data size checks (None: a model in memory);
    checker=False skips onnx.checker.
    """
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise OnnxCpError(f"{label}: not a valid ONNX model (no graph)")
    if not proto.graph.output:  # found by benchmarks/fuzz.py: eval failed with an IndexError
        raise OnnxCpError(f"{label}: the graph has no outputs")
    _check_versions(proto, label)
    _check_strings(proto, label)
    proto = _minus_one_as_unknown(proto)
    _check_graph_inputs(proto.graph, label)
    order = _check_graph_structure(proto.graph, label)
    if order is not None:
        sorted_proto = onnx.ModelProto()
        sorted_proto.CopyFrom(proto)
        del sorted_proto.graph.node[:]
        sorted_proto.graph.node.extend(proto.graph.node[i] for i in order)
        proto = sorted_proto
    if checker:
        _run_checker(proto, label)
    _check_tensor_sizes(proto, label, base)
    return proto


def _check_versions(proto: onnx.ModelProto, label: str) -> None:
    version = proto.ir_version
    if version == 0:
        raise OnnxCpError(f"{label}: ir_version is not set (0); not a valid ONNX model")
    if not MIN_IR_VERSION <= version <= onnx.IR_VERSION:
        raise OnnxCpError(
            f"{label}: ir_version {version} is outside what onnxruntime runs "
            f"({MIN_IR_VERSION}..{onnx.IR_VERSION})"
        )
    highest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and not MIN_OPSET <= opset.version <= highest:
            raise OnnxCpError(
                f"{label}: opset {opset.version} of the default ONNX domain is outside what "
                f"onnx-cp supports ({MIN_OPSET}..{highest})"
            )


def _check_strings(message, label: str, where: str = "model") -> None:
    """Every string field (names, op types, domains, ...) is UTF-8: protobuf hands corrupted ones back
    as bytes, which onnx_ir cannot write again (found by benchmarks/fuzz.py). Bytes fields (raw
    data, string attributes) are not walked."""
    for field, value in message.ListFields():
        if field.type == field.TYPE_STRING:
            for item in [value] if isinstance(value, (str, bytes)) else value:
                if not isinstance(item, str):
                    raise OnnxCpError(
                        f"{label}: not a valid ONNX model (field {field.name} of a {where} is not UTF-8 text: "
                        f"{bytes(item)[:40]!r})"
                    )
        elif field.type == field.TYPE_MESSAGE:
            for item in [value] if hasattr(value, "ListFields") else value:
                _check_strings(item, label, field.name)


def _minus_one_as_unknown(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose -1 dimensions are unknown ones, where there are any: older paddle2onnx writes
    -1 for a free dimension (PP-OCR's classifier: [-1, 3, ?, ?]) and onnxruntime runs it so."""
    def dims(p: onnx.ModelProto):
        for value in (*p.graph.input, *p.graph.output, *p.graph.value_info):
            if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
                yield from (d for d in value.type.tensor_type.shape.dim
                            if d.HasField("dim_value") and d.dim_value == -1)

    if next(dims(proto), None) is None:
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for dim in list(dims(copy)):
        dim.ClearField("dim_value")
    return copy


def _check_graph_inputs(graph: onnx.GraphProto, label: str) -> None:
    """Tensor inputs and outputs with no element type, negative dims, or too many elements."""
    initializers = {t.name for t in graph.initializer}
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for value in values:
            if not value.type.HasField("tensor_type"):
                continue
            tensor_type = value.type.tensor_type
            if tensor_type.elem_type == onnx.TensorProto.UNDEFINED:
                raise OnnxCpError(f"{label}: graph {kind} {value.name!r} has no element type")
            if not tensor_type.HasField("shape"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
            shown = [d if d is not None else "?" for d in dims]
            if any(d is not None and d < 0 for d in dims):
                raise OnnxCpError(f"{label}: graph {kind} {value.name!r} has a negative dimension {shown}")
            if kind == "input" and value.name not in initializers:
                elements = math.prod(d or 1 for d in dims)
                if elements > MAX_INPUT_ELEMENTS:
                    raise OnnxCpError(
                        f"{label}: graph input {value.name!r} has shape {shown} ({elements} elements): "
                        f"too large to run (at most {MAX_INPUT_ELEMENTS})"
                    )


def _check_graph_structure(graph: onnx.GraphProto, label: str) -> list[int] | None:
    """Duplicate initializers / inputs / values, dangling node inputs and cycles of the main graph
    (onnx.checker reports the last two as "not topologically sorted", which blames the order).

    Returns None when the nodes are in a valid order, else a topological order of node indices.
    """
    defined: dict[str, str] = {}  # value name -> what defines it
    initializers = set()
    for tensor in graph.initializer:
        if tensor.name in initializers:
            raise OnnxCpError(f"{label}: duplicate initializer name {tensor.name!r}")
        initializers.add(tensor.name)
    for tensor in graph.sparse_initializer:
        name = tensor.values.name
        if name in initializers:
            raise OnnxCpError(f"{label}: duplicate initializer name {name!r}")
        initializers.add(name)
    inputs = set()
    for value in graph.input:
        if value.name in inputs:
            raise OnnxCpError(f"{label}: duplicate graph input name {value.name!r}")
        inputs.add(value.name)
    for name in initializers | inputs:
        defined[name] = "a graph input" if name in inputs else "an initializer"
    names: set[str] = set()
    for node in graph.node:
        if node.name and node.name in names:  # onnxruntime refuses the model ("same node name")
            raise OnnxCpError(f"{label}: two nodes are named {node.name!r}")
        names.add(node.name)
    producer: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if not name:
                continue
            if name in producer:
                raise OnnxCpError(
                    f"{label}: value {name!r} is produced twice (nodes {_node_label(graph.node[producer[name]])} "
                    f"and {_node_label(node)})"
                )
            if name in defined:
                raise OnnxCpError(
                    f"{label}: value {name!r} is produced by node {_node_label(node)} and is also {defined[name]}"
                )
            producer[name] = index
    for node in graph.node:
        for name in node.input:
            if name and name not in defined and name not in producer:
                raise OnnxCpError(
                    f"{label}: input {name!r} of node {_node_label(node)} is produced by no node, "
                    "initializer or graph input"
                )
    for value in graph.output:
        if value.name not in defined and value.name not in producer:
            raise OnnxCpError(f"{label}: graph output {value.name!r} is produced by no node or input")
    # Kahn's algorithm over the main graph's explicit edges.
    consumers: dict[int, list[int]] = {i: [] for i in range(len(graph.node))}
    waiting = []
    for index, node in enumerate(graph.node):
        sources = {producer[n] for n in node.input if n in producer}
        waiting.append(len(sources))
        for source in sources:
            consumers[source].append(index)
    ready = [i for i, n in enumerate(waiting) if n == 0]  # a heap: the file's order where possible
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for consumer in consumers[index]:
            waiting[consumer] -= 1
            if waiting[consumer] == 0:
                heapq.heappush(ready, consumer)
    if len(order) < len(graph.node):
        stuck = next(graph.node[i] for i in range(len(graph.node)) if waiting[i] > 0)
        raise OnnxCpError(f"{label}: the graph has a cycle (through node {_node_label(stuck)})")
    return None if order == list(range(len(graph.node))) else order


def _node_label(node: onnx.NodeProto) -> str:
    return repr(node.name) if node.name else f"{node.op_type} -> {node.output[0] if node.output else '?'}"


def _run_checker(proto: onnx.ModelProto, label: str) -> None:
    """onnx.checker without full_check (cheap: no shape inference), on a copy whose external tensors
    are emptied (given a proto, the checker would look for their files in the working directory;
    load_model checks them against the model's folder)."""
    if proto.ByteSize() > PROTOBUF_SAFE_BYTES:
        return  # the checker cannot serialize it; onnxruntime will still check it
    tensors = [t for t in _all_tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL]
    if tensors:
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        for tensor in _all_tensors(copy):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.dims[:]
                tensor.dims.append(0)
        proto = copy
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001 - ValidationError and, on odd protos, others
        raise OnnxCpError(f"{label}: not a valid ONNX model ({first_line(exc, 200)})") from None


def _tensor_bytes(tensor: onnx.TensorProto) -> int | None:
    """The bytes the tensor's dims and type need (None for strings and unknown types)."""
    count = math.prod(tensor.dims)
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) or tensor.data_type == getattr(
        onnx.TensorProto, "FLOAT4E2M1", -1
    ):
        return (count + 1) // 2
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def _check_tensor_sizes(proto: onnx.ModelProto, label: str, base: Path | None) -> None:
    """Negative dims, and external data whose offset/length point past its file's end or hold
    fewer bytes than the tensor's shape needs (onnx_ir would fail on them much later)."""
    for tensor in _all_tensors(proto):
        if any(d < 0 for d in tensor.dims):
            raise OnnxCpError(f"{label}: tensor {tensor.name!r} has negative dims {list(tensor.dims)}")
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            needed = _tensor_bytes(tensor)
            if tensor.HasField("raw_data") and needed is not None and len(tensor.raw_data) != needed:
                raise OnnxCpError(
                    f"{label}: tensor {tensor.name!r} holds {len(tensor.raw_data)} bytes but its shape "
                    f"{list(tensor.dims)} and type {onnx.TensorProto.DataType.Name(tensor.data_type)} need {needed}"
                )
            continue
        if base is None:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        try:
            offset = int(info.get("offset", "0") or 0)
            length = int(info["length"]) if info.get("length", "") != "" else None
        except ValueError:
            raise OnnxCpError(
                f"{label}: external data of tensor {tensor.name!r}: offset/length are not integers "
                f"({info.get('offset')!r}, {info.get('length')!r})"
            ) from None
        if offset < 0 or (length is not None and length < 0):
            raise OnnxCpError(f"{label}: external data of tensor {tensor.name!r}: negative offset or length")
        size = (base / location).stat().st_size
        available = size - offset if length is None else length
        if offset + (length or 0) > size or available < 0:
            raise OnnxCpError(
                f"{label}: external data of tensor {tensor.name!r}: offset+length beyond the end of {location}"
            )
        needed = _tensor_bytes(tensor)
        if needed is None:  # strings (found by benchmarks/fuzz.py: onnx_ir failed on them)
            type_name = onnx.TensorProto.DataType.Name(tensor.data_type) \
                if tensor.data_type in onnx.TensorProto.DataType.values() else str(tensor.data_type)
            raise OnnxCpError(
                f"{label}: external data of tensor {tensor.name!r}: type {type_name} cannot be stored "
                "as external data"
            )
        if length is not None and length != needed:  # onnxruntime refuses the tensor (found by the fuzzer)
            raise OnnxCpError(
                f"{label}: external data of tensor {tensor.name!r}: length {length} but its shape "
                f"{list(tensor.dims)} needs {needed} bytes"
            )
        if needed > available:
            raise OnnxCpError(
                f"{label}: external data of tensor {tensor.name!r}: its shape {list(tensor.dims)} needs "
                f"{needed} bytes, {location} holds {available} at offset {offset}"
            )


def has_external_data(model: ir.Model) -> bool:
    return any(
        isinstance(value.const_value, ir.ExternalTensor)
        for graph in model.graphs()
        for value in graph.initializers.values()
    )


def initializer_bytes(model: ir.Model) -> int:
    return sum(
        value.const_value.nbytes
        for graph in model.graphs()
        for value in graph.initializers.values()
        if value.const_value is not None
    )


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
) -> list[Path]:
    """Write `model` to `path` atomically; return the files written.

    external_data: True writes initializers to `<name>.data` beside the model, False keeps
    them inline, None decides: external when the model already had external data or is
    too large for a single protobuf.
    """
    path = Path(path)
    folder = check_output_path(path)
    if external_data is None:
        external_data = has_external_data(model) or initializer_bytes(model) > PROTOBUF_SAFE_BYTES
    data_name = path.name + ".data" if external_data else None

    staging = Path(tempfile.mkdtemp(prefix=".onnx-cp-", dir=folder))
    try:
        try:
            ir.save(model, staging / path.name, external_data=data_name)
        except OSError as exc:
            raise OnnxCpError(f"{path}: cannot write ({first_line(exc, 200)})") from None
        written = []
        # Data first: a model file never points at data that is not yet in place.
        if data_name is not None:
            check_replaceable(folder / data_name)
            os.replace(staging / data_name, folder / data_name)
            written.append(folder / data_name)
        check_replaceable(path)
        os.replace(staging / path.name, path)
        written.append(path)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_output_path(path: Path) -> Path:
    """Fail early, before any long work, on an output that cannot be written; return its folder."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxCpError(f"{path}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OnnxCpError(f"{path}: output folder {folder} is not writable")
    check_replaceable(path)
    return folder


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The files a model file keeps its external data in (for checks that no output overwrites them)."""
    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable model is reported when it is loaded
        return []
    locations = {next((e.value for e in t.external_data if e.key == "location"), "")
                 for t in _all_tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL}
    return [path.parent / location for location in sorted(locations) if location]


def _check_external_locations(proto: onnx.ModelProto, base: Path) -> None:
    base = base.resolve()
    for tensor in _all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise OnnxCpError(
                f"external data of tensor {tensor.name!r} points outside the model's folder "
                f"({location!r}); refusing to read it"
            )
        if not target.is_file():
            raise OnnxCpError(f"external data file {location!r} of tensor {tensor.name!r} is missing")


def _all_tensors(proto: onnx.ModelProto):
    def graph_tensors(graph: onnx.GraphProto):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from graph_tensors(attr.g)
                for sub in attr.graphs:
                    yield from graph_tensors(sub)

    yield from graph_tensors(proto.graph)
