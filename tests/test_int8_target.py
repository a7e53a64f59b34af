"""INT8 weight bits from the CPU: the flag detection is a pure function, tested on flag sets of CPUs
with and without VNNI; the bits it picks are the ones the quantized weights use."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import model_factory
from onnx_cp.errors import UsageError
from onnx_cp.quantize import int8_scheme, quantize_int8, weight_precision
from onnx_cp.runtime.cpu import cpu_features, int8_dot_product

X86 = frozenset({"sse2", "sse4_1", "avx", "fma", "avx2"})
AVX2_ONLY = X86  # the AVX2 machines README's first figures came from
AVX512_VNNI = X86 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}  # an EPYC like this one
AVX_VNNI = X86 | {"avx_vnni"}  # Alder Lake
AMX = AVX512_VNNI | {"amx_int8", "amx_bf16"}
ARM_DOT = frozenset({"fp", "asimd", "asimddp", "i8mm"})
ARM_PLAIN = frozenset({"fp", "asimd"})


@pytest.mark.parametrize("flags, expected", [
    (AVX2_ONLY, None), (AVX512_VNNI, "avx512_vnni"), (AVX_VNNI, "avx_vnni"), (AMX, "amx_int8"),
    (ARM_DOT, "i8mm"), (ARM_PLAIN, "asimd"), (frozenset(), None), (frozenset({"sse2"}), None),
])
def test_dot_product_instruction_from_flags(flags, expected):
    assert int8_dot_product(flags) == expected


@pytest.mark.parametrize("flags, native_bits", [
    (AVX2_ONLY, 7), (AVX512_VNNI, 8), (AVX_VNNI, 8), (AMX, 8), (ARM_DOT, 8), (frozenset(), 7),
])
def test_weight_bits_per_target(flags, native_bits):
    native = weight_precision("native", flags)
    assert native.weight_bits == native_bits
    assert native.cpu_features == tuple(cpu_features(flags))
    assert ("saturate" in native.reason) == (native_bits == 7)
    assert weight_precision("portable", flags).weight_bits == 7  # a file for any machine


def test_cpu_features_are_named_in_a_fixed_order():
    assert cpu_features(AVX512_VNNI) == ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"]
    assert cpu_features(AVX2_ONLY) == ["avx2", "fma"]


def test_unknown_target_is_refused():
    with pytest.raises(UsageError, match="int8_target"):
        weight_precision("avx512", AVX512_VNNI)


def _max_weight(model: ir.Model) -> int:
    weights = [v.const_value.numpy() for v in model.graph.initializers.values()
               if v.const_value is not None and v.const_value.dtype == ir.DataType.INT8]
    return max(int(np.abs(w.astype(np.int32)).max()) for w in weights)


def _run(model, x: np.ndarray) -> np.ndarray:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_native_uses_the_bits_this_cpu_allows_and_portable_seven():
    model = model_factory.tiny_cnn()
    rng = np.random.default_rng(0)
    calibration, x = (rng.standard_normal((n, 3, 16, 16)).astype(np.float32) for n in (64, 16))
    native, portable = (quantize_int8(model, calibration, target=t) for t in ("native", "portable"))
    bits = weight_precision("native").weight_bits
    assert int8_scheme(native).weight_bits == bits and int8_scheme(native).target == "native"
    assert (_max_weight(native) > 64) == (bits == 8)  # 8-bit weights use the full [-127, 127]
    assert int8_scheme(portable).weight_bits == 7 and _max_weight(portable) <= 64
    reference = _run(model, x)
    for quantized in (native, portable):
        out = _run(quantized, x)
        assert np.linalg.norm(out - reference) / np.linalg.norm(reference) < 0.05
