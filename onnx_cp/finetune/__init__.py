"""Fine-tuning through PyTorch: ONNX graph -> torch module -> training -> weights written back.

PyTorch is the optional extra `finetune`. Every fine-tuning entry point (onnx-cp finetune, optimize
with fine-tuning data, layer-wise reconstruction, imports of onnx_cp.finetune.*) imports this package
first, so the check below is the one place that turns a missing torch into one line for the user."""

from __future__ import annotations

from onnx_cp.errors import OnnxCpError

TORCH_MISSING = ("fine-tuning needs PyTorch: pip install 'onnx-cp[finetune]' "
                 "(or install the torch build you want first)")

try:
    import torch  # noqa: F401
except ModuleNotFoundError as exc:
    if exc.name != "torch":  # torch is there but broken: its own error says more
        raise
    raise OnnxCpError(TORCH_MISSING) from None

from onnx_cp.finetune.interpreter import OnnxModule, to_torch  # noqa: E402
from onnx_cp.finetune.train import FinetuneResult, finetune  # noqa: E402
from onnx_cp.finetune.writeback import check_parity, write_back  # noqa: E402

__all__ = ["FinetuneResult", "OnnxModule", "TORCH_MISSING", "check_parity", "finetune", "to_torch",
           "write_back"]
