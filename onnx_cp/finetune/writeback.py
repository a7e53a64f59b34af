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

from onnx_cp import model_io, verify
from onnx_cp.errors import OnnxCpError

RTOL = 1e-4


def write_back(
    model: model_io.ModelLike,
    state: Mapping[str, np.ndarray],
    *,
    check: bool = True,
    input_shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """A copy of `model` whose tensors named in `state` hold the given values.

    check: run the written model in onnxruntime and the interpreter on the same random inputs
    (shapes from `input_shapes`, defaults as onnx_cp.verify) and raise OnnxCpError when any
    output differs by more than 1e-4 relative to the output's largest magnitude.
    """
    written = _replaced(model, state)
    if check:
        check_parity(written, input_shapes=input_shapes, seed=seed)
    return ir.to_proto(written)


def _replaced(model: model_io.ModelLike, state: Mapping[str, np.ndarray]) -> ir.Model:
    target = model_io.to_ir(model)
    if target is model:
        target = model.clone()  # never modify the caller's model
    if model_io.initializer_bytes(target) < model_io.PROTOBUF_SAFE_BYTES:
        ir.external_data.load_to_model(target)
    graph = target.graph
    constants = {node.outputs[0].name: node for node in graph if node.op_type == "Constant"
                 and node.domain in ("", "ai.onnx")}
    for name, array in state.items():
        array = np.asarray(array)
        if name in graph.initializers and graph.initializers[name].const_value is not None:
            value = graph.initializers[name]
            value.const_value = _tensor_like(value.const_value, array, name)
        elif name in constants:
            _replace_constant(constants[name], array, name)
        else:
            raise OnnxCpError(f"trained tensor {name!r} is neither an initializer nor a Constant "
                              "of the model")
    return target


def _tensor_like(old: ir.TensorProtocol, array: np.ndarray, name: str) -> ir.Tensor:
    dtype = old.dtype.numpy()
    shape = tuple(int(d) for d in old.shape)
    if tuple(array.shape) != shape:
        raise OnnxCpError(f"trained tensor {name!r} has shape {tuple(array.shape)}; the model's "
                          f"has {shape}")
    return ir.tensor(np.ascontiguousarray(array.astype(dtype, copy=False)), name=old.name or name)


def _replace_constant(node: ir.Node, array: np.ndarray, name: str) -> None:
    attrs = node.attributes
    if "value" in attrs:
        tensor = _tensor_like(attrs["value"].value, array, name)
        attrs["value"] = ir.Attr("value", ir.AttributeType.TENSOR, tensor)
    elif "value_floats" in attrs:  # keep the attribute kind the exporter chose
        floats = [float(v) for v in np.asarray(array, np.float32).reshape(-1)]
        if len(floats) != len(attrs["value_floats"].value):
            raise OnnxCpError(f"trained tensor {name!r} changed length")
        attrs["value_floats"] = ir.Attr("value_floats", ir.AttributeType.FLOATS, floats)
    else:
        raise OnnxCpError(f"Constant {name!r} holds no float tensor to write back")


def check_parity(
    model: ir.Model,
    *,
    input_shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
    rtol: float = RTOL,
) -> float:
    """Largest relative output difference between onnxruntime and the interpreter; raises
    OnnxCpError above `rtol` or when either produces non-finite numbers."""
    from onnx_cp.finetune.interpreter import to_torch

    feeds = verify.random_inputs(model, input_shapes, seed=seed)
    expected = verify.run_model(model, feeds, "fine-tuned model")
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
        scale = max(float(np.abs(e64).max()), 1e-12) if e64.size else 1.0
        error = float(np.abs(e64 - g64).max()) / scale if e64.size else 0.0
        worst = max(worst, error)
        if error > rtol:
            raise OnnxCpError(f"write-back check failed: output {name!r} of onnxruntime and of "
                              f"the trained torch module differ by {error:.2e} relative "
                              f"(limit {rtol:g})")
    return worst
