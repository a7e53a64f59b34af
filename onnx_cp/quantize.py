"""Static INT8 quantization with onnxruntime (QDQ, per-channel weights), calibrated on user data.

INT8 is the rival users already know, and CP composes with it: the four-conv chain quantizes like
any Conv. Activations are unsigned 8-bit and weights signed 8-bit (U8S8), the combination that
onnxruntime's VNNI kernels run fastest on x86.

Three things keep the result close to the float model:
- weights use 7 bits (reduce_range). On x86 CPUs without VNNI (AVX2 only), onnxruntime multiplies
  U8 x S8 pairs with VPMADDUBSW, which saturates the int16 sum of two products: with full 8-bit
  weights whole layers clip and accuracy collapses (measured: a CP model fell from 94% to 15%
  top-1). onnxruntime's own documentation recommends reduce_range on such machines; a quantized
  file may run anywhere, so we always use it rather than guess from the CPU we happen to run on.
- CP chains are equalized first (see equalize_chains): activations are quantized per tensor, and
  the R rank-one channels inside a chain have very different ranges.
- activation ranges are calibrated by percentile, not min/max (see DEFAULT_CALIBRATION_METHOD).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from onnx_cp import chain_names, model_io, verify
from onnx_cp.errors import OnnxCpError, first_line

DEFAULT_CALIBRATION_SAMPLES = 256
# Percentile (99.999%) ranges ignore the rare outliers that MinMax stretches a whole tensor for:
# +1.1 points of top-1 on charnet-cp (10000 test images), no change on charnet.
DEFAULT_CALIBRATION_METHOD = "percentile"
_CALIBRATION_BATCH = 16
SCHEME_METADATA_KEY = "onnx_cp.int8"
_METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}
# A channel whose calibrated range is below this fraction of its tensor's largest is treated as
# dead: scaling it up by more would only amplify rounding noise.
_MIN_RELATIVE_RANGE = 1e-4


@dataclass(frozen=True)
class Int8Scheme:
    """How a model was quantized, for reports; stored as JSON in the model's metadata."""

    activations: str = "uint8"
    weights: str = "int8"
    weight_bits: int = 7
    per_channel: bool = True
    calibration: str = DEFAULT_CALIBRATION_METHOD
    samples: int = DEFAULT_CALIBRATION_SAMPLES
    equalized_layers: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        chains = f", {len(self.equalized_layers)} CP chain(s) equalized" if self.equalized_layers else ""
        granularity = "per-channel" if self.per_channel else "per-tensor"
        signed = "signed" if self.weights == "int8" else "unsigned"
        return (f"U8 activations, {self.weight_bits}-bit {signed} weights ({granularity}), "
                f"{self.calibration} calibration on {self.samples} samples{chains}")


def int8_scheme(model: model_io.ModelLike) -> Int8Scheme | None:
    """The scheme quantize_int8 recorded in `model`, None if it has none."""
    props = model.metadata_props if isinstance(model, ir.Model) else model_io.to_ir(model).metadata_props
    text = props.get(SCHEME_METADATA_KEY)
    if text is None:
        return None
    fields = json.loads(text)
    fields["equalized_layers"] = tuple(fields.get("equalized_layers", ()))
    return Int8Scheme(**fields)


class _Batches(CalibrationDataReader):
    """Feeds the calibration samples, a batch at a time, to onnxruntime's calibrator."""

    def __init__(self, input_name: str, batches: Iterator[np.ndarray]) -> None:
        self.input_name = input_name
        self.batches = batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def quantize_int8(
    model: model_io.ModelLike,
    calibration,
    *,
    samples: int = DEFAULT_CALIBRATION_SAMPLES,
    per_channel: bool = True,
    weights: str = "int8",
    reduce_range: bool = True,
    equalize: bool = True,
    calibration_method: str = DEFAULT_CALIBRATION_METHOD,
) -> ir.Model:
    """A QDQ INT8 copy of `model`, its activation ranges calibrated on `calibration`
    (a dataset path, a Dataset, or an array of inputs) with at most `samples` samples.

    weights: "int8" (U8S8, with 7-bit weights unless reduce_range=False, which is only safe where
    onnxruntime has VNNI kernels) or "uint8" (U8U8: 8-bit weights that never saturate, but no VNNI
    speed-up). equalize: rescale CP chains first (see equalize_chains). calibration_method:
    "percentile", "minmax" or "entropy". The scheme used is recorded in the result's metadata:
    read it with int8_scheme()."""
    _check_options(weights, calibration_method)
    source = model_io.to_ir(model)
    input_name = verify.single_input(source, "INT8 calibration")
    batches = _calibration_source(calibration, samples)
    equalized = equalize_chains(source, batches()) if equalize else []
    scheme = Int8Scheme(weights=weights, weight_bits=7 if weights == "int8" and reduce_range else 8,
                        per_channel=per_channel, calibration=calibration_method, samples=samples,
                        equalized_layers=tuple(equalized))
    quantized = _quantize_static(source, _Batches(input_name, batches()), scheme)
    quantized.metadata_props[SCHEME_METADATA_KEY] = json.dumps(asdict(scheme))
    return quantized


def _check_options(weights: str, calibration_method: str) -> None:
    if weights not in ("int8", "uint8"):
        raise OnnxCpError(f"weights must be 'int8' or 'uint8', not {weights!r}")
    if calibration_method not in _METHODS:
        raise OnnxCpError(f"calibration_method must be one of {', '.join(_METHODS)}, not {calibration_method!r}")


def _quantize_static(source: ir.Model, reader: CalibrationDataReader, scheme: Int8Scheme) -> ir.Model:
    with tempfile.TemporaryDirectory(prefix="onnx-cp-int8-") as folder, _quiet():
        fp32_path, int8_path = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        model_io.save_model(source, fp32_path, external_data=False)
        prepared = _preprocessed(fp32_path, Path(folder) / "prepared.onnx")
        try:
            quantize_static(
                prepared, int8_path, reader, quant_format=QuantFormat.QDQ, per_channel=scheme.per_channel,
                reduce_range=scheme.weight_bits == 7, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8 if scheme.weights == "int8" else QuantType.QUInt8,
                calibrate_method=_METHODS[scheme.calibration],
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises many kinds
            raise OnnxCpError(f"INT8 quantization failed: {first_line(exc)}") from None
        quantized = model_io.load_model(int8_path)
        ir.external_data.load_to_model(quantized)  # the temporary folder goes away
    return quantized


# --- CP chain equalization ---------------------------------------------------------------------
#
# A chain in (1x1, C->R) -> vertical (kx1, group R) -> horizontal (1xk, group R) -> out (1x1, R->N)
# is linear up to out's bias, and channel r of each intermediate tensor depends only on channel r
# of the previous one. Multiplying channel r of a stage's output by s_r and dividing the next
# stage's weights for that channel by s_r leaves the chain's function unchanged. onnxruntime
# quantizes each activation tensor with one scale, so a channel whose range is 100x smaller than
# its neighbours' keeps only a few of the 256 levels; we rescale every channel of the in and
# vertical outputs to the same calibrated magnitude (RMS). Their weights are quantized per output channel,
# so the rescaling costs them nothing. The last intermediate tensor (horizontal's output) is
# equalized too; its compensation lands in the columns of out's weight, which is quantized per
# *output* channel, so small-range columns lose weight precision - but they contribute little.


@dataclass
class _Chain:
    layer: str
    stages: list[ir.Node]  # in, vertical, horizontal, out

    def intermediates(self) -> list[ir.Value]:
        return [node.outputs[0] for node in self.stages[:3]]


def equalize_chains(model: ir.Model, batches: Iterator[np.ndarray]) -> list[str]:
    """Rescale the channels inside each CP chain of `model` (in place) so that every intermediate
    tensor's channels have the same root-mean-square on `batches`. The model computes the same function
    (up to float rounding). Returns the layers equalized."""
    chains = _find_chains(model.graph)
    if not chains:
        return []
    ranges = _channel_ranges(model, [v for c in chains for v in c.intermediates()], batches)
    chains = [c for c in chains if all(v.name in ranges for v in c.intermediates())]  # no batches: none
    for chain in chains:
        _rescale(chain, [ranges[v.name] for v in chain.intermediates()])
    return [c.layer for c in chains]


def _find_chains(graph: ir.Graph) -> list[_Chain]:
    return [_Chain(layer, stages) for layer, stages in chain_names.find_chains(graph).items()
            if len(stages) == 4 and _is_plain_chain(graph, stages)]


def _is_plain_chain(graph: ir.Graph, stages: list[ir.Node]) -> bool:
    """Four float Convs feeding each other, constant weights, depthwise middle stages, no one
    else reading the intermediates: the shape equalization relies on."""
    outputs = set(graph.outputs)
    for node, nxt in zip(stages, stages[1:]):
        value = node.outputs[0]
        if value in outputs or len(value.uses()) != 1 or nxt.inputs[0] is not value:
            return False
    if any(n.op_type != "Conv" or n.domain not in ("", "ai.onnx") for n in stages):
        return False
    weights = [_const(n.inputs[1]) for n in stages]
    if any(w is None or w.dtype != np.float32 or w.ndim != 4 for w in weights):
        return False
    rank = weights[0].shape[0]
    groups = [n.attributes.get_int("group", 1) for n in stages]
    shapes_ok = all(w.shape[:2] == (rank, 1) for w in weights[1:3]) and weights[3].shape[1] == rank
    # out's bias is untouched by the rescaling; a bias on an earlier stage would need scaling too,
    # and no chain onnx-cp builds has one.
    no_inner_bias = all(len(n.inputs) < 3 or n.inputs[2] is None for n in stages[:3])
    unshared = all(len(n.inputs[1].uses()) == 1 for n in stages)
    return groups == [1, rank, rank, 1] and shapes_ok and no_inner_bias and unshared


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _channel_ranges(model: ir.Model, values: list[ir.Value], batches: Iterator[np.ndarray]) -> dict[str, np.ndarray]:
    """The root-mean-square per channel (axis 1) of each of `values` over the calibration batches.

    RMS rather than max |value|: a few outliers in one channel would otherwise shrink that whole
    channel (measured on charnet-cp: max-based equalization gained 1.2 points of top-1 over none,
    RMS-based 2.3, with percentile calibration; the 99th percentile did no better than RMS)."""
    input_name = verify.single_input(model, "INT8 calibration")
    names = [v.name for v in values]
    squares: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for outputs in verify.iter_tensor_values(ir.to_proto(model), names, input_name, batches):
        for value, out in zip(values, outputs):
            axes = tuple(i for i in range(out.ndim) if i != 1)
            squares[value.name] = squares.get(value.name, 0.0) + np.square(out, dtype=np.float64).sum(axis=axes)
            counts[value.name] = counts.get(value.name, 0) + out.size // out.shape[1]
    return {name: np.sqrt(total / max(counts[name], 1)) for name, total in squares.items()}


def _rescale(chain: _Chain, ranges: list[np.ndarray]) -> None:
    """Scale channel r of each intermediate tensor so that its RMS becomes the tensor's
    largest, compensating in the next stage's weights (and finally in out's input columns)."""
    applied = np.ones(ranges[0].shape, np.float64)  # the scale channel r carries so far
    for node, channel_range in zip(chain.stages[:3], ranges):
        top = float(channel_range.max())
        if top <= 0.0:  # a dead chain: nothing to equalize
            return
        wanted = top / np.maximum(channel_range.astype(np.float64) * applied, top * _MIN_RELATIVE_RANGE)
        _scale_weight(node.inputs[1], wanted, axis=0)
        applied *= wanted
    _scale_weight(chain.stages[3].inputs[1], 1.0 / applied, axis=1)


def _scale_weight(weight: ir.Value, factors: np.ndarray, axis: int) -> None:
    """Multiply `weight` by `factors` along `axis`, as a new tensor (the old one may be shared
    with the caller's model, see model_io.to_ir)."""
    array = weight.const_value.numpy()
    shape = [1] * array.ndim
    shape[axis] = -1
    scaled = (array.astype(np.float64) * factors.reshape(shape)).astype(array.dtype)
    weight.const_value = ir.tensor(scaled, name=weight.name)


# --- helpers -------------------------------------------------------------------------------------


def _preprocessed(path: Path, out: Path) -> Path:
    """onnxruntime's recommended pre-processing (shape inference, Conv+BatchNorm folding);
    the model as it is when that fails (some exporters' shapes defeat symbolic inference)."""
    try:
        quant_pre_process(path, out, skip_symbolic_shape=True)
        return out
    except Exception:  # noqa: BLE001
        return path


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizer logs advice to the root logger at WARNING, and its histogram
    calibrators print progress to stdout: keep the user's terminal clean."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _calibration_source(calibration, samples: int) -> Callable[[], Iterator[np.ndarray]]:
    """A function giving a fresh iterator over the calibration batches: equalization and
    onnxruntime's calibrator each read them once."""
    from onnx_cp.data import first_inputs

    data = first_inputs(calibration, samples)
    return lambda: iter([data[i:i + _CALIBRATION_BATCH] for i in range(0, len(data), _CALIBRATION_BATCH)])
