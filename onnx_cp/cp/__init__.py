"""CP decomposition of convolution kernels (knows nothing about ONNX).

    decompose(kernel, rank, method="nls") -> CPResult    # one (T, S, kh, kw) kernel
    decompose_many([(kernel, rank), ...]) -> [CPResult]  # worker processes + progress bar
    reconstruct(factors) -> (T, S, kh, kw) array
    relative_error(kernel, approx) -> ||K - K_hat|| / ||K||
"""

from __future__ import annotations

from onnx_cp.cp.decompose import METHODS, decompose
from onnx_cp.cp.ops import pooled_relative_error, reconstruct, relative_error
from onnx_cp.cp.parallel import decompose_many
from onnx_cp.cp.result import CPResult, balance, component_norms

__all__ = ["METHODS", "CPResult", "balance", "component_norms", "decompose", "decompose_many", "pooled_relative_error",
           "reconstruct", "relative_error"]
