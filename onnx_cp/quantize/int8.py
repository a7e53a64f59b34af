"""Static INT8 quantization with onnxruntime (QDQ, per-channel weights), calibrated on user data.

INT8 is the rival users already know, and CP composes with it: the four-conv chain quantizes like
any Conv. Activations are unsigned 8-bit and weights signed (U8S8), the combination that
onnxruntime's VNNI kernels run fastest on x86.

Five things keep the result close to the float model:
- weight bits follow the CPU the file is for (quantize.target): 8 where onnxruntime's kernels sum
  into int32 (VNNI, AMX, ARM dot product), 7 where they saturate int16 pair sums (AVX2 without
  VNNI) or the machine is not known (`target="portable"`).
- CP chains are equalized first (see quantize.equalize): activations are quantized per tensor, and
  the R rank-one channels inside a chain have very different ranges.
- activation ranges are calibrated by percentile, not min/max (see DEFAULT_CALIBRATION_METHOD).
- the float tail between the last compute nodes and the outputs stays float (quantize.mixed): one
  scale for a head that concatenates pixel boxes and probabilities rounds the probabilities to 0.
- the result is checked against the float model on the calibration samples (quantize.check), per
  channel group and by task agreement; a broken model raises instead of being returned.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from onnx_cp.errors import OnnxCpError, UsageError, first_line
from onnx_cp.graph import naming
from onnx_cp.measure.outputs import ReferenceOutputs
from onnx_cp.quantize.check import DEFAULT_MAX_OUTPUT_ERROR, Int8Check, check_against, raise_if_broken
from onnx_cp.quantize.equalize import equalize_chains
from onnx_cp.quantize.mixed import COMPUTE_OPS, float_islands, float_tail, name_unnamed_nodes, recurrent_nodes
from onnx_cp.quantize.sensitivity import rank_by_added_error, rank_by_measured_gain
from onnx_cp.quantize.target import DEFAULT_TARGET, check_target, weight_precision
from onnx_cp.runtime import model_io
from onnx_cp.runtime.inputs import model_batches
from onnx_cp.runtime.tensors import single_input

DEFAULT_CALIBRATION_SAMPLES = 256
# Percentile (99.999%) ranges ignore the rare outliers that MinMax stretches a whole tensor for:
# +1.1 points of top-1 on charnet-cp (10000 test images), no change on charnet.
DEFAULT_CALIBRATION_METHOD = "percentile"
_CALIBRATION_BATCH = 16
SCHEME_METADATA_KEY = "onnx_cp.int8"
_METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}


@dataclass(frozen=True)
class Int8Scheme:
    """How a model was quantized, for reports; stored as JSON in the model's metadata."""

    activations: str = "uint8"
    weights: str = "int8"
    weight_bits: int = 7
    per_channel: bool = True
    calibration: str = DEFAULT_CALIBRATION_METHOD
    samples: int = DEFAULT_CALIBRATION_SAMPLES
    equalized_layers: tuple[str, ...] = field(default_factory=tuple)
    # Files written before targets existed used 7 bits everywhere, which is what "portable" means.
    target: str = "portable"
    cpu_features: tuple[str, ...] = field(default_factory=tuple)  # of the machine that quantized
    float_nodes: tuple[str, ...] = field(default_factory=tuple)  # the float tail (quantize.mixed)
    # the layers kept float whole, by the plan or the check (a decomposed layer's chain by its name)
    float_units: tuple[str, ...] = field(default_factory=tuple)
    check: dict = field(default_factory=dict)  # Int8Check.to_json() on the calibration samples

    def describe(self) -> str:
        chains = f", {len(self.equalized_layers)} CP chain(s) equalized" if self.equalized_layers else ""
        kept = len(self.float_nodes)
        tail = f", {kept} node(s) kept float (the head, the layers INT8 hurts most)" if kept else ""
        granularity = "per-channel" if self.per_channel else "per-tensor"
        signed = "signed" if self.weights == "int8" else "unsigned"
        features = ", ".join(self.cpu_features) or "no SIMD flags read"
        return (f"U8 activations, {self.weight_bits}-bit {signed} weights ({granularity}; target {self.target}, "
                f"quantized on {features}), {self.calibration} calibration on {self.samples} samples{chains}{tail}")


def int8_scheme(model: model_io.ModelLike) -> Int8Scheme | None:
    """The scheme quantize_int8 recorded in `model`, None if it has none."""
    props = model.metadata_props if isinstance(model, ir.Model) else model_io.to_ir(model).metadata_props
    text = props.get(SCHEME_METADATA_KEY)
    if text is None:
        return None
    fields = json.loads(text)
    for key in ("equalized_layers", "cpu_features", "float_nodes", "float_units"):
        fields[key] = tuple(fields.get(key, ()))
    return Int8Scheme(**fields)


class _Batches(CalibrationDataReader):
    """Feeds the calibration samples, a batch at a time, to onnxruntime's calibrator; set_range lets
    it take them a few batches at a time (see _CALIBRATION_CHUNK)."""

    def __init__(self, input_name: str, batches: Iterator[np.ndarray]) -> None:
        self.input_name = input_name
        self.all = list(batches)
        self.batches = iter(self.all)

    def __len__(self) -> int:
        return len(self.all)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.batches = iter(self.all[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


# onnxruntime's histogram calibrators keep every intermediate tensor of every batch they are given
# in memory (16 GB for YOLOv8n at 320 on 256 samples): give them this many batches at a time.
_CALIBRATION_CHUNK = 4


def _chunk(batches: int) -> int:
    """The largest chunk up to _CALIBRATION_CHUNK that divides the batch count (onnxruntime asks it)."""
    return max(c for c in range(1, _CALIBRATION_CHUNK + 1) if batches % c == 0) if batches else 1


def quantize_int8(
    model: model_io.ModelLike,
    calibration,
    *,
    samples: int = DEFAULT_CALIBRATION_SAMPLES,
    target: str = DEFAULT_TARGET,
    per_channel: bool = True,
    weights: str = "int8",
    reduce_range: bool | None = None,
    equalize: bool = True,
    calibration_method: str = DEFAULT_CALIBRATION_METHOD,
    keep_float_tail: bool = True,
    max_output_error: float = DEFAULT_MAX_OUTPUT_ERROR,
    keep_float: Collection[str] = (),
) -> ir.Model:
    """A QDQ INT8 copy of `model`, its activation ranges calibrated on `calibration`
    (a dataset path, a Dataset, or an array of inputs) with at most `samples` samples, checked
    against `model` on those samples (quantize.check: OnnxCpError when it broke).

    target: "native" (weight bits for this CPU: 8 with VNNI/AMX/ARM dot product, else 7) or
    "portable" (7 bits, safe on any CPU); reduce_range overrides it (True: 7 bits, False: 8).
    weights: "int8" (U8S8) or "uint8" (U8U8: 8-bit weights that never saturate, but no VNNI
    speed-up). equalize: rescale CP chains first (see equalize_chains). calibration_method:
    "percentile", "minmax" or "entropy". keep_float_tail: leave the nodes between the last compute
    nodes and the outputs in float (quantize.mixed). max_output_error: the largest channel-group
    error the check accepts. keep_float: layers kept float from the start (a decomposed layer's
    name keeps its whole chain float), beside those the check adds. The scheme used and the check's
    figures are recorded in the result's metadata: read them with int8_scheme()."""
    _check_options(weights, calibration_method, target, max_output_error)
    source = model_io.to_ir(model)
    reference = ir.to_proto(source)  # before equalization: the check compares with the model as given
    input_name = single_input(source, "INT8 calibration")
    batches = _calibration_source(calibration, samples, source, input_name)
    equalized = equalize_chains(source, batches()) if equalize else []
    precision = weight_precision(target)
    bits = precision.weight_bits if reduce_range is None or weights != "int8" else (7 if reduce_range else 8)
    scheme = Int8Scheme(weights=weights, weight_bits=bits if weights == "int8" else 8,
                        per_channel=per_channel, calibration=calibration_method, samples=samples,
                        equalized_layers=tuple(equalized), target=target, cpu_features=precision.cpu_features)
    data = np.concatenate(list(batches()))
    quantized, kept, check, units = _quantize_checked(source, input_name, batches, scheme, keep_float_tail,
                                                      reference, data, max_output_error, frozenset(keep_float))
    scheme = replace(scheme, float_nodes=tuple(kept), float_units=units, check=check.to_json())
    quantized.metadata_props[SCHEME_METADATA_KEY] = json.dumps(asdict(scheme))
    return quantized


def quantize_for_timing(model: model_io.ModelLike, samples: np.ndarray, *, target: str = DEFAULT_TARGET,
                        keep_float: frozenset[str] = frozenset()) -> ir.Model:
    """A QDQ INT8 copy of `model` for measuring its speed only: the nodes quantize_int8 quantizes
    (the float tail kept), with min/max ranges from `samples` and no equalization or check. The
    ranges do not change which kernels onnxruntime runs, so a speed search can time candidates at
    a fraction of a calibrated quantization's cost (YOLOv8n: a few seconds, not a minute).

    keep_float: node names that stay float too, with the chains that replaced them ("conv2" keeps
    "conv2/cp/in" ...): the float islands a calibrated quantization of the input model kept."""
    check_target(target)
    prepared = _prepared(model_io.to_ir(model))
    kept = {node.name: "kept float by the input model's INT8 check" for node in prepared.graph
            if naming.layer_of(node.name) in keep_float}
    scheme = Int8Scheme(weight_bits=weight_precision(target).weight_bits, calibration="minmax",
                        samples=len(samples), target=target)
    input_name = single_input(prepared, "INT8 timing")
    batches = _calibration_source(samples, len(samples), prepared, input_name)
    with tempfile.TemporaryDirectory(prefix="onnx-cp-calibration-") as folder:
        return _qdq(prepared, _Batches(input_name, batches()), scheme,
                    {**kept, **float_tail(prepared), **recurrent_nodes(prepared)}, Path(folder) / "ranges.json")


# The search keeps at most this share of the units (_float_units) float: beyond it INT8 is not INT8.
MAX_FLOAT_UNIT_SHARE = 0.5
_SENSITIVITY_SAMPLES = 8  # enough to rank layers; their tensors are held in memory
# Each candidate scanned costs one quantization (calibration ranges cached) and one check on this many
# samples: YOLOv8n's 64 convs take about a minute. Past this many, the local estimate's first are.
_SCANNED_CANDIDATES = 64
_SCAN_SAMPLES = 32
_BISECTION_STEPS = 3  # fewer float nodes once a count passes: each step is one quantization and check
# One try of the mixed-precision search: the QDQ model, the nodes it keeps float (and why), its check,
# and the units (_float_units) it keeps float.
Attempt = tuple[ir.Model, dict[str, str], Int8Check, tuple[str, ...]]


def _quantize_checked(source: ir.Model, input_name: str, batches, scheme: Int8Scheme, keep_float_tail: bool,
                      reference, data: np.ndarray, max_output_error: float, keep_float: frozenset[str]) -> Attempt:
    """Quantize, the units named in `keep_float` float; while the outputs miss `max_output_error` (or
    a task agreement), keep float other units of compute nodes (_float_units) too, first in an order
    of sensitivity (_sensitivity_rankings), as few as pass."""
    prepared = _prepared(source)
    tail = {**(float_tail(prepared) if keep_float_tail else {}), **recurrent_nodes(prepared)}
    units = _float_units(prepared)
    planned_units = keep_float & units.keys()
    planned = float_islands(prepared, [node for unit in sorted(planned_units) for node in units[unit]],
                            "kept float by the plan")
    units = {name: nodes for name, nodes in units.items() if name not in keep_float}
    with tempfile.TemporaryDirectory(prefix="onnx-cp-calibration-") as folder:
        cache = Path(folder) / "ranges.json"

        def quantized_keeping(unit_names: list[str]) -> tuple[ir.Model, dict[str, str]]:
            compute_nodes = [node for unit in unit_names for node in units[unit]]
            kept = {**planned, **float_islands(prepared, compute_nodes, "INT8 adds the most output error here"), **tail}
            return _qdq(prepared, _Batches(input_name, batches()), scheme, kept, cache), kept

        expected = ReferenceOutputs(reference, data, samples=len(data))  # once for every attempt
        # The local order's doubling tries again the sets the measured order tried when their
        # first units agree: each set is quantized and checked once.
        tried: dict[frozenset[str], Attempt] = {}

        def attempt(unit_names: list[str]) -> Attempt:
            key = frozenset(unit_names)
            if key not in tried:
                quantized, kept = quantized_keeping(unit_names)
                tried[key] = (quantized, kept, check_against(expected, quantized, max_output_error),
                              tuple(sorted(planned_units)) + tuple(unit_names))
            return tried[key]

        best = attempt([])
        if best[2].failures() and keep_float_tail:
            most = int(MAX_FLOAT_UNIT_SHARE * len(units))
            for ranking in _sensitivity_rankings(prepared, best[0], data, reference, max_output_error,
                                                 quantized_keeping, units):
                best = _fewest_float(ranking[:most], attempt, best)
                if not best[2].failures():
                    break
    raise_if_broken(best[2], len(best[1]))
    return best


def _fewest_float(ranking: list[str], attempt: Callable[[list[str]], Attempt], failing: Attempt) -> Attempt:
    """The attempt keeping the fewest of `ranking`'s first units float that passes: 1, 2, 4, ... of
    them, then a bisection between the last count that failed and the first that passed, since every
    float node costs speed (YOLOv8n: 32 float Convs left INT8 at 1.07x, where all INT8 is 1.81x).
    The last attempt when none passes; `failing` (nothing kept float) when `ranking` is empty."""
    best, failed, count = failing, 0, 0
    while best[2].failures() and count < len(ranking):
        failed, count = count, min(2 * count or 1, len(ranking))
        best = attempt(ranking[:count])
    passed = count if not best[2].failures() else None
    for _ in range(_BISECTION_STEPS if passed else 0):
        if passed - failed <= 1:
            break
        middle = (failed + passed) // 2
        tried = attempt(ranking[:middle])
        if tried[2].failures():
            failed = middle
        else:
            best, passed = tried, middle
    return best


def _float_units(prepared: ir.Model) -> dict[str, list[str]]:
    """The compute nodes that are kept float together, by unit name: a decomposed layer's chain is one
    unit (its layer's name), any other compute node its own. A chain in INT8 rounds every tensor
    between its stages, and keeping one stage float leaves the others' tensors rounded: on NudeNet's
    YOLOv8n at 2x (31 chains), its chains in INT8 left the class scores 1.03 off the float model's
    and 15% of the top-10 anchors; the chains float, 0.26 and 86%; the 33 other convs float, no
    better than none."""
    units: dict[str, list[str]] = {}
    for node in prepared.graph:
        if node.op_type in COMPUTE_OPS:
            units.setdefault(naming.layer_of(node.name), []).append(node.name)
    return units


def _sensitivity_rankings(prepared: ir.Model, quantized: ir.Model, data: np.ndarray, reference,
                          max_output_error: float, quantized_keeping: Callable[[list[str]], tuple[ir.Model, dict]],
                          units: dict[str, list[str]]) -> Iterator[list[str]]:
    """Orders in which to keep float the units (_float_units) still INT8 in `quantized`. First by each
    one's measured gain at the outputs (the first _SCANNED_CANDIDATES by the local estimate): YOLOv8n
    passes with 4 float convs where the local order needed 30. Then by the local estimate alone, for
    models whose error falls only once many nodes are float together: on PP-OCRv4's detector two
    convs take most of the error off alone, the next scanned gain little one by one, and the measured
    order missed the check with half its convs float where the local one passes. A unit ranks where
    its first node does in the local estimate."""
    unit_of = {node: unit for unit, nodes in units.items() for node in nodes}
    nodes = rank_by_added_error(prepared, quantized, data[:_SENSITIVITY_SAMPLES])
    local = list(dict.fromkeys(unit_of[node] for node in nodes if node in unit_of))  # not the plan's float
    scan = ReferenceOutputs(reference, data[:_SCAN_SAMPLES], samples=_SCAN_SAMPLES)

    def shortfall_with_float(name: str) -> float:
        return check_against(scan, quantized_keeping([name])[0], max_output_error).shortfall()

    yield rank_by_measured_gain(local[:_SCANNED_CANDIDATES], shortfall_with_float) + local[_SCANNED_CANDIDATES:]
    yield local


def _check_options(weights: str, calibration_method: str, target: str, max_output_error: float) -> None:
    if weights not in ("int8", "uint8"):
        raise UsageError(f"expected 'int8' or 'uint8', got {weights!r}", option="weights")
    if calibration_method not in _METHODS:
        raise UsageError(f"expected one of {', '.join(_METHODS)}, got {calibration_method!r}",
                         option="calibration_method")
    check_target(target)
    if isinstance(max_output_error, bool) or not isinstance(max_output_error, (int, float)) or not max_output_error > 0:
        raise UsageError(f"expected a positive number, got {max_output_error!r}", option="int8_max_error")


def _prepared(source: ir.Model) -> ir.Model:
    """The model as onnxruntime's quantizer will see it (pre-processed), every node named: names
    are what it excludes nodes by, and pre-processing may add unnamed ones."""
    with tempfile.TemporaryDirectory(prefix="onnx-cp-int8-") as folder, _quiet():
        fp32_path = Path(folder) / "fp32.onnx"
        model_io.save_model(source, fp32_path, external_data=False)
        prepared = model_io.load_model(_preprocessed(fp32_path, Path(folder) / "prepared.onnx"))
        ir.external_data.load_to_model(prepared)  # the temporary folder goes away
    prepared = _at_least_opset(prepared, _QDQ_OPSET)
    name_unnamed_nodes(prepared)  # after the conversion, which adds unnamed nodes (the CRNN: 1)
    return prepared


# Per-channel DequantizeLinear (its axis attribute) needs opset 13: older models (ddddocr's CRNN
# is opset 12) are converted first, or onnxruntime writes a model that does not load.
_QDQ_OPSET = 13


def _at_least_opset(model: ir.Model, opset: int) -> ir.Model:
    if model.opset_imports.get("", 1) >= opset:
        return model
    try:
        converted = onnx.version_converter.convert_version(ir.to_proto(model), opset)
    except Exception as exc:  # noqa: BLE001 - the converter raises several types
        raise OnnxCpError(f"INT8 needs opset {opset}; converting the model from opset "
                          f"{model.opset_imports.get('', 1)} failed: {first_line(exc)}") from None
    return ir.from_proto(converted)


def _qdq(prepared: ir.Model, reader: _Batches, scheme: Int8Scheme, exclude: dict[str, str], cache: Path) -> ir.Model:
    """onnxruntime's static QDQ quantization of `prepared`, the nodes in `exclude` left float. The
    activation ranges are calibrated once and kept in `cache` for the next call on the same model."""
    with tempfile.TemporaryDirectory(prefix="onnx-cp-int8-") as folder, _quiet():
        fp32_path, int8_path = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        model_io.save_model(prepared, fp32_path, external_data=False)
        try:
            quantize_static(
                fp32_path, int8_path, reader, quant_format=QuantFormat.QDQ,
                per_channel=scheme.per_channel, reduce_range=scheme.weight_bits == 7,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8 if scheme.weights == "int8" else QuantType.QUInt8,
                calibrate_method=_METHODS[scheme.calibration], nodes_to_exclude=list(exclude),
                calibration_cache_path=cache,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                               "CalibStridedMinMax": _chunk(len(reader))},  # strides serve every method
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises many kinds
            raise OnnxCpError(f"INT8 quantization failed: {first_line(exc)}") from None
        quantized = model_io.load_model(int8_path)
        ir.external_data.load_to_model(quantized)  # the temporary folder goes away
    return quantized


def _preprocessed(path: Path, out: Path) -> Path:
    """onnxruntime's recommended pre-processing (shape inference, Conv+BatchNorm folding);
    the model as it is when that fails (some exporters' shapes defeat symbolic inference)."""
    try:
        quant_pre_process(path, out, skip_symbolic_shape=True)
        return out
    except Exception:  # noqa: BLE001
        return path


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizer logs advice to the root logger at WARNING, and its histogram
    calibrators print progress to stdout: keep the user's terminal clean."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _calibration_source(calibration, samples: int, model: ir.Model, input_name: str
                        ) -> Callable[[], Iterator[np.ndarray]]:
    """A function giving a fresh iterator over the calibration batches (of the model's fixed batch
    size, if it has one): equalization and onnxruntime's calibrator each read them once."""
    from onnx_cp.data import first_inputs

    batches = model_batches(model, input_name, first_inputs(calibration, samples), _CALIBRATION_BATCH)
    return lambda: iter(batches)
