"""Layer-output error: how far a low-rank approximation (of any form) moves a layer's outputs on sample inputs.

Kernel error is a proxy. With sample inputs the error that matters is the layer's output error on
the activations it really sees, ||conv(X, K - K_cp)|| / ||conv(X, K) + b||, and that is often far
smaller: trained layers see inputs that span few directions. A Conv is linear in its kernel, so
one onnxruntime Conv of the kernel difference gives the numerator exactly, with the layer's own
strides, pads, dilations and groups.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnx_cp.graph import ConvSite, lstm
from onnx_cp.graph.sites import conv_bias
from onnx_cp.lowrank.forms import reconstruct
from onnx_cp.ranks.latency_model import LayerShape, single_conv_model
from onnx_cp.runtime.inputs import fixed_batch, model_batches
from onnx_cp.runtime.tensors import iter_tensor_values, single_input, tensor_values

DEFAULT_SAMPLES = 256
# The activations feeding every eligible layer are held in memory: fewer samples for big maps.
MEMORY_BYTES = 1 << 30
MIN_SAMPLES = 8


class OutputError:
    """error(site, per-group solver results) -> the layer's relative output error on the samples.

    The original model runs once on the samples to collect each eligible layer's input."""

    def __init__(self, model: ir.Model, sites: Sequence[ConvSite], inputs: np.ndarray) -> None:
        input_name = single_input(model, "layer-output errors")
        proto = ir.to_proto(model)
        eligible = [s for s in sites if s.eligible]
        convs = [s for s in eligible if not s.is_matrix]
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        step = fixed_batch(model, input_name) or 1
        one = tensor_values(proto, [s.node.inputs[0].name for s in convs], input_name, inputs[:step]) if convs else []
        n = int(np.clip(step * MEMORY_BYTES // max(sum(v.nbytes for v in one), 1), MIN_SAMPLES, len(inputs)))
        self.samples = min(n, len(inputs))  # a conv's; a matrix layer's are all of `inputs`
        self._all_samples = len(inputs)
        self.activations, self._rows = _collect(proto, eligible, input_name, inputs, self.samples)
        self._grams: dict[str, list[np.ndarray]] = {}
        self.output_norms = {s.name: self._output_norm(s) for s in eligible}

    def samples_for(self, site: ConvSite) -> int:
        """How many samples the layer's errors are measured on."""
        return self._all_samples if site.is_matrix else self.samples

    def __call__(self, site: ConvSite, group_results: Sequence[object]) -> float:
        approx = np.concatenate([reconstruct(r) for r in group_results])
        delta = site.kernel.astype(np.float64) - approx
        norm = self.output_norms[site.name]
        if site.is_matrix:  # ||D X|| from the Gram matrix: a CRNN's classifier reads 4896 rows of 1024
            (gram,) = self.grams(site)
            matrix = delta.reshape(delta.shape[0], -1)
            moved = math.sqrt(max(float(np.sum((matrix @ gram) * matrix)), 0.0))
        else:
            moved = float(np.linalg.norm(self._conv(site, delta)))
        return moved / norm if norm > 0 else 0.0

    def grams(self, site: ConvSite) -> list[np.ndarray] | None:
        """Each group's Gram matrix X X^T of the layer's input vectors on the samples, where the layer
        is a matrix product (a 1x1 Conv or a Gemm), for data-aware channel SVD; else None. Every
        input position counts (a strided 1x1 Conv reads a subset of them, alike in distribution).
        Computed once per layer."""
        if site.name not in self._grams:
            self._grams[site.name] = self._compute_grams(site)
        return self._grams[site.name]

    def _compute_grams(self, site: ConvSite) -> list[np.ndarray] | None:
        if site.is_lstm:
            return [lstm.within_directions(self._rows[site.name].gram, site.blocks)]
        if site.is_matrix:
            return [self._rows[site.name].gram]
        x = self.activations[site.name]
        if site.kernel.shape[2:] != (1, 1):
            return None
        per_group = site.kernel.shape[1]
        grams = []
        for g in range(site.group):
            channels = x[:, g * per_group:(g + 1) * per_group]
            rows = np.moveaxis(channels, 1, -1).reshape(-1, per_group).astype(np.float64)
            grams.append(rows.T @ rows)
        return grams

    def _output_norm(self, site: ConvSite) -> float:
        """||K x + b||: for an LSTM, of its recurrence's share of the gates (the input projection
        and the bias, left exact, do not count)."""
        bias = conv_bias(site)
        if site.is_matrix:  # from the rows' statistics: tr(K G K^T) + 2 b.(K sum x) + n b.b
            rows = self._rows[site.name]
            k = site.kernel.astype(np.float64).reshape(site.kernel.shape[0], -1)
            energy = float(np.sum((k @ rows.gram) * k))
            if bias is not None:
                b = bias.astype(np.float64)
                energy += 2 * float(b @ (k @ rows.total)) + rows.count * float(b @ b)
            return math.sqrt(max(energy, 0.0))
        output = self._conv(site, site.kernel)
        if bias is not None:
            output += bias.reshape(1, -1, *([1] * (output.ndim - 2)))
        return float(np.linalg.norm(output))

    def _conv(self, site: ConvSite, kernel: np.ndarray) -> np.ndarray:
        x = self.activations[site.name]
        shape = dataclasses.replace(LayerShape.of(site), input_hw=tuple(x.shape[2:]))
        model = single_conv_model(shape, kernel=kernel, batch="N")
        (output,) = tensor_values(model, ["y"], "x", x)
        return output.astype(np.float64)


@dataclasses.dataclass
class _RowStatistics:
    """A matrix layer's input rows over the samples: X^T X, the sum of the rows, their count."""

    gram: np.ndarray
    total: np.ndarray
    count: int


def _collect(proto, sites: Sequence[ConvSite], input_name: str, inputs: np.ndarray, conv_samples: int
             ) -> tuple[dict[str, np.ndarray], dict[str, _RowStatistics]]:
    """One pass of the model over `inputs`: each conv's input on the first `conv_samples` (held
    in memory), and each matrix layer's row statistics over all of them, batch by batch (what its
    weight multiplies: a Gemm's input rows, an LSTM's previous joint states)."""
    feeds = [(s.node.outputs[0] if s.is_lstm else s.node.inputs[0]).name for s in sites]
    convert = [_lstm_states(s) if s.is_lstm else None for s in sites]
    held: dict[str, list[np.ndarray]] = {s.name: [] for s in sites if not s.is_matrix}
    stats = {s.name: _RowStatistics(0.0, 0.0, 0) for s in sites if s.is_matrix}
    batches = model_batches(ir.serde.deserialize_model(proto), input_name, inputs, 64)
    seen = 0
    for batch, part in zip(batches, iter_tensor_values(proto, feeds, input_name, batches)):
        for site, value, rows_of in zip(sites, part, convert):
            if not site.is_matrix:
                if seen < conv_samples:
                    held[site.name].append(value)
                continue
            value = rows_of(value) if rows_of else value
            rows = value.reshape(-1, value.shape[-1]).astype(np.float64)
            current = stats[site.name]
            stats[site.name] = _RowStatistics(current.gram + rows.T @ rows, current.total + rows.sum(0),
                                              current.count + len(rows))
        seen += len(batch)
    activations = {name: np.concatenate(parts)[:conv_samples].astype(np.float32) for name, parts in held.items()}
    return activations, stats


def _lstm_states(site: ConvSite):
    reverse = [d == "reverse" for d in lstm.directions(site.node)]
    return lambda y: lstm.joint_previous_states(y, reverse)
