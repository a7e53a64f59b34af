"""Put trained weights back into the original ONNX graph, then prove the result computes what the
trained torch module computes.

Only tensor values change: every initializer (or Constant-node value) named in `state` gets the
trained numbers in its original dtype; nodes, names, opsets and metadata stay exactly as they were.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import numpy_helper

from onnx_cp.errors import OnnxCpError
from onnx_cp.runtime import model_io
from onnx_cp.runtime.inputs import random_inputs
from onnx_cp.runtime.session import run_model

RTOL = 1e-4
# A QDQ model rounds every activation: where float noise (1e-6) meets a rounding boundary one step
# flips, and the flips add up layer by layer (NudeNet's YOLOv8n on random inputs: 2.9% of the largest
# output, 23% once CP chains feed the rounding, with or without onnxruntime's integer kernels). So a
# QDQ model is checked by the relative L2 norm of the difference: a wrong write-back moves it by O(1).
QDQ_RTOL = 0.1


def write_back(
    model: model_io.ModelLike,
    state: Mapping[str, np.ndarray],
    *,
    check: bool = True,
    input_shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
    feeds: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A copy of `model` whose tensors named in `state` hold the given values.

    check: run the written model in onnxruntime and the interpreter on the same inputs (`feeds`,
    else random ones of `input_shapes`, defaults as onnx_cp.runtime.inputs) and raise OnnxCpError
    when any output differs by more than 1e-4 relative to the output's largest magnitude.
    """
    # Edit the protobuf itself rather than an IR round trip: every field we do not know about
    # (value_info, doc strings, metadata) stays byte for byte.
    written = proto_copy(model)
    initializers = {t.name: t for t in written.graph.initializer}
    constants = {n.output[0]: n for n in written.graph.node
                 if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output}
    for name, array in state.items():
        array = np.asarray(array)
        if name in initializers:
            _replace_tensor(initializers[name], array, name)
        elif name in constants:
            _replace_constant(constants[name], array, name)
        else:
            raise OnnxCpError(f"trained tensor {name!r} is neither an initializer nor a Constant "
                              "of the model")
    if check:
        quantized = any(n.op_type == "QuantizeLinear" for n in written.graph.node)
        check_parity(ir.serde.deserialize_model(written), input_shapes=input_shapes, seed=seed,
                     rtol=QDQ_RTOL if quantized else RTOL, norm="l2" if quantized else "max", feeds=feeds)
    return written


def proto_copy(model: model_io.ModelLike) -> onnx.ModelProto:
    """A ModelProto copy with all tensor data in memory."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    if not isinstance(model, ir.Model):
        model_io.load_model(model)  # the checks: a readable model, external data in its folder
        return onnx.load(str(model), load_external_data=True)
    model = model.clone()
    ir.external_data.load_to_model(model)
    return ir.to_proto(model)


def _replace_tensor(tensor: onnx.TensorProto, array: np.ndarray, name: str) -> None:
    shape = tuple(tensor.dims)
    if tuple(array.shape) != shape:
        raise OnnxCpError(f"trained tensor {name!r} has shape {tuple(array.shape)}; the model's "
                          f"has {shape}")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    new = numpy_helper.from_array(np.ascontiguousarray(array.astype(dtype, copy=False)),
                                  tensor.name)
    tensor.ClearField("float_data")
    tensor.ClearField("int32_data")
    tensor.ClearField("double_data")
    tensor.ClearField("external_data")
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = new.raw_data


def _replace_constant(node: onnx.NodeProto, array: np.ndarray, name: str) -> None:
    for attr in node.attribute:
        if attr.name == "value":
            _replace_tensor(attr.t, array, name)
            return
        if attr.name == "value_floats":  # keep the attribute kind the exporter chose
            if array.size != len(attr.floats):
                raise OnnxCpError(f"trained tensor {name!r} changed length")
            del attr.floats[:]
            attr.floats.extend(float(v) for v in np.asarray(array, np.float32).reshape(-1))
            return
    raise OnnxCpError(f"Constant {name!r} holds no float tensor to write back")


def check_parity(
    model: ir.Model,
    *,
    input_shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
    rtol: float = RTOL,
    norm: str = "max",
    feeds: dict[str, np.ndarray] | None = None,
) -> float:
    """Largest relative output difference between onnxruntime and the interpreter ("max": the
    largest absolute difference over the largest magnitude; "l2": the norms of the difference and
    of the output) on `feeds`, else on random inputs; raises OnnxCpError above `rtol` or when either
    produces non-finite numbers. Real samples where there are some: on random inputs PP-OCRv4's
    text map is a saturated Sigmoid (at most 1e-4), whose tails onnxruntime approximates, and a
    trained model read 0.58 apart there while agreeing to 1e-6 on pages."""
    from onnx_cp.finetune.interpreter import to_torch

    feeds = feeds if feeds is not None else random_inputs(model, input_shapes, seed=seed)
    expected = run_model(model, feeds, "fine-tuned model")
    module = to_torch(model).eval()
    with torch.no_grad():
        got = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    got = got if isinstance(got, tuple) else (got,)
    worst = 0.0
    for name, e, g in zip([v.name for v in model.graph.outputs], expected, got):
        e64, g64 = np.asarray(e, np.float64), g.detach().cpu().numpy().astype(np.float64)
        if not (np.all(np.isfinite(e64)) and np.all(np.isfinite(g64))):
            raise OnnxCpError(f"the fine-tuned model outputs NaN or infinity ({name!r})")
        if e64.shape != g64.shape:
            raise OnnxCpError(f"output {name!r}: onnxruntime gives shape {e64.shape}, "
                              f"the torch module {g64.shape}")
        if norm == "l2":
            error = float(np.linalg.norm(e64 - g64)) / max(float(np.linalg.norm(e64)), 1e-12)
        else:
            scale = max(float(np.abs(e64).max()), 1e-12) if e64.size else 1.0
            error = float(np.abs(e64 - g64).max()) / scale if e64.size else 0.0
        worst = max(worst, error)
        if error > rtol:
            raise OnnxCpError(f"write-back check failed: output {name!r} of onnxruntime and of "
                              f"the trained torch module differ by {error:.2e} relative "
                              f"(limit {rtol:g})")
    return worst
