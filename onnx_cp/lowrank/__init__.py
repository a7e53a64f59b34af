"""Low-rank forms of convolution kernels besides CP (knows nothing about ONNX).

    tucker2(kernel, (r_in, r_out)) -> Tucker2Result   # HOOI from an HOSVD start (Kim et al. 2016)
    channel_svd(kernel, rank) -> SVDResult            # (T, S*kh*kw) matrix: kh x kw conv, then 1x1
    spatial_svd(kernel, rank) -> SVDResult            # (S*kh, T*kw) matrix: kh x 1 conv, then 1 x kw
    FORMS[form].solve(kernel, rank) / .reconstruct(factors)

Kernels are (T, S, kh, kw) float64 arrays (one group); factors are plain numpy arrays whose layout
each form documents, so that a graph pass can splice them without knowing how they were found.
"""

from __future__ import annotations

from onnx_cp.lowrank.forms import CP, FORM_NAMES, FORMS, SPATIAL_SVD, SVD, TUCKER2, Form, Solution
from onnx_cp.lowrank.svd import SVDResult, channel_svd, channel_svd_errors, spatial_svd, spatial_svd_errors
from onnx_cp.lowrank.tucker2 import Tucker2Result, tucker2

__all__ = ["CP", "FORMS", "FORM_NAMES", "SPATIAL_SVD", "SVD", "SVDResult", "TUCKER2", "Form", "Solution",
           "Tucker2Result", "channel_svd", "channel_svd_errors", "spatial_svd", "spatial_svd_errors", "tucker2"]
