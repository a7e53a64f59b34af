"""Fine-tuning through PyTorch: ONNX graph -> torch module -> training -> weights written back."""

from __future__ import annotations

from onnx_cp.finetune.interpreter import OnnxModule, to_torch
from onnx_cp.finetune.train import FinetuneResult, finetune
from onnx_cp.finetune.writeback import check_parity, write_back

__all__ = ["FinetuneResult", "OnnxModule", "check_parity", "finetune", "to_torch", "write_back"]
