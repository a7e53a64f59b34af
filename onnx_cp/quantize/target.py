"""Which weight precision an INT8 file gets: from the CPU it is meant for.

onnxruntime multiplies U8 activations by S8 weights. Where the CPU has an int32 dot product (VNNI,
AMX, ARM's dot product) the products are summed without loss, and full 8-bit weights are both safe
and the most precise. On x86 CPUs without VNNI the kernels use VPMADDUBSW, whose int16 sum of two
products saturates with 8-bit weights: whole layers clip (measured: a CP model of charnet fell from
94% to 15% top-1), so weights get 7 bits there (onnxruntime's reduce_range).

`native` picks for the CPU running the quantization; `portable` picks 7 bits, safe on every CPU,
for files meant for machines not known in advance.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx_cp.errors import UsageError
from onnx_cp.runtime.cpu import cpu_features, cpu_flags, int8_dot_product

TARGETS = ("native", "portable")
DEFAULT_TARGET = "native"


@dataclass(frozen=True)
class WeightPrecision:
    """The weight bits chosen for `target`, the CPU features the choice was read from, and why."""

    target: str
    weight_bits: int
    cpu_features: tuple[str, ...]
    reason: str


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise UsageError(f"expected one of {', '.join(TARGETS)}, got {target!r}", option="int8_target")


def weight_precision(target: str, flags: frozenset[str] | None = None) -> WeightPrecision:
    """The weight bits for a file meant for `target` ("native": a CPU with `flags`, by default the
    one running; "portable": any CPU). Pure in `target` and `flags` when flags are given."""
    check_target(target)
    flags = cpu_flags() if flags is None else flags
    features = tuple(cpu_features(flags))
    if target == "portable":
        return WeightPrecision(target, 7, features, "portable: 7-bit weights do not saturate on any CPU")
    dot = int8_dot_product(flags)
    if dot is not None:
        return WeightPrecision(target, 8, features, f"native: {dot} sums INT8 products into int32, no saturation")
    return WeightPrecision(target, 7, features, "native: no VNNI/AMX/dot product, so int16 pair sums that "
                           "saturate with 8-bit weights")
