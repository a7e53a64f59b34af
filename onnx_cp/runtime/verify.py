"""Checks a rewritten model before anything is written: onnx.checker, an onnxruntime session,
and the outputs of original and rewritten models on the same random inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnx_cp.errors import OnnxCpError, first_line
from onnx_cp.runtime.fidelity import compare_output
from onnx_cp.runtime.inputs import random_inputs
from onnx_cp.runtime.session import run_model, run_source, serialized


def check_model(model: ir.Model) -> None:
    """onnx.checker with full shape inference (raises onnx.checker.ValidationError and friends)."""
    with serialized(model) as source:
        onnx.checker.check_model(source, full_check=True)


def compare_outputs(expected: list[np.ndarray], actual: list[np.ndarray], names: list[str]) -> dict:
    """Per output: max/mean absolute and relative (Frobenius) error, and the task-aware fidelity
    (kind, worst channel-group error, group errors, agreements; see runtime.fidelity)."""
    outputs = {}
    for name, a, b in zip(names, expected, actual):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a64.shape != b64.shape:
            raise OnnxCpError(f"output {name!r} changed shape from {a64.shape} to {b64.shape}")
        # Where the input model's own output is NaN/Inf (NaN weights, Log of a negative input, ...)
        # there is nothing to compare against: errors are measured on the other elements, and the
        # rewrite is blamed only for non-finite values where the input model's are finite.
        input_finite_mask = np.isfinite(a64)
        input_finite = bool(input_finite_mask.all())
        if not input_finite:
            a64 = np.where(input_finite_mask, a64, 0.0)
            b64 = np.where(input_finite_mask, b64, 0.0)
        diff = np.abs(a64 - b64)
        scale = np.linalg.norm(a64)
        finite = bool(np.all(np.isfinite(b64)))
        outputs[name] = {
            "max_abs_error": float(diff.max()) if diff.size else 0.0,
            "mean_abs_error": float(diff.mean()) if diff.size else 0.0,
            "rel_error": float(np.linalg.norm(a64 - b64) / scale) if scale > 0 else float(np.linalg.norm(b64)),
            "finite": finite,
        }
        if not input_finite:
            outputs[name]["input_finite"] = False
            outputs[name]["input_nonfinite_elements"] = int(input_finite_mask.size - input_finite_mask.sum())
        if finite and input_finite:
            fidelity = compare_output(name, a64, b64).to_json()
            fidelity.pop("rel_error")
            outputs[name].update(fidelity)
    return outputs


def verify_rewrite(
    original: ir.Model,
    rewritten: ir.Model,
    input_shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
) -> dict:
    """Checker, onnxruntime session and output comparison; raises OnnxCpError on failure."""
    notes = []
    with serialized(rewritten) as source:  # staged once for the checker and the session
        try:
            onnx.checker.check_model(source, full_check=True)
        except Exception as exc:  # noqa: BLE001 - checker failures come in several types
            try:
                check_model(original)
            except Exception:  # noqa: BLE001
                notes.append(f"the input model already fails onnx.checker: {first_line(exc)}")
            else:
                raise OnnxCpError(f"the rewritten model fails onnx.checker: {first_line(exc)}") from None
        feeds = random_inputs(original, input_shapes, seed=seed)
        expected = run_model(original, feeds, "input model")
        actual = run_source(source, feeds, "rewritten model")
    outputs = compare_outputs(expected, actual, [v.name for v in original.graph.outputs])
    if not all(o["finite"] for o in outputs.values()):
        raise OnnxCpError("the rewritten model produces NaN or infinity on random inputs "
                          "where the input model does not")
    broken = [name for name, o in outputs.items() if o.get("input_finite") is False]
    if broken:
        # Not the rewrite's fault, and not a reason to refuse: the rewritten model matches the input
        # wherever the input's outputs are finite (checked above); the report says what was compared.
        notes.append(f"the input model already produces NaN or infinity on random inputs (output "
                     f"{', '.join(map(repr, broken))}); compared only where its outputs are finite")
    return {
        "checker": "passed" if not notes else "input model fails too",
        "notes": notes,
        "input_shapes": {k: list(map(int, v.shape)) for k, v in feeds.items()},
        "outputs": outputs,
        "max_abs_error": max((o["max_abs_error"] for o in outputs.values()), default=0.0),
        "max_rel_error": max((o["rel_error"] for o in outputs.values()), default=0.0),
        "worst_group_error": max((o.get("worst_group_error", 0.0) for o in outputs.values()), default=0.0),
    }
