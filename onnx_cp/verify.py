"""Checks a rewritten model before anything is written: onnx.checker, an onnxruntime session,
and the outputs of original and rewritten models on the same random inputs."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnx_cp.errors import OnnxCpError, UsageError, first_line
from onnx_cp.model_io import has_external_data, save_model

DEFAULT_BATCH = 1
DEFAULT_OTHER_DIM = 32


def parse_input_shapes(specs: Iterable[str] | None) -> dict[str, list[int]]:
    """Parse `NAME:1,3,224,224` items (the --input-shape flag)."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        try:
            values = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            values = []
        if not sep or not name or not values or any(v <= 0 for v in values):
            raise UsageError(f"--input-shape {spec!r}: expected NAME:D1,D2,... with positive integers")
        shapes[name] = values
    return shapes


def fill_input_shapes(model: ir.Model, input_shapes: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Concrete shapes for every graph input: given ones win, symbolic dims get defaults."""
    input_shapes = dict(input_shapes or {})
    names = [v.name for v in _real_inputs(model)]
    unknown = set(input_shapes) - set(names)
    if unknown:
        raise UsageError(f"--input-shape names unknown input(s) {sorted(unknown)}; inputs are {names}")
    filled = {}
    for value in _real_inputs(model):
        if value.name in input_shapes:
            filled[value.name] = list(input_shapes[value.name])
            continue
        if value.shape is None:
            raise UsageError(f"input {value.name!r} has no shape: give it with --input-shape {value.name}:D1,D2,...")
        filled[value.name] = [
            dim if isinstance(dim, int) else (DEFAULT_BATCH if axis == 0 else DEFAULT_OTHER_DIM)
            for axis, dim in enumerate(value.shape)
        ]
    return filled


def set_input_shapes(proto: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    """Write concrete shapes into a ModelProto's graph inputs (before shape inference)."""
    for value in proto.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[value.name]:
                dims.add().dim_value = d


def random_inputs(
    model: ir.Model, input_shapes: dict[str, list[int]] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Seeded random feeds for every graph input (normal floats, zeros for integers, False for bools)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape in fill_input_shapes(model, input_shapes).items():
        value = next(v for v in _real_inputs(model) if v.name == name)
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = np.zeros(shape, dtype=dtype)
    return feeds


def _real_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs that are not initializers (old IR versions list weights as inputs)."""
    return [v for v in model.graph.inputs if v.name not in model.graph.initializers]




@contextlib.contextmanager
def serialized(model: ir.Model) -> Iterator[bytes | str]:
    """The model as onnx.checker and onnxruntime take it: bytes, or the path of one staged copy
    on disk when it has external data (protobuf cannot hold it)."""
    if not has_external_data(model):
        yield ir.to_proto(model).SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="onnx-cp-") as folder:
        path = f"{folder}/model.onnx"
        save_model(model, path, external_data=True)
        yield path


@contextlib.contextmanager
def ort_session(model: ir.Model, threads: int = 1) -> Iterator[ort.InferenceSession]:
    """An onnxruntime CPU session for an in-memory model."""
    with serialized(model) as source:
        yield _session(source, threads)


def iter_tensor_values(model: onnx.ModelProto, names: Sequence[str], input_name: str,
                       batches: Iterable[np.ndarray]) -> Iterator[list[np.ndarray]]:
    """The intermediate tensors `names` of a one-input `model`, batch by batch, computed by one
    onnxruntime session (a name may be the input itself)."""
    wanted = [name for name in dict.fromkeys(names) if name != input_name]
    if not wanted:
        for batch in batches:
            yield [batch] * len(names)
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in wanted)
    with ort_session(ir.serde.deserialize_model(probe)) as session:
        for batch in batches:
            values = dict(zip(wanted, session.run(wanted, {input_name: batch})))
            yield [batch if name == input_name else values[name] for name in names]


def tensor_values(model: onnx.ModelProto, names: Sequence[str], input_name: str, inputs: np.ndarray,
                  batch_size: int = 64) -> list[np.ndarray]:
    """The intermediate tensors `names` of a one-input `model` on all of `inputs`."""
    batches = (inputs[start:start + batch_size] for start in range(0, len(inputs), batch_size))
    parts = list(iter_tensor_values(model, names, input_name, batches))
    return [np.concatenate([part[i] for part in parts]) for i in range(len(names))]


def single_input(model: ir.Model, purpose: str) -> str:
    """The name of the model's only real input (initializers listed as inputs do not count)."""
    inputs = [v.name for v in _real_inputs(model)]
    if len(inputs) != 1:
        raise OnnxCpError(f"{purpose} needs a model with one input; this one has {inputs}")
    return inputs[0]


def check_model(model: ir.Model) -> None:
    """onnx.checker with full shape inference (raises onnx.checker.ValidationError and friends)."""
    with serialized(model) as source:
        onnx.checker.check_model(source, full_check=True)


def run_model(model: ir.Model, feeds: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
    with serialized(model) as source:
        return _run(source, feeds, what)


def _session(source: bytes | str, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _run(source: bytes | str, feeds: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
    try:
        return _session(source).run(None, feeds)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise OnnxCpError(f"onnxruntime cannot run the {what}: {first_line(exc)}") from None


def compare_outputs(expected: list[np.ndarray], actual: list[np.ndarray], names: list[str]) -> dict:
    """Max/mean absolute and relative (Frobenius) error per output."""
    outputs = {}
    for name, a, b in zip(names, expected, actual):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a64.shape != b64.shape:
            raise OnnxCpError(f"output {name!r} changed shape from {a64.shape} to {b64.shape}")
        diff = np.abs(a64 - b64)
        scale = np.linalg.norm(a64)
        outputs[name] = {
            "max_abs_error": float(diff.max()) if diff.size else 0.0,
            "mean_abs_error": float(diff.mean()) if diff.size else 0.0,
            "rel_error": float(np.linalg.norm(a64 - b64) / scale) if scale > 0 else float(np.linalg.norm(b64)),
            "finite": bool(np.all(np.isfinite(b64))),
        }
    return outputs


def verify_rewrite(
    original: ir.Model,
    rewritten: ir.Model,
    input_shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
) -> dict:
    """Checker, onnxruntime session and output comparison; raises OnnxCpError on failure."""
    notes = []
    with serialized(rewritten) as source:  # staged once for the checker and the session
        try:
            onnx.checker.check_model(source, full_check=True)
        except Exception as exc:  # noqa: BLE001 - checker failures come in several types
            try:
                check_model(original)
            except Exception:  # noqa: BLE001
                notes.append(f"the input model already fails onnx.checker: {first_line(exc)}")
            else:
                raise OnnxCpError(f"the rewritten model fails onnx.checker: {first_line(exc)}") from None
        feeds = random_inputs(original, input_shapes, seed=seed)
        expected = run_model(original, feeds, "input model")
        actual = _run(source, feeds, "rewritten model")
    outputs = compare_outputs(expected, actual, [v.name for v in original.graph.outputs])
    if not all(o["finite"] for o in outputs.values()):
        raise OnnxCpError("the rewritten model produces NaN or infinity on random inputs")
    return {
        "checker": "passed" if not notes else "input model fails too",
        "notes": notes,
        "input_shapes": {k: list(map(int, v.shape)) for k, v in feeds.items()},
        "outputs": outputs,
        "max_abs_error": max((o["max_abs_error"] for o in outputs.values()), default=0.0),
        "max_rel_error": max((o["rel_error"] for o in outputs.values()), default=0.0),
    }
