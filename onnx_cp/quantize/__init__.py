"""INT8 static quantization with onnxruntime (QDQ), with CP chain equalization and calibration."""

from onnx_cp.quantize.int8 import Int8Scheme, equalize_chains, int8_scheme, quantize_int8

__all__ = ["Int8Scheme", "equalize_chains", "int8_scheme", "quantize_int8"]
