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
- CP chains are equalized first (see quantize.equalize): activations are quantized per tensor, and
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

from onnx_cp.errors import OnnxCpError, UsageError, first_line
from onnx_cp.quantize.equalize import equalize_chains
from onnx_cp.runtime import model_io
from onnx_cp.runtime.tensors import single_input

DEFAULT_CALIBRATION_SAMPLES = 256
# Percentile (99.999%) ranges ignore the rare outliers that MinMax stretches a whole tensor for:
# +1.1 points of top-1 on charnet-cp (10000 test images), no change on charnet.
DEFAULT_CALIBRATION_METHOD = "percentile"
_CALIBRATION_BATCH = 16
SCHEME_METADATA_KEY = "onnx_cp.int8"
_METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}


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
    input_name = single_input(source, "INT8 calibration")
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
        raise UsageError(f"expected 'int8' or 'uint8', got {weights!r}", option="weights")
    if calibration_method not in _METHODS:
        raise UsageError(f"expected one of {', '.join(_METHODS)}, got {calibration_method!r}",
                         option="calibration_method")


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
