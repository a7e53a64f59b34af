"""What this CPU offers onnxruntime, read once: the one place that parses /proc/cpuinfo."""

from __future__ import annotations

import functools
import os
import platform

# Tests (and users preparing models for another machine) may force the block: 8 (AVX2) or 16 (AVX-512).
CHANNEL_BLOCK_ENV = "ONNX_CP_CHANNEL_BLOCK"


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU: x86 lists them as "flags", ARM as "Features"."""
    info = _cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or "cpu"


def channel_block(flags: frozenset[str] | None = None) -> int:
    """onnxruntime's NCHWc block: depthwise convs are ~3x faster at channel counts that are multiples
    of it (16 with AVX-512, 8 with AVX2, else 4)."""
    forced = os.environ.get(CHANNEL_BLOCK_ENV)
    if forced and flags is None:
        return int(forced)
    flags = cpu_flags() if flags is None else flags
    if "avx512f" in flags:
        return 16
    if "avx2" in flags:
        return 8
    return 4


# The instruction sets onnxruntime's CPU kernels pick from, as /proc/cpuinfo names them.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16",
                  "asimddp", "i8mm")


def cpu_features(flags: frozenset[str] | None = None) -> list[str]:
    """The relevant instruction sets this CPU (or the given flag set) has, for every report and benchmark."""
    flags = cpu_flags() if flags is None else flags
    return [f for f in RELEVANT_FLAGS if f in flags]


# Instructions that give onnxruntime's U8 x S8 kernels an int32 dot product: VNNI on x86 (AVX-512 or
# AVX), AMX tiles, and ARM's dot-product (SDOT/UDOT) and int8 matrix-multiply extensions.
INT8_DOT_PRODUCT_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "i8mm", "asimddp")
_X86_MARKERS = ("sse2", "avx", "avx2")


def int8_dot_product(flags: frozenset[str]) -> str | None:
    """The instruction onnxruntime's INT8 kernels accumulate with on a CPU with `flags`, when it sums
    into int32 without saturating; None when they use int16 pair sums (x86 without VNNI/AMX:
    VPMADDUBSW saturates with full 8-bit weights) or the flags are unknown. A pure function of the
    flag set, so that the choice is tested for CPUs other than the one running."""
    for flag in INT8_DOT_PRODUCT_FLAGS:
        if flag in flags:
            return flag
    if flags and not any(marker in flags for marker in _X86_MARKERS) and "asimd" in flags:
        return "asimd"  # ARM without the dot-product extension widens to int32 (UMULL/SMLAL): no saturation
    return None
