"""Accuracy of a classifier on a dataset, and its agreement with a reference model.

The model's first output is taken as class scores (N, classes) (trailing 1-sized dims are
dropped). top5 is top-min(5, classes). With a reference model, agreement_top1 is the fraction of
samples where both models predict the same class, and max_abs_error / mean_abs_error compare the
raw first outputs; these need no labels."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

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
# Set only with a reference model; the JSON has these keys only then.
_REFERENCE_FIELDS = ("reference", "agreement_top1", "max_abs_error", "mean_abs_error",
                     "reference_top1", "reference_top5")


class NotClassScores(OnnxCpError):
    """The model's first output is not class scores (a detector head, a sequence, a map): top-1 has
    no meaning for it, and its outputs are compared instead (measure.outputs)."""


@dataclass(kw_only=True)
class AccuracyResult:
    """What `evaluate` measured; the fields are the `onnx-cp eval` JSON keys. top1 / top5 (and
    reference_top1 / reference_top5) are None without labels."""

    model: str
    data: str | None
    n: int
    top1: float | None
    top5: float | None  # top-`top_k`
    top_k: int | None
    num_classes: int | None
    output: str
    seconds: float
    reference: str | None = None
    agreement_top1: float | None = None
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    reference_top1: float | None = None
    reference_top5: float | None = None

    def to_json(self) -> dict:
        data = {"kind": "accuracy", **dataclasses.asdict(self)}
        if self.reference is None:
            for key in _REFERENCE_FIELDS:
                del data[key]
        return data


def evaluate(
    model: ModelLike,
    data: Dataset | str,
    *,
    reference: ModelLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | str | None = None,
    optimization: str = "all",
) -> AccuracyResult:
    """Top-1 / top-5 accuracy (with labels) and agreement with `reference` (when given)."""
    dataset = open_dataset(data) if not isinstance(data, Dataset) else data
    threads = resolve_threads(threads) if threads is not None else None
    options = session_options(threads=threads, optimization=optimization)
    subject = _Classifier(load(model), options, dataset)
    ref = _Classifier(load(reference, "reference"), options, dataset) if reference is not None else None

    started = time.perf_counter()
    n = 0
    hits, ref_hits, agreement = _Hits(), _Hits(), _Agreement()
    top_k = None
    progress = bar(len(dataset), desc="evaluating")
    for x, y in _rebatched(dataset, batch_size, subject.fixed_batch, ref.fixed_batch if ref else None):
        scores = subject(x)
        top_k = min(5, scores.shape[1])
        if y is not None:
            subject.check_labels(y, scores.shape[1])
            hits.add(scores, y, top_k)
        if ref is not None:
            ref_scores = ref(x)
            agreement.add(scores, ref_scores)
            if y is not None:
                ref_hits.add(ref_scores, y, top_k)
        n += len(x)
        progress.update(len(x))
    progress.close()

    labelled = dataset.has_labels
    result = AccuracyResult(
        model=subject.loaded.path or subject.loaded.label,
        data=getattr(dataset, "path", None),
        n=n,
        top1=hits.top1 / n if labelled else None,
        top5=hits.topk / n if labelled else None,
        top_k=top_k,
        num_classes=subject.num_classes,
        output=subject.output_name,
        seconds=time.perf_counter() - started,
    )
    if ref is None:
        return result
    return dataclasses.replace(
        result,
        reference=ref.loaded.path or "reference",
        agreement_top1=agreement.same / n,
        max_abs_error=agreement.max_error,
        mean_abs_error=agreement.sum_error / max(agreement.elements, 1),
        reference_top1=ref_hits.top1 / n if labelled else None,
        reference_top5=ref_hits.topk / n if labelled else None,
    )


@dataclass
class _Hits:
    """Samples whose label is a model's top-1 class, and among its top-k classes."""

    top1: int = 0
    topk: int = 0

    def add(self, scores: np.ndarray, y: np.ndarray, k: int) -> None:
        self.top1 += int(np.sum(scores.argmax(1) == y))
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        self.topk += int(np.sum(np.any(top == y[:, None], axis=1)))


@dataclass
class _Agreement:
    """Same top-1 class and output differences of a model and its reference."""

    same: int = 0
    max_error: float = 0.0
    sum_error: float = 0.0
    elements: int = 0

    def add(self, scores: np.ndarray, ref_scores: np.ndarray) -> None:
        if ref_scores.shape != scores.shape:
            raise OnnxCpError(f"model output shape {scores.shape} differs from the reference's "
                              f"{ref_scores.shape}")
        self.same += int(np.sum(scores.argmax(1) == ref_scores.argmax(1)))
        diff = np.abs(scores.astype(np.float64) - ref_scores.astype(np.float64))
        self.max_error = max(self.max_error, float(diff.max()))
        self.sum_error += float(diff.sum())
        self.elements += diff.size


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
            raise NotClassScores(f"{self.name}: output {self.output_name!r} has shape {tuple(out.shape)}; "
                                 f"expected class scores (N, classes)")
        self.num_classes = scores.shape[1]
        return scores

    def check_labels(self, y: np.ndarray, classes: int) -> None:
        if y.size and int(y.max()) >= classes:
            raise OnnxCpError(f"label {int(y.max())} is out of range: {self.name} predicts "
                              f"{classes} classes (0..{classes - 1})")


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
