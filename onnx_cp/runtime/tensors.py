"""Intermediate tensors of a model, computed by onnxruntime (layer inputs for errors, reconstruction
and calibration)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnx_cp.errors import OnnxCpError
from onnx_cp.runtime.inputs import model_batches, real_inputs
from onnx_cp.runtime.session import ort_session, usable_cores


def iter_tensor_values(model: onnx.ModelProto, names: Sequence[str], input_name: str,
                       batches: Iterable[np.ndarray], threads: int | None = None) -> Iterator[list[np.ndarray]]:
    """The intermediate tensors `names` of a one-input `model`, batch by batch, computed by one
    onnxruntime session of `threads` threads (default: every usable core; values, not timings, so
    the thread count only changes how fast they come; a name may be the input itself)."""
    wanted = [name for name in dict.fromkeys(names) if name != input_name]
    if not wanted:
        for batch in batches:
            yield [batch] * len(names)
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in wanted)
    with ort_session(ir.serde.deserialize_model(probe), threads=threads or usable_cores()) as session:
        for batch in batches:
            values = dict(zip(wanted, session.run(wanted, {input_name: batch})))
            yield [batch if name == input_name else values[name] for name in names]


def tensor_values(model: onnx.ModelProto, names: Sequence[str], input_name: str, inputs: np.ndarray,
                  batch_size: int = 64) -> list[np.ndarray]:
    """The intermediate tensors `names` of a one-input `model` on all of `inputs`, in batches of
    `batch_size` or of the model's fixed batch size (a CRNN exported for exactly 1 line; see
    inputs.model_batches)."""
    batches = model_batches(ir.serde.deserialize_model(model), input_name, inputs, batch_size)
    parts = list(iter_tensor_values(model, names, input_name, batches))
    return [np.concatenate([part[i] for part in parts]) for i in range(len(names))]


def single_input(model: ir.Model, purpose: str) -> str:
    """The name of the model's only real input (initializers listed as inputs do not count)."""
    inputs = [v.name for v in real_inputs(model)]
    if len(inputs) != 1:
        raise OnnxCpError(f"{purpose} needs a model with one input; this one has {inputs}")
    return inputs[0]
