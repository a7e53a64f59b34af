"""benchmark_latency: the documented JSON fields with sane values (no timing assertions)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from test_measure_profile import chain_cnn

import model_factory
from onnx_cp.errors import UsageError
from onnx_cp.measure import benchmark_latency, format_table
from onnx_cp.runtime.session import usable_cores


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("latency")
    paths = [folder / "original.onnx", folder / "optimized.onnx"]
    onnx.save(model_factory.tiny_cnn(), paths[0])
    onnx.save(chain_cnn(), paths[1])
    return [str(p) for p in paths]


def test_fields_and_sane_values(pair):
    typed = benchmark_latency(pair, runs=7, warmup=2)
    result = typed.to_json()
    json.dumps(result)  # plain JSON types only
    assert result["threads"] == 1 and result["batch"] == 1 and result["inter_op_threads"] == 1
    assert result["optimization"] == "all" and result["optimization_level"] == "ORT_ENABLE_ALL"
    assert result["runs"] == 7 and result["warmup"] == 2
    assert [m["name"] for m in result["models"]] == ["original", "optimized"]
    for model, path in zip(result["models"], pair):
        assert model["path"] == path
        assert model["runs"] == 7
        assert 0 < model["min_ms"] <= model["p10_ms"] <= model["median_ms"] <= model["p90_ms"]
        assert model["input_shapes"] == {"x": [1, 3, 16, 16]}
    first, second = result["models"]
    assert first["ratio_to_first"] == 1.0 and first["speedup_vs_first"] == 1.0
    assert second["ratio_to_first"] == pytest.approx(second["median_ms"] / first["median_ms"])
    assert second["speedup_vs_first"] == pytest.approx(1 / second["ratio_to_first"])
    table = format_table(typed)
    assert "original" in table and "optimized" in table and "median ms" in table


def test_runs_go_in_blocks_each_after_an_unrecorded_run(pair, monkeypatch):
    from onnx_cp.measure import latency

    calls = []
    real_run = latency.run
    monkeypatch.setattr(latency, "run", lambda session, feed, name: calls.append(name) or real_run(session, feed, name))
    result = benchmark_latency(pair, runs=7, warmup=2, block=3)
    assert result.block == 3 and all(m.runs == 7 for m in result.models)
    a, b = pair
    # warm-up, then per round: one unrecorded run and the block, model after model (3 + 3 + 1)
    assert calls == [a] * 2 + [b] * 2 + [a] * 4 + [b] * 4 + [a] * 4 + [b] * 4 + [a] * 2 + [b] * 2


def test_accepts_protos_batch_threads_and_levels():
    models = [model_factory.tiny_cnn(), model_factory.tiny_cnn(seed=1)]
    result = benchmark_latency(models, runs=2, warmup=0, batch=3, threads="all",
                               optimization="none", names=["a", "b"])
    assert result.threads == usable_cores()
    assert result.optimization_level == "ORT_DISABLE_ALL"
    assert [m.name for m in result.models] == ["a", "b"]
    assert all(m.path is None for m in result.models)
    assert all(m.input_shapes == {"x": [3, 3, 16, 16]} for m in result.models)


def test_input_shape_overrides_batch():
    result = benchmark_latency(model_factory.tiny_cnn(), runs=1, warmup=0, batch=4,
                               input_shapes={"x": [2, 3, 16, 16]})
    assert result.models[0].input_shapes == {"x": [2, 3, 16, 16]}


@pytest.mark.parametrize("kwargs, message", [
    ({"optimization": "fast"}, "optimization"),
    ({"input_shapes": {"image": [1, 3, 16, 16]}}, "unknown input"),
    ({"input_shapes": {"x": [1, 3, 20, 20]}}, "does not fit"),
    ({"input_shapes": {"x": [1, 3, 16]}}, "does not fit"),
    ({"runs": 0}, "runs"),
    ({"block": 0}, "block"),
    ({"threads": -2}, "threads"),
    ({"threads": "many"}, "threads"),
])
def test_bad_options_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        benchmark_latency(model_factory.tiny_cnn(), **{"runs": 1, "warmup": 0, **kwargs})


def test_fixed_batch_refuses_another_batch():
    model = chain_cnn(batch=1)
    with pytest.raises(UsageError, match="fixed batch dimension 1"):
        benchmark_latency(model, runs=1, warmup=0, batch=2)


def test_fast_speedup_is_the_ratio_of_tenth_percentiles():
    """A busy machine slows some runs of either model: the speed-up the searches read compares the
    fast runs, so a burst of interference on one model's runs moves its median, not this."""
    from onnx_cp.measure.latency import LatencyResult, ModelLatency

    def model(name: str, samples: list[float]) -> ModelLatency:
        ms = np.asarray(samples)
        return ModelLatency(name, None, {}, float(np.median(ms)), float(np.percentile(ms, 10)),
                            float(np.percentile(ms, 90)), float(ms.mean()), float(ms.min()), len(ms), None, None)

    quiet = [1.0] * 20
    busy = [0.1] * 12 + [0.5] * 8  # interference on 40% of the fast model's runs
    result = LatencyResult(models=[model("a", quiet), model("b", busy)], threads=1, batch=1, optimization="all",
                           optimization_level="all", runs=20, warmup=0, block=10, machine={})
    assert result.models[1].median_ms == pytest.approx(0.1)
    assert result.fast_speedup(1) == pytest.approx(10.0)
    busier = [0.1] * 8 + [0.5] * 12
    result.models[1] = model("b", busier)
    assert result.models[0].median_ms / result.models[1].median_ms == pytest.approx(2.0)  # the median's reading
    assert result.fast_speedup(1) == pytest.approx(10.0)
