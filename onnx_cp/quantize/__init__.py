"""INT8 static quantization with onnxruntime (QDQ), with CP chain equalization, calibration, a float
head, weight bits for the target CPU and a fidelity check.

The names load on first use: settings import quantize.target without onnxruntime's quantizer."""

from __future__ import annotations

import importlib

_EXPORTS = {"Int8Scheme": "int8", "int8_scheme": "int8", "quantize_int8": "int8", "quantize_for_timing": "int8",
            "equalize_chains": "equalize",
            "Int8Check": "check", "weight_precision": "target", "WeightPrecision": "target"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'onnx_cp.quantize' has no attribute {name!r}")
    return getattr(importlib.import_module(f"onnx_cp.quantize.{_EXPORTS[name]}"), name)
