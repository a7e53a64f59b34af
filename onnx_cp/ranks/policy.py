"""How ranks are chosen: one typed value per policy, checked when it is made.

    ExplicitRanks(rank=64, per_layer={"conv2": 32})   # clipped to each layer's FLOP break-even
    ErrorBudget(max_error=0.15, data=None)            # the data-free default; with sample data,
                                                      # the bound is on each layer's output error
    SpeedupTarget(4.0)                                # measured whole-model onnxruntime speed-up
    SpeedupTarget(8.5, within=AccuracyBudget(1.0))    # ... and checked against a quality bound
    AccuracyBudget(1.0)                               # points of top-1 (or agreement) lost at most
    OutputErrorBudget(0.1)                            # worst channel-group output error at most
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from onnx_cp.errors import UsageError

# A kernel error budget that keeps outputs close without data: layer outputs move by about the
# kernel error, and errors compound across layers (a fixed rank 32 everywhere changed 93% of an
# OCR model's decoded strings).
DEFAULT_MAX_ERROR = 0.15


def _check_rank(value: object, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"a rank must be an integer of at least 1, got {value!r}", option=option)


def _check_positive(value: object, option: str, above: float = 0.0, inclusive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value < above if inclusive else value <= above):
        bound = f"at least {above:g}" if inclusive else f"above {above:g}"
        raise UsageError(f"must be a finite number {bound}, got {value!r}", option=option)


@dataclass(frozen=True)
class ErrorBudget:
    """Per layer, the smallest grid rank whose relative error is at most `max_error`, among ranks that
    at least halve its MACs; the error is the kernel's, or with `data` (sample inputs, no labels) the
    layer output's on them."""

    max_error: float = DEFAULT_MAX_ERROR
    data: object | None = None

    def __post_init__(self) -> None:
        _check_positive(self.max_error, "max_error")


@dataclass(frozen=True)
class ExplicitRanks:
    """`rank` for every eligible layer and/or `per_layer` ranks (which win); layers given neither
    follow the kernel ErrorBudget(max_error)."""

    rank: int | None = None
    per_layer: Mapping[str, int] = field(default_factory=dict)
    max_error: float = DEFAULT_MAX_ERROR

    def __post_init__(self) -> None:
        if self.rank is None and not self.per_layer:
            raise UsageError("give a rank for every layer or per-layer ranks", option="rank")
        if self.rank is not None:
            _check_rank(self.rank, "rank")
        for rank in self.per_layer.values():
            _check_rank(rank, "layer_ranks")
        _check_positive(self.max_error, "max_error")

    def rank_of(self, layer: str) -> int | None:
        return self.per_layer.get(layer, self.rank)

    def check_layers(self, names: Sequence[str]) -> None:
        unknown = sorted(set(self.per_layer) - set(names))
        if unknown:
            raise UsageError(f"unknown Conv layer(s) {unknown}; Conv layers are {sorted(names)}",
                             option="layer_ranks")


@dataclass(frozen=True)
class AccuracyBudget:
    """The fastest model found whose accuracy (top-1 with labels, else agreement with the original;
    after fine-tuning when fine-tuning is set) drops at most `max_drop` points on the evaluation data."""

    max_drop: float

    def __post_init__(self) -> None:
        _check_positive(self.max_drop, "max_accuracy_drop", above=0.0, inclusive=True)


@dataclass(frozen=True)
class OutputErrorBudget:
    """The fastest model found whose outputs stay within `max_error` of the original's on the
    evaluation data (the worst channel-group relative error of any output, see runtime.fidelity; after
    fine-tuning when fine-tuning is set): for models whose outputs are not class scores."""

    max_error: float

    def __post_init__(self) -> None:
        _check_positive(self.max_error, "max_output_error")


@dataclass(frozen=True)
class SpeedupTarget:
    """Ranks whose model is measured `target` times faster than the original (onnxruntime): the most
    accurate plan the search measured at the target. With `within`, the final model (after fine-tuning
    and quantization) must also stay within that quality bound and still reach the target, or the run
    fails (BudgetError) and writes nothing."""

    target: float
    within: AccuracyBudget | OutputErrorBudget | None = None

    def __post_init__(self) -> None:
        _check_positive(self.target, "target_speedup", above=1.0)
        if self.within is not None and not isinstance(self.within, (AccuracyBudget, OutputErrorBudget)):
            raise UsageError(f"expected an AccuracyBudget or OutputErrorBudget, got {type(self.within).__name__}",
                             option="target_speedup")


RankPolicy = ErrorBudget | ExplicitRanks | SpeedupTarget | AccuracyBudget | OutputErrorBudget
QualityBudget = AccuracyBudget | OutputErrorBudget


def as_policy(ranks: RankPolicy | int | None) -> RankPolicy:
    """A policy from the API's `ranks` argument: a policy, an int (one rank everywhere), or None."""
    if ranks is None:
        return ErrorBudget()
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        return ExplicitRanks(rank=ranks)
    if isinstance(ranks, (ErrorBudget, ExplicitRanks, SpeedupTarget, AccuracyBudget, OutputErrorBudget)):
        return ranks
    raise UsageError(f"expected an int or a rank policy (ExplicitRanks, ErrorBudget, SpeedupTarget, "
                     f"AccuracyBudget, OutputErrorBudget), got {type(ranks).__name__}", option="ranks")
