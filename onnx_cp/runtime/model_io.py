"""Loading and saving ONNX models safely.

Everything that touches model files goes through here:
- loading refuses what is not a readable ONNX model, and external-data locations that
  point outside the model's folder (a model file must not make the tool read arbitrary files);
- saving is atomic (temporary files in the destination folder, then rename), writes external
  data beside the output when the input had some or the model is too large for one protobuf,
  and never leaves a half-written file behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx_ir import external_data as ir_external_data

from onnx_cp.errors import OnnxCpError, first_line
from onnx_cp.runtime.files import check_replaceable

ModelLike = str | os.PathLike | onnx.ModelProto | ir.Model

# protobuf refuses messages over 2 GiB; stay clear of the limit.
PROTOBUF_SAFE_BYTES = 1_800_000_000


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
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx_ir raises various types on malformed graphs
        raise OnnxCpError(f"{path}: malformed ONNX model ({first_line(exc, 200)})") from None
    ir_external_data.set_base_dir(model.graph, str(path.parent))
    return model


def to_ir(model: ModelLike) -> ir.Model:
    """Accept a path, an onnx.ModelProto or an ir.Model; return an ir.Model (never the caller's)."""
    if isinstance(model, ir.Model):
        return model.clone()  # new graph objects; tensors are shared, never written
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    return load_model(model)


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
