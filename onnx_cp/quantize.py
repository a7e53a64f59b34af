"""Static INT8 quantization with onnxruntime (QDQ, per-channel weights), calibrated on user data.

INT8 is the rival users already know, and CP composes with it: the four-conv chain quantizes like
any Conv. Activations are unsigned 8-bit and weights signed 8-bit (U8S8), the combination that
onnxruntime's VNNI kernels run fastest on x86.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from onnx_cp import model_io
from onnx_cp.errors import OnnxCpError, first_line

DEFAULT_CALIBRATION_SAMPLES = 256
_CALIBRATION_BATCH = 16


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
) -> ir.Model:
    """A QDQ INT8 copy of `model`, its activation ranges calibrated on `calibration`
    (a dataset path, a Dataset, or an array of inputs) with at most `samples` samples."""
    source = model_io.to_ir(model)
    inputs = [v for v in source.graph.inputs if v.name not in source.graph.initializers]
    if len(inputs) != 1:
        raise OnnxCpError(f"INT8 calibration needs a model with one input, this one has {len(inputs)}")
    batches = _calibration_batches(calibration, samples)
    with tempfile.TemporaryDirectory(prefix="onnx-cp-int8-") as folder, _root_logger_quiet():
        fp32_path, int8_path = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        model_io.save_model(source, fp32_path, external_data=False)
        prepared = _preprocessed(fp32_path, Path(folder) / "prepared.onnx")
        try:
            quantize_static(
                prepared, int8_path, _Batches(inputs[0].name, batches),
                quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
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
def _root_logger_quiet():
    """onnxruntime's quantizer logs advice to the root logger at WARNING: keep stderr clean."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _calibration_batches(calibration, samples: int) -> Iterator[np.ndarray]:
    if isinstance(calibration, np.ndarray):
        data = calibration[:samples].astype(np.float32)
        return iter([data[i:i + _CALIBRATION_BATCH] for i in range(0, len(data), _CALIBRATION_BATCH)])
    from onnx_cp.data import open_dataset

    dataset = open_dataset(calibration) if isinstance(calibration, (str, Path)) else calibration

    def batches() -> Iterator[np.ndarray]:
        seen = 0
        for x, _ in dataset.batches(_CALIBRATION_BATCH):
            if seen >= samples:
                return
            yield x[: samples - seen]
            seen += len(x)

    return batches()
