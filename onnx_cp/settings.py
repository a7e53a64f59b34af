"""Settings as a few typed groups, shared by the Python API, the CLI and the config file:

    LayerSelection   what to decompose (name filters)
    RankPolicy       how to choose ranks (onnx_cp.ranks: ExplicitRanks, ErrorBudget, SpeedupTarget,
                     AccuracyBudget)
    SolverSettings   how to decompose (the low-rank forms to choose from, CP method, worker processes,
                     a custom CP decomposer)
    FinetuneSettings layer-wise reconstruction and fine-tuning
    QuantizeSettings INT8 after fine-tuning
    MeasureSettings  how models are run and measured (input shapes, threads, evaluation data, latency)

Every group checks its values when made and raises UsageError naming the parameter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from onnx_cp.errors import UsageError
from onnx_cp.quantize.target import DEFAULT_TARGET, check_target
from onnx_cp.ranks import (
    DEFAULT_MAX_ERROR,
    AccuracyBudget,
    ErrorBudget,
    ExplicitRanks,
    OutputErrorBudget,
    RankPolicy,
    SolverSettings,
    SpeedupTarget,
    as_policy,
)
from onnx_cp.ranks.solve import DECOMPOSITIONS
from onnx_cp.runtime.session import check_thread_count

# Adam steps per CP chain in layer-wise reconstruction before fine-tuning (onnx_cp.finetune.reconstruct,
# which imports torch: the default lives here so that settings import without it).
DEFAULT_RECONSTRUCT_STEPS = 300


def check_int(value: object, option: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"expected an integer of at least {minimum}, got {value!r}", option=option)


@dataclass(frozen=True)
class LayerSelection:
    """Only Conv layers whose name matches `include`, none that match `exclude` (re.search);
    `fuse`: first make the exact rewrites of onnx_cp.graph.fusion (affine ops folded into Convs,
    HardSwish as one op, Softmax over the last axis)."""

    include: str | None = None
    exclude: str | None = None
    fuse: bool = True

    def __post_init__(self) -> None:
        for option, pattern in (("layers", self.include), ("exclude", self.exclude)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise UsageError(f"not a valid regular expression ({exc})", option=option) from None


@dataclass(frozen=True)
class FinetuneSettings:
    """Fine-tune the rewritten model on `data` (a .npz path, an image folder, a Dataset or arrays).

    val: validation data that picks the best epoch; teacher_from_input: distil from the input model
    (no labels needed); epochs/steps/lr/batch_size: the schedule (None: onnx_cp.finetune's defaults);
    reconstruct_steps: before fine-tuning, Adam steps that fit each CP chain to the output of the
    layer it replaced on the first samples of `data` (0: off); augment: the training views of
    distillation (onnx_cp.finetune.augment: "auto", "none" or "shift")."""

    data: object
    val: object | None = None
    teacher_from_input: bool = False
    epochs: int | None = None
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    reconstruct_steps: int = DEFAULT_RECONSTRUCT_STEPS
    augment: str = "auto"

    def __post_init__(self) -> None:
        if self.data is None:
            raise UsageError("fine-tuning needs training data", option="finetune_data")
        check_int(self.reconstruct_steps, "reconstruct_steps", 0)
        if self.augment not in AUGMENTATIONS:
            raise UsageError(f"expected one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}", option="augment")
        for option in ("epochs", "steps", "batch_size"):
            if getattr(self, option) is not None:
                check_int(getattr(self, option), option, 1)

    def schedule(self) -> dict:
        """The keyword arguments for onnx_cp.finetune.finetune that were set."""
        options = {"epochs": self.epochs, "steps": self.steps, "lr": self.lr, "batch_size": self.batch_size}
        return {k: v for k, v in options.items() if v is not None} | {"augment": self.augment}


AUGMENTATIONS = ("auto", "none", "shift", "mix")  # the training views of distillation (onnx_cp.finetune.augment)


# The INT8 output-error budget (worst channel group on the calibration samples); the value lives
# here, beside the other defaults, so that settings import without onnxruntime's quantizer.
DEFAULT_INT8_MAX_ERROR = 0.15


@dataclass(frozen=True)
class QuantizeSettings:
    """Static INT8 quantization of the result, calibrated on `calibration_data` (default: the
    fine-tuning data, else the evaluation data).

    target: "native" (weight bits for this CPU: 8 where onnxruntime has VNNI/AMX/dot-product
    kernels, 7 where 8 would saturate) or "portable" (7 bits: safe on any CPU).
    max_output_error: the largest channel-group error of any output the INT8 model may show against
    the float model on the calibration samples; the most sensitive layers are kept float to meet it,
    and a model that cannot is an error (onnx_cp.quantize.check)."""

    kind: str = "int8"
    calibration_data: object | None = None
    target: str = DEFAULT_TARGET
    max_output_error: float = DEFAULT_INT8_MAX_ERROR

    def __post_init__(self) -> None:
        if self.kind != "int8":
            raise UsageError(f"only 'int8' is supported, got {self.kind!r}", option="quantize")
        check_target(self.target)
        error = self.max_output_error
        if isinstance(error, bool) or not isinstance(error, (int, float)) or not error > 0:
            raise UsageError(f"expected a positive number, got {error!r}", option="int8_max_error")


@dataclass(frozen=True)
class MeasureSettings:
    """How models are run: concrete shapes for symbolic input dimensions, onnxruntime threads;
    what is measured: accuracy on `eval_data` at every stage, latency and per-layer profile of input
    and output, the verification run before writing."""

    input_shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)
    threads: int = 1
    eval_data: object | None = None
    latency: bool = False
    verify: bool = True

    def __post_init__(self) -> None:
        check_int(self.threads, "threads", 1)
        check_thread_count(self.threads)
        for name, dims in self.input_shapes.items():
            if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
                raise UsageError(f"{name}: expected positive integer dimensions, got {list(dims)}",
                                 option="input_shapes")


__all__ = [
    "DECOMPOSITIONS", "DEFAULT_INT8_MAX_ERROR", "DEFAULT_MAX_ERROR", "DEFAULT_RECONSTRUCT_STEPS", "AccuracyBudget",
    "ErrorBudget", "ExplicitRanks", "OutputErrorBudget", "FinetuneSettings", "LayerSelection", "MeasureSettings",
    "QuantizeSettings", "RankPolicy", "SolverSettings", "SpeedupTarget", "as_policy",
]
