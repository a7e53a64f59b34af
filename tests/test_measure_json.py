"""The typed results' to_json() is the public JSON (bench, profile, eval): these keys, in this
order, plain JSON types, and the same values as the fields, so the JSON rebuilds the result."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import model_factory
from onnx_cp.measure import (
    AccuracyResult,
    LatencyResult,
    LayerProfile,
    LayerTime,
    ModelLatency,
    benchmark_latency,
    evaluate,
    layer_profile,
)

LATENCY_KEYS = ["tool", "kind", "models", "threads", "inter_op_threads", "execution_mode", "batch",
                "optimization", "optimization_level", "runs", "warmup", "block", "order", "onnxruntime",
                "provider", "machine"]
MODEL_KEYS = ["name", "path", "input_shapes", "median_ms", "p10_ms", "p90_ms", "mean_ms", "min_ms", "runs",
              "ratio_to_first", "speedup_vs_first"]
MACHINE_KEYS = ["cpu_count", "processor", "cpu", "cpu_features", "platform", "python"]
PROFILE_KEYS = ["kind", "name", "path", "threads", "batch", "input_shapes", "optimization", "runs", "total_ms",
                "run_median_ms", "layers"]
LAYER_KEYS = ["name", "ms", "share", "ops", "kernels"]
ACCURACY_KEYS = ["kind", "model", "data", "n", "top1", "top5", "top_k", "num_classes", "output", "seconds"]
REFERENCE_KEYS = ["reference", "agreement_top1", "max_abs_error", "mean_abs_error", "reference_top1",
                  "reference_top5"]


def _plain_json(data: dict) -> dict:
    assert json.loads(json.dumps(data)) == data  # plain JSON types only
    return data


def _fields(data: dict, cls) -> dict:
    """The JSON entries that are fields of `cls` (not the "tool" / "kind" tags)."""
    return {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}


def test_latency_json():
    result = benchmark_latency([model_factory.tiny_cnn(), model_factory.tiny_cnn(seed=1)], runs=2, warmup=0)
    data = _plain_json(result.to_json())
    assert list(data) == LATENCY_KEYS
    assert data["kind"] == "latency" and data["tool"].startswith("onnx-cp ")
    assert all(list(m) == MODEL_KEYS for m in data["models"])
    assert list(data["machine"]) == MACHINE_KEYS
    rebuilt = LatencyResult(**{**_fields(data, LatencyResult),
                               "models": [ModelLatency(**m) for m in data["models"]]})
    assert rebuilt == result


def test_profile_json():
    profile = layer_profile(model_factory.tiny_cnn(), runs=2, warmup=0)
    data = _plain_json(profile.to_json())
    assert list(data) == PROFILE_KEYS and data["kind"] == "profile"
    assert data["layers"] and all(list(layer) == LAYER_KEYS for layer in data["layers"])
    rebuilt = LayerProfile(**{**_fields(data, LayerProfile),
                              "layers": [LayerTime(**layer) for layer in data["layers"]]})
    assert rebuilt == profile


@pytest.mark.parametrize("with_reference", [False, True])
def test_accuracy_json(tmp_path, with_reference):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((6, 3, 16, 16)).astype(np.float32),
             y=rng.integers(0, 10, 6))
    reference = model_factory.tiny_cnn(seed=1) if with_reference else None
    result = evaluate(model_factory.tiny_cnn(), str(tmp_path / "d.npz"), reference=reference)
    data = _plain_json(result.to_json())
    # the reference keys are there only with a reference
    assert list(data) == ACCURACY_KEYS + (REFERENCE_KEYS if with_reference else [])
    assert data["kind"] == "accuracy"
    assert AccuracyResult(**_fields(data, AccuracyResult)) == result
