"""Accuracy of a classifier on a dataset, and its agreement with a reference model.

The model's first output is taken as class scores (N, classes) (trailing 1-sized dims are
dropped). top5 is top-min(5, classes). With a reference model, agreement_top1 is the fraction of
samples where both models predict the same class, and max_abs_error / mean_abs_error compare the
raw first outputs; these need no labels."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

from onnx_cp.data.datasets import Dataset, open_dataset
from onnx_cp.errors import OnnxCpError
from onnx_cp.progress import bar
from onnx_cp.runtime.model_io import ModelLike
from onnx_cp.runtime.session import (
    LoadedModel,
    load,
    make_session,
    resolve_threads,
    run,
    session_options,
)

DEFAULT_BATCH_SIZE = 64


def evaluate(
    model: ModelLike,
    data: Dataset | str,
    *,
    reference: ModelLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | str | None = None,
    optimization: str = "all",
) -> dict:
    """Top-1 / top-5 accuracy (with labels) and agreement with `reference` (when given).

    Returns {"model", "data", "n", "top1", "top5", "top_k", "num_classes", "seconds"} plus, with a
    reference, {"reference", "agreement_top1", "max_abs_error", "mean_abs_error",
    "reference_top1", "reference_top5"}. top1/top5 are None without labels."""
    dataset = open_dataset(data) if not isinstance(data, Dataset) else data
    threads = resolve_threads(threads) if threads is not None else None
    options = session_options(threads=threads, optimization=optimization)
    subject = _Classifier(load(model), options, dataset)
    ref = _Classifier(load(reference, "reference"), options, dataset) if reference is not None else None

    started = time.perf_counter()
    n = 0
    correct1 = correct5 = agree = 0
    ref_correct1 = ref_correct5 = 0
    max_err = 0.0
    sum_err = 0.0
    n_elements = 0
    top_k = None
    progress = bar(len(dataset), desc="evaluating")
    for x, y in _rebatched(dataset, batch_size, subject.fixed_batch, ref.fixed_batch if ref else None):
        scores = subject(x)
        top_k = min(5, scores.shape[1])
        if y is not None:
            subject.check_labels(y, scores.shape[1])
            correct1, correct5 = _count_correct(scores, y, top_k, correct1, correct5)
        if ref is not None:
            ref_scores = ref(x)
            if ref_scores.shape != scores.shape:
                raise OnnxCpError(f"model output shape {scores.shape} differs from the reference's "
                                  f"{ref_scores.shape}")
            agree += int(np.sum(scores.argmax(1) == ref_scores.argmax(1)))
            diff = np.abs(scores.astype(np.float64) - ref_scores.astype(np.float64))
            max_err = max(max_err, float(diff.max()))
            sum_err += float(diff.sum())
            n_elements += diff.size
            if y is not None:
                ref_correct1, ref_correct5 = _count_correct(ref_scores, y, top_k, ref_correct1,
                                                            ref_correct5)
        n += len(x)
        progress.update(len(x))
    progress.close()

    labelled = dataset.has_labels
    result = {
        "kind": "accuracy",
        "model": subject.loaded.path or subject.loaded.label,
        "data": getattr(dataset, "path", None),
        "n": n,
        "top1": correct1 / n if labelled else None,
        "top5": correct5 / n if labelled else None,
        "top_k": top_k,
        "num_classes": subject.num_classes,
        "output": subject.output_name,
        "seconds": time.perf_counter() - started,
    }
    if ref is not None:
        result.update({
            "reference": ref.loaded.path or "reference",
            "agreement_top1": agree / n,
            "max_abs_error": max_err,
            "mean_abs_error": sum_err / max(n_elements, 1),
            "reference_top1": ref_correct1 / n if labelled else None,
            "reference_top5": ref_correct5 / n if labelled else None,
        })
    return result


class _Classifier:
    """An ORT session checked against the dataset: one input of matching shape, class scores out."""

    def __init__(self, loaded: LoadedModel, options: ort.SessionOptions, dataset: Dataset):
        self.loaded = loaded
        self.name = loaded.path or loaded.label
        self.session = make_session(loaded, options)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise OnnxCpError(f"{self.name}: expected a model with one input, found "
                              f"{len(inputs)} ({', '.join(i.name for i in inputs)})")
        self.input = inputs[0]
        self.output_name = self.session.get_outputs()[0].name
        self._check_input(dataset)
        first = self.input.shape[0]
        self.fixed_batch = first if isinstance(first, int) and first > 0 else None
        self.dtype = _numpy_dtype(self.input.type)
        self.num_classes: int | None = None

    def _check_input(self, dataset: Dataset) -> None:
        shape = self.input.shape
        sample = tuple(dataset.sample_shape)
        expected = "x".join(str(d) if isinstance(d, int) else "?" for d in shape)
        if len(shape) != len(sample) + 1 or any(
            isinstance(d, int) and d != s for d, s in zip(shape[1:], sample)
        ):
            raise OnnxCpError(
                f"{self.name}: input {self.input.name!r} expects N x {expected.split('x', 1)[-1]}, but "
                f"the data's samples are {'x'.join(map(str, sample))} (see --size / --grayscale)"
            )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        if self.fixed_batch is not None and n < self.fixed_batch:
            # A fixed-batch model cannot take the short last batch: pad it, drop the padding after.
            x = np.concatenate([x, np.repeat(x[-1:], self.fixed_batch - n, axis=0)])
        out = run(self.session, {self.input.name: x.astype(self.dtype, copy=False)}, self.name)[0]
        scores = np.asarray(out)[:n] if np.ndim(out) else np.asarray(out)
        while scores.ndim > 2 and scores.shape[-1] == 1:
            scores = scores[..., 0]
        if scores.ndim != 2 or scores.shape[0] != n:
            raise OnnxCpError(f"{self.name}: output {self.output_name!r} has shape {tuple(out.shape)}; "
                              f"expected class scores (N, classes)")
        self.num_classes = scores.shape[1]
        return scores

    def check_labels(self, y: np.ndarray, classes: int) -> None:
        if y.size and int(y.max()) >= classes:
            raise OnnxCpError(f"label {int(y.max())} is out of range: {self.name} predicts "
                              f"{classes} classes (0..{classes - 1})")


def _count_correct(scores: np.ndarray, y: np.ndarray, k: int, c1: int, c5: int) -> tuple[int, int]:
    c1 += int(np.sum(scores.argmax(1) == y))
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    c5 += int(np.sum(np.any(top == y[:, None], axis=1)))
    return c1, c5


def _rebatched(dataset: Dataset, batch_size: int, *fixed: int | None):
    """Batches of `batch_size`, or of a model's fixed batch size (a static first input dim)."""
    sizes = {f for f in fixed if f is not None}
    if len(sizes) > 1:
        raise OnnxCpError(f"the model and the reference have different fixed batch sizes {sorted(sizes)}")
    return dataset.batches(sizes.pop() if sizes else batch_size)


def _numpy_dtype(onnx_type: str) -> np.dtype:
    return {
        "tensor(float)": np.dtype(np.float32),
        "tensor(float16)": np.dtype(np.float16),
        "tensor(double)": np.dtype(np.float64),
    }.get(onnx_type, np.dtype(np.float32))
