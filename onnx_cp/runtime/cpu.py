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
    return frozenset(_cpuinfo().get("flags", "").split())


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


def cpu_features() -> list[str]:
    """The relevant instruction sets this CPU has, for every report and benchmark."""
    flags = cpu_flags()
    return [f for f in RELEVANT_FLAGS if f in flags]
