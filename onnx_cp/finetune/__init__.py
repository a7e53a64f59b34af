"""Fine-tuning through PyTorch: ONNX graph -> torch module -> training -> weights written back."""

from __future__ import annotations

from onnx_cp.finetune.interpreter import OnnxModule, to_torch

__all__ = ["OnnxModule", "to_torch"]
