"""Quantization-aware fine-tuning's two graph forms: a QDQ INT8 model made trainable, and back.

onnxruntime's QDQ model reads each weight as DequantizeLinear(int8 initializer). The trainable
form reads it as DequantizeLinear(QuantizeLinear(float initializer)): the same function, valid
ONNX, but the float weights can be trained through the interpreter's fake quantization (rounding
with a straight-through gradient). Every scale and zero point stays as calibrated, and so do the
int32 biases, so what is trained is exactly what onnxruntime will run. `quantized()` folds the
trained float weights back into int8 initializers. Knows nothing of torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

_WEIGHT_TYPES = (np.int8, np.uint8)


@dataclass(frozen=True)
class TrainableWeight:
    """One weight of the trainable form: its inserted QuantizeLinear and the integers it replaced."""

    quantize_node: str
    integer_name: str  # the initializer that DequantizeLinear reads again in quantized()
    low: int  # the integer range of the quantized weights (7-bit weights keep 7 bits)
    high: int


def trainable(qdq: ir.Model) -> tuple[ir.Model, tuple[TrainableWeight, ...]]:
    """A copy of `qdq` whose integer weights are float initializers behind a QuantizeLinear with
    the same scale and zero point, and the record that `quantized()` reverses it by."""
    model = qdq.clone()
    graph = model.graph
    weights = []
    for node in list(graph):
        source = node.inputs[0] if node.op_type == "DequantizeLinear" and node.inputs else None
        if source is None or not source.is_initializer() or source.const_value is None:
            continue
        integers = source.const_value.numpy()
        if integers.dtype not in _WEIGHT_TYPES:
            continue  # int32 biases stay as they are
        scale, zero, axis = _quantization(node, integers)
        floats = ir.Value(name=f"{source.name}/trainable",
                          const_value=ir.tensor(((integers - zero) * scale).astype(np.float32)))
        graph.register_initializer(floats)
        fake = ir.node("QuantizeLinear", [floats, *node.inputs[1:]], attributes={"axis": axis},
                       name=f"{node.name}/fake_quant", outputs=[ir.Value(name=f"{source.name}/fake_quant")])
        graph.insert_before(node, fake)
        node.replace_input_with(0, fake.outputs[0])
        low, high = _range(integers)
        weights.append(TrainableWeight(fake.name, source.name, low, high))
    return model, tuple(weights)


def quantized(trained: ir.Model, weights: tuple[TrainableWeight, ...]) -> ir.Model:
    """`trained` (the trainable form, weights trained) with every fake-quantized weight folded back
    into its integer initializer: a QDQ model as onnxruntime's quantizer writes them."""
    model = trained.clone()
    graph = model.graph
    nodes = {node.name: node for node in graph}
    for weight in weights:
        fake = nodes[weight.quantize_node]
        floats = fake.inputs[0]
        integers = graph.initializers[weight.integer_name]
        dtype = integers.const_value.numpy().dtype
        scale, zero, _ = _quantization(fake, floats.const_value.numpy())
        values = np.clip(np.round(floats.const_value.numpy() / scale) + zero, weight.low, weight.high)
        integers.const_value = ir.tensor(values.astype(dtype), name=weight.integer_name)
        ir.convenience.replace_all_uses_with(fake.outputs[0], integers)
        graph.remove(fake, safe=True)
        del graph.initializers[floats.name]
    return model


def _quantization(node: ir.Node, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The scale and zero point of a QuantizeLinear/DequantizeLinear node, shaped to broadcast
    against `values` along its axis, and the axis."""
    axis = node.attributes.get_int("axis", 1)
    scale = node.inputs[1].const_value.numpy().astype(np.float64)
    zero_input = node.inputs[2] if len(node.inputs) > 2 else None
    zero = zero_input.const_value.numpy().astype(np.float64) if zero_input is not None else np.zeros(())
    if scale.ndim == 1:
        shape = [1] * values.ndim
        shape[axis % values.ndim] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape) if zero.ndim == 1 else zero
    return scale, zero, axis


def _range(integers: np.ndarray) -> tuple[int, int]:
    """The integer range the quantizer used. onnxruntime's 7-bit (reduce_range) symmetric weights
    span [-64, 64]: the pair sums of AVX2's VPMADDUBSW stay within int16 up to |q| = 64."""
    info = np.iinfo(integers.dtype)
    if integers.dtype == np.int8 and integers.size and np.abs(integers.astype(np.int16)).max() <= 64:
        return -64, 64
    return int(info.min), int(info.max)
