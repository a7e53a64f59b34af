"""Datasets for evaluation and fine-tuning: .npz files and image folders (see datasets.py).

Kept light on purpose: the synthetic character generator lives in onnx_cp.data.chars and is
imported only by those who need it."""

from onnx_cp.data.datasets import Dataset, Preprocessing, first_inputs, open_dataset

__all__ = ["Dataset", "Preprocessing", "first_inputs", "open_dataset"]
