"""The CP engine: exact recovery, monotone objective, determinism, edge shapes, stability."""

from __future__ import annotations

import math

import numpy as np
import pytest

import model_factory
from onnx_cp.cp import CPResult, component_norms, decompose, decompose_many, reconstruct
from onnx_cp.errors import UsageError


def rel_err(kernel: np.ndarray, factors) -> float:
    return float(np.linalg.norm(kernel - reconstruct(factors)) / np.linalg.norm(kernel))


def structured_kernel(t=24, s=16, kh=3, kw=3, seed=0) -> np.ndarray:
    """Trained-like: smooth filters mixed by decaying low-rank channel maps, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, kh), np.linspace(-1, 1, kw), indexing="ij")
    kernel = np.zeros((t, s, kh, kw))
    for d in range(kh * kw):
        a, b, c = rng.standard_normal(3)
        filt = np.cos(2 * (a * yy + b * xx) + c) * np.exp(-(yy**2 + xx**2))
        mix = rng.standard_normal((t, 4)) @ rng.standard_normal((4, s)) * np.exp(-d / 2)
        kernel += mix[:, :, None, None] * filt
    return kernel + 0.1 * kernel.std() * rng.standard_normal(kernel.shape)


@pytest.mark.parametrize("shape,rank", [((16, 8, 3, 3), 5), ((32, 24, 3, 3), 16),
                                        ((12, 6, 5, 3), 7), ((8, 8, 1, 5), 4), ((10, 6, 9, 9), 12)])
def test_exact_recovery_nls(shape, rank):
    kernel = model_factory.low_rank_kernel(*shape, rank, seed=1).astype(np.float64)
    res = decompose(kernel, rank)
    assert res.rel_error < 1e-6
    assert rel_err(kernel, res.factors) == pytest.approx(res.rel_error, abs=1e-9)
    assert res.converged
    assert [a.shape for a in res.factors] == [(n, rank) for n in shape]
    assert all(a.dtype == np.float64 for a in res.factors)


def test_exact_recovery_als():
    kernel = model_factory.low_rank_kernel(16, 12, 3, 3, 6, seed=2).astype(np.float64)
    res = decompose(kernel, 6, method="als", tol=1e-14, max_iter=2000)
    assert res.method == "als"
    assert res.rel_error < 1e-5


@pytest.mark.parametrize("method", ["nls", "als"])
def test_noisy_recovery_reaches_noise_level(method):
    rng = np.random.default_rng(3)
    clean = model_factory.low_rank_kernel(24, 16, 3, 3, 8, seed=3).astype(np.float64)
    noise = rng.standard_normal(clean.shape)
    noise *= 1e-3 * np.linalg.norm(clean) / np.linalg.norm(noise)
    res = decompose(clean + noise, 8, method=method, max_iter=300 if method == "nls" else 1000)
    noise_level = 1e-3 / np.sqrt(1 + 1e-6)
    # The best rank-8 fit absorbs a little of the noise: error slightly below the noise level.
    assert 0.8 * noise_level < res.rel_error < 1.05 * noise_level
    assert rel_err(clean, res.factors) < 1e-3


@pytest.mark.parametrize("method", ["nls", "als"])
def test_objective_never_increases(method):
    kernel = structured_kernel()
    seen = []
    res = decompose(kernel, 10, method=method, max_iter=60,
                    callback=lambda it, f: seen.append(f))
    hist = np.array(res.history)
    assert len(hist) > 10
    assert np.all(np.diff(hist) <= 1e-13 * hist[0])
    assert seen == res.history  # iteration 0 is the starting point
    # The objective is 0.5 * rel_error^2 plus the small ridge penalty.
    assert np.sqrt(2 * hist[-1]) == pytest.approx(res.rel_error, rel=2e-2)


def test_nls_beats_als_at_equal_iterations():
    kernel = structured_kernel(seed=4)
    als = decompose(kernel, 12, method="als", max_iter=60, tol=0)
    nls = decompose(kernel, 12, method="nls", max_iter=35, als_warm_start=25, tol=0)
    assert nls.rel_error <= als.rel_error


def test_deterministic_under_seed():
    kernel = structured_kernel(seed=5)
    a = decompose(kernel, 9, init="random", seed=7, max_iter=30)
    b = decompose(kernel, 9, init="random", seed=7, max_iter=30)
    c = decompose(kernel, 9, init="random", seed=8, max_iter=30)
    for fa, fb in zip(a.factors, b.factors, strict=True):
        np.testing.assert_array_equal(fa, fb)
    assert a.history == b.history
    assert not np.array_equal(a.factors[0], c.factors[0])


def test_decompose_many_same_results_for_any_worker_count():
    jobs = [(structured_kernel(12, 8, 3, 3, seed=i), r) for i, r in enumerate([4, 6, 3])]
    one = decompose_many(jobs, workers=1, max_iter=20)
    two = decompose_many(jobs, workers=2, max_iter=20)
    auto = decompose_many(jobs, max_iter=20)  # small jobs: runs inline
    assert len(one) == len(two) == 3
    for ra, rb, rc, (kernel, rank) in zip(one, two, auto, jobs, strict=True):
        assert ra.rank == rank
        for fa, fb, fc in zip(ra.factors, rb.factors, rc.factors, strict=True):
            np.testing.assert_array_equal(fa, fb)
            np.testing.assert_array_equal(fa, fc)
        direct = decompose(kernel, rank, max_iter=20)
        np.testing.assert_array_equal(direct.factors[0], ra.factors[0])


def test_factors_are_balanced_and_sorted():
    res = decompose(structured_kernel(seed=6), 8, max_iter=40)
    norms = np.stack([np.linalg.norm(a, axis=0) for a in res.factors])
    np.testing.assert_allclose(norms, np.broadcast_to(norms[0], norms.shape), rtol=1e-10)
    comps = component_norms(res.factors)
    assert np.all(np.diff(comps) <= 0)
    assert res.max_component_norm == pytest.approx(comps[0] / np.linalg.norm(structured_kernel(seed=6)))


@pytest.mark.parametrize("shape,rank", [((6, 4, 3, 3), 20), ((5, 7, 3, 5), 4), ((8, 3, 1, 7), 3),
                                        ((4, 4, 7, 1), 2), ((9, 5, 3, 3), 1), ((3, 2, 2, 2), 30)])
@pytest.mark.parametrize("method", ["nls", "als"])
def test_edge_shapes_give_finite_sensible_results(shape, rank, method):
    kernel = structured_kernel(*shape, seed=7)
    res = decompose(kernel, rank, method=method, max_iter=50)
    assert [a.shape for a in res.factors] == [(n, rank) for n in shape]
    assert all(np.all(np.isfinite(a)) for a in res.factors)
    assert 0.0 <= res.rel_error <= 1.0
    assert res.rel_error == pytest.approx(rel_err(kernel, res.factors), abs=1e-9)


def test_rank_one_matches_best_rank_one_of_rank_one_kernel():
    kernel = model_factory.low_rank_kernel(7, 5, 3, 3, 1, seed=8).astype(np.float64)
    res = decompose(kernel, 1)
    assert res.rel_error < 1e-7


def test_high_rank_fits_better_than_low_rank():
    kernel = structured_kernel(seed=9)
    errors = [decompose(kernel, r, max_iter=60).rel_error for r in (2, 8, 32)]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("method", ["nls", "als"])
def test_all_zero_kernel(method):
    res = decompose(np.zeros((4, 3, 3, 3), dtype=np.float32), 5, method=method)
    assert res.rel_error == 0.0
    assert res.max_component_norm == 0.0
    assert all(a.shape == (n, 5) and not a.any() for a, n in zip(res.factors, (4, 3, 3, 3), strict=True))
    assert isinstance(res, CPResult) and res.converged


def test_float32_and_float16_inputs_work_in_float64():
    kernel = model_factory.low_rank_kernel(8, 6, 3, 3, 3, seed=10)
    for dtype in (np.float32, np.float16):
        res = decompose(kernel.astype(dtype), 3)
        assert res.factors[0].dtype == np.float64
        assert res.rel_error < 1e-2


def test_bound_keeps_component_norms_below_it():
    kernel = structured_kernel(24, 16, 3, 3, seed=11)
    free = decompose(kernel, 24, ridge=0.0, max_iter=60)
    bound = 0.5
    assert free.max_component_norm > bound  # the unconstrained fit does exceed it
    held = decompose(kernel, 24, bound=bound, max_iter=60)
    assert held.max_component_norm <= bound * (1 + 1e-9)
    assert held.rel_error <= free.rel_error + 0.1


def test_default_ridge_keeps_terms_small_where_unregularised_grows():
    # A tensor of border rank 2 but rank 3: a*a*a*b + ... has no best rank-2 approximation;
    # unregularised solvers chase it with two huge, cancelling terms (the classic degeneracy).
    rng = np.random.default_rng(12)
    a = [rng.standard_normal(n) for n in (6, 5, 3, 3)]
    b = [rng.standard_normal(n) for n in (6, 5, 3, 3)]
    kernel = sum(np.einsum("t,s,y,x->tsyx", *[b[k] if k == j else a[k] for k in range(4)])
                 for j in range(4))
    free = decompose(kernel, 2, ridge=0.0, bound=math.inf, max_iter=300, tol=0)
    default = decompose(kernel, 2)
    assert free.max_component_norm > 20  # and still growing: no minimiser exists
    assert default.max_component_norm < 5
    assert default.converged and default.rel_error < 0.01
    # Even without the ridge, the default soft bound (20 * ||K||) reins the terms in.
    soft = decompose(kernel, 2, ridge=0.0, max_iter=300, tol=0)
    assert soft.max_component_norm <= 20


def test_time_limit_stops_early():
    kernel = structured_kernel(64, 48, 3, 3, seed=13)
    res = decompose(kernel, 48, time_limit=0.05, max_iter=10_000, tol=0)
    assert not res.converged and res.stop_reason == "time_limit"
    assert res.seconds < 5.0  # generous: the machine is shared; the point is it stopped
    assert np.all(np.isfinite(res.factors[0]))


def test_warm_start_from_given_factors():
    kernel = structured_kernel(seed=14)
    first = decompose(kernel, 6, max_iter=20)
    again = decompose(kernel, 6, init=first.factors, max_iter=20)
    assert again.rel_error <= first.rel_error + 1e-12


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank"), (dict(rank=-3), "rank"), (dict(rank=2.5), "rank"),
    (dict(rank=True), "rank"), (dict(method="cg"), "method"), (dict(init="magic"), "init"),
    (dict(bound=0), "bound"), (dict(time_limit=-1), "time_limit"), (dict(ridge=-1e-3), "ridge"),
    (dict(kernel=np.zeros((3, 3, 3))), "4-D"), (dict(kernel=np.full((2, 2, 3, 3), np.nan)), "NaN"),
    (dict(init=[np.zeros((2, 2))] * 4), "shape"),
])
def test_invalid_arguments_raise_usage_error(kwargs, match):
    args = dict(kernel=np.ones((4, 3, 3, 3)), rank=2) | kwargs
    with pytest.raises(UsageError, match=match):
        decompose(args.pop("kernel"), args.pop("rank"), **args)


def test_decompose_many_rejects_bad_jobs():
    with pytest.raises(UsageError, match="rank"):
        decompose_many([(np.ones((4, 3, 3, 3)), 0)], workers=2)
    with pytest.raises(UsageError, match="workers"):
        decompose_many([(np.ones((4, 3, 3, 3)), 2)], workers=0)
    assert decompose_many([], workers=2) == []


def test_reconstruct_is_the_cp_sum():
    rng = np.random.default_rng(15)
    factors = [rng.standard_normal((n, 4)) for n in (5, 3, 2, 4)]
    expected = np.einsum("tr,sr,yr,xr->tsyx", *factors)
    np.testing.assert_allclose(reconstruct(factors), expected, rtol=1e-12, atol=1e-12)


def test_restarts_keep_the_best_start():
    kernel = structured_kernel(seed=16)
    one = decompose(kernel, 6, max_iter=30)
    three = decompose(kernel, 6, max_iter=30, restarts=3)
    assert three.rel_error <= one.rel_error
    with pytest.raises(UsageError, match="restarts"):
        decompose(kernel, 6, restarts=0)


@pytest.mark.parametrize("init", ["svd", "hosvd", "random"])
def test_every_init_handles_rank_above_every_mode(init):
    kernel = structured_kernel(5, 4, 3, 2, seed=17)
    res = decompose(kernel, 24, init=init, max_iter=30)
    assert all(np.all(np.isfinite(a)) for a in res.factors)
    assert res.rel_error < 0.05  # 24 terms are plenty for a 5x4x3x2 tensor
