"""onnxruntime sessions: the one place that turns a path / ModelProto / ir.Model into a CPU session with
stated threading and graph-optimisation settings, and turns onnxruntime's errors into one line."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnx_cp.errors import OnnxCpError, UsageError, first_line
from onnx_cp.runtime.model_io import ModelLike, has_external_data, load_model, save_model, to_ir

OPTIMIZATION_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
PROVIDERS = ["CPUExecutionProvider"]


@dataclass
class LoadedModel:
    """A model ready for onnxruntime: the IR (for inputs and names) and what to hand to ORT."""

    ir_model: ir.Model
    source: str | bytes  # a path when the model has external data, else serialized bytes
    path: str | None  # the file it came from, if any
    label: str  # short name for tables and plots


def load(model: ModelLike, label: str | None = None) -> LoadedModel:
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        ir_model = load_model(path)
        # ORT resolves external data relative to the file, so give it the path in that case.
        source = str(path) if has_external_data(ir_model) else path.read_bytes()
        return LoadedModel(ir_model, source, str(path), label or path.stem)
    ir_model = to_ir(model)
    if has_external_data(ir_model):
        ir.external_data.load_to_model(ir_model)
    proto = ir.to_proto(ir_model) if isinstance(model, ir.Model) else model
    assert isinstance(proto, onnx.ModelProto)
    return LoadedModel(ir_model, proto.SerializeToString(), None, label or "model")


def resolve_threads(threads: int | str | None) -> int:
    """1 by default; 0 or "all" means every core this process may use."""
    if threads is None:
        return 1
    if isinstance(threads, str):
        if threads.strip().lower() in ("all", "0"):
            return usable_cores()
        try:
            threads = int(threads)
        except ValueError:
            raise UsageError(f"expected a positive integer or 'all', got {threads!r}", option="threads") from None
    if threads == 0:
        return usable_cores()
    if threads < 0:
        raise UsageError(f"expected a positive integer or 'all', got {threads}", option="threads")
    check_thread_count(threads)
    return threads


def check_thread_count(threads: int) -> None:
    """onnxruntime starts every thread it is asked for: 100000 of them hang the machine."""
    limit = max_threads()
    if threads > limit:
        raise UsageError(f"{threads} threads on a {os.cpu_count()}-core machine; at most {limit}", option="threads")


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS tells it, else the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def max_threads() -> int:
    return 8 * (os.cpu_count() or 1)


def session_options(
    *, threads: int | None = 1, optimization: str = "all", profile_prefix: str | None = None
) -> ort.SessionOptions:
    if optimization not in OPTIMIZATION_LEVELS:
        raise UsageError(
            f"optimization {optimization!r}: expected one of {', '.join(OPTIMIZATION_LEVELS)}"
        )
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        if threads > 1:
            # Spinning workers of one session would steal cores from the next, interleaved one.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    # FATAL only: warnings about unused initializers are noise, and an error is raised anyway (and
    # reported as one line) after onnxruntime has logged it in colour on stderr.
    options.log_severity_level = 4
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def create_session(source: bytes | str, options: ort.SessionOptions | None = None, *,
                   what: str = "model") -> ort.InferenceSession:
    """A CPU session for serialized bytes or a path; `what` names the model in the error line."""
    try:
        return ort.InferenceSession(source, options or session_options(), providers=PROVIDERS)
    except Exception as exc:  # noqa: BLE001 - ORT raises several private exception types
        raise OnnxCpError(f"{what}: onnxruntime cannot load the model ({first_line(exc)})") from None


def make_session(loaded: LoadedModel, options: ort.SessionOptions) -> ort.InferenceSession:
    return create_session(loaded.source, options, what=loaded.path or loaded.label)


def run(session: ort.InferenceSession, feeds: dict, what: str) -> list:
    try:
        return session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - ORT raises several private exception types
        raise OnnxCpError(f"{what}: onnxruntime failed to run the model ({first_line(exc)})") from None


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
        yield create_session(source, session_options(threads=threads))


def run_source(source: bytes | str, feeds: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
    """Run serialized bytes or a path once on `feeds`; any onnxruntime failure is one line."""
    try:
        return ort.InferenceSession(source, session_options(), providers=PROVIDERS).run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise OnnxCpError(f"onnxruntime cannot run the {what}: {first_line(exc)}") from None


def run_model(model: ir.Model, feeds: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
    with serialized(model) as source:
        return run_source(source, feeds, what)
