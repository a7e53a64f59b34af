"""onnx-cp: faster CNNs on CPUs through fine-tuned CP decomposition of ONNX Conv layers."""

from __future__ import annotations

__version__ = "0.1.0"

from onnx_cp.api import OptimizeResult, optimize  # noqa: E402

__all__ = ["OptimizeResult", "optimize", "__version__"]
