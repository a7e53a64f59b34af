"""onnx-cp: faster CNNs on CPUs through fine-tuned CP decomposition of ONNX Conv layers."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["OptimizeResult", "optimize", "__version__"]


def __getattr__(name: str):
    # Lazy: solver worker processes import onnx_cp.cp, and should not pay for onnx_ir and the API.
    if name in ("optimize", "OptimizeResult"):
        from onnx_cp import api

        return getattr(api, name)
    raise AttributeError(f"module 'onnx_cp' has no attribute {name!r}")
