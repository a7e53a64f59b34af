"""How closely a model's outputs follow a reference model's on sample data: every output, compared the
way its task reads it (runtime.fidelity: per channel group, top-k anchors, CTC strings, top-1). Needs
no labels, so it serves models whose outputs are not class scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_cp.data.datasets import Dataset, first_inputs
from onnx_cp.errors import OnnxCpError
from onnx_cp.runtime.fidelity import OutputFidelity, compare_output
from onnx_cp.runtime.model_io import ModelLike
from onnx_cp.runtime.session import load, make_session, run, session_options, usable_cores

DEFAULT_SAMPLES = 256
BATCH = 16


@dataclass(frozen=True)
class OutputAgreement:
    samples: int
    outputs: list[OutputFidelity]

    @property
    def worst_group_error(self) -> float:
        """The headline: the largest channel-group error of any output."""
        return max((o.worst_group_error for o in self.outputs), default=0.0)

    @property
    def task_loss(self) -> float:
        """What a task loses, read the way it reads its outputs: the larger of the worst group error
        and the largest share of task disagreement (strings changed, top-10 anchors or top-1 lost).
        A CRNN's logits can move by a relative 0.13 while 22% of its decoded lines change."""
        disagreements = [1.0 - value for o in self.outputs for value in o.agreement.values()]
        return max([self.worst_group_error, *disagreements])

    def to_json(self) -> dict:
        return {"samples": self.samples, "worst_group_error": self.worst_group_error,
                "outputs": {o.name: o.to_json() for o in self.outputs}}


class ReferenceOutputs:
    """The reference model's outputs on the first `samples` inputs of `data`, computed once, to compare
    many candidate models against (a budget search compares one per step)."""

    def __init__(self, reference: ModelLike, data: Dataset | str | np.ndarray, *,
                 samples: int = DEFAULT_SAMPLES, threads: int | None = None) -> None:
        self.inputs = first_inputs(data, samples)
        self.threads = threads
        self.expected = _outputs(reference, self.inputs, threads, "reference")

    def compare(self, model: ModelLike) -> OutputAgreement:
        actual = _outputs(model, self.inputs, self.threads, "model")
        return OutputAgreement(len(self.inputs), [compare_output(name, expected, actual[name])
                                                  for name, expected in self.expected.items()])


def compare_on_data(model: ModelLike, reference: ModelLike, data: Dataset | str | np.ndarray, *,
                    samples: int = DEFAULT_SAMPLES, threads: int | None = None) -> OutputAgreement:
    """Run both models on the first `samples` inputs of `data` and compare every output."""
    return ReferenceOutputs(reference, data, samples=samples, threads=threads).compare(model)


def _outputs(model: ModelLike, x: np.ndarray, threads: int | None, label: str) -> dict[str, np.ndarray]:
    """Every output of a one-input model on `x`, batch by batch, with the batch axis first; a model
    with a fixed batch size (an exported CRNN often takes exactly 1) is run in chunks of that size,
    the last one padded. `threads`: default every usable core (outputs, not timings)."""
    loaded = load(model, label)
    session = make_session(loaded, session_options(threads=threads or usable_cores()))
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise OnnxCpError(f"{loaded.path or label}: comparing outputs on data needs a model with one input, "
                          f"found {len(inputs)}")
    first = inputs[0].shape[0] if inputs[0].shape else None
    batch = first if isinstance(first, int) and first > 0 else BATCH
    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    axes: dict[str, int] = {}
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        n = len(chunk)
        if n < batch and isinstance(first, int):
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        for name, value in zip(names, run(session, {inputs[0].name: chunk}, loaded.path or label)):
            value = np.asarray(value)
            axis = axes.setdefault(name, _batch_axis(value, len(chunk)))
            parts[name].append(np.take(value, range(n), axis=axis) if axis is not None else value)
    # batch first, so that every comparison reads samples on axis 0 ((T, N, C) sequences too)
    return {name: np.moveaxis(np.concatenate(values, axis=axes[name]), axes[name], 0) if axes[name] is not None
            else values[0] for name, values in parts.items()}


def _batch_axis(value: np.ndarray, batch: int) -> int | None:
    """The batch axis of an output: the first (or, for (T, N, C) sequences, the second) whose size is
    the batch's; None for outputs without one."""
    for axis in range(min(value.ndim, 2)):
        if value.shape[axis] == batch:
            return axis
    return None
