"""The low-rank solvers besides CP: Tucker-2 (HOOI), channel SVD, spatial SVD (numpy only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_cp.cp.blas import blas_threads
from onnx_cp.errors import UsageError
from onnx_cp.lowrank import (
    FORMS,
    SPATIAL_SVD,
    SVD,
    TUCKER2,
    channel_svd,
    channel_svd_errors,
    spatial_svd,
    spatial_svd_errors,
    tucker2,
)

MODELS = Path(__file__).resolve().parents[1] / "models"


def tucker2_kernel(t, s, kh, kw, r_in, r_out, seed=0):
    rng = np.random.default_rng(seed)
    core = rng.standard_normal((r_out, r_in, kh, kw))
    return np.einsum("bayx,tb,sa->tsyx", core, rng.standard_normal((t, r_out)), rng.standard_normal((s, r_in)))


def trained_kernels():
    model = onnx.load(str(MODELS / "charresnet.onnx"))
    kernels = [numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer]
    return [k for k in kernels if k.ndim == 4 and k.shape[2] == 3 and k.shape[1] >= 16][:3]


def test_tucker2_recovers_an_exact_tucker2_kernel():
    kernel = tucker2_kernel(12, 10, 3, 3, 4, 6)
    result = tucker2(kernel, (4, 6))
    assert result.rank == (4, 6)
    assert result.rel_error < 1e-10
    assert result.core.shape == (6, 4, 3, 3) and result.u_in.shape == (10, 4) and result.u_out.shape == (12, 6)
    np.testing.assert_allclose(FORMS[TUCKER2].reconstruct(result.factors), kernel, atol=1e-9 * np.abs(kernel).max())


def test_tucker2_factors_are_orthonormal_and_error_matches_reconstruction():
    kernel = np.random.default_rng(1).standard_normal((16, 8, 3, 3))
    result = tucker2(kernel, (5, 7))
    np.testing.assert_allclose(result.u_in.T @ result.u_in, np.eye(5), atol=1e-10)
    np.testing.assert_allclose(result.u_out.T @ result.u_out, np.eye(7), atol=1e-10)
    approx = FORMS[TUCKER2].reconstruct(result.factors)
    assert result.rel_error == pytest.approx(np.linalg.norm(kernel - approx) / np.linalg.norm(kernel), rel=1e-9)


def hosvd_error(kernel, r_in, r_out):
    t, s = kernel.shape[:2]
    u_out = np.linalg.svd(kernel.reshape(t, -1))[0][:, :r_out]
    u_in = np.linalg.svd(np.moveaxis(kernel, 1, 0).reshape(s, -1))[0][:, :r_in]
    core = np.einsum("tsyx,tb,sa->bayx", kernel, u_out, u_in)
    approx = np.einsum("bayx,tb,sa->tsyx", core, u_out, u_in)
    return np.linalg.norm(kernel - approx) / np.linalg.norm(kernel)


@pytest.mark.parametrize("index", range(2))
def test_tucker2_beats_its_hosvd_start_and_matches_tensorly_on_trained_kernels(index):
    tl_decomposition = pytest.importorskip("tensorly.decomposition")
    import tensorly as tl

    kernel = trained_kernels()[index]
    t, s = kernel.shape[:2]
    r_in, r_out = max(1, s // 4), max(1, t // 4)
    ours = tucker2(kernel, (r_in, r_out))
    assert ours.rel_error < hosvd_error(kernel, r_in, r_out) - 1e-4  # HOOI sweeps do improve on HOSVD
    with blas_threads(1):  # tensorly's many small products crawl on several threads of a busy machine
        (core, factors), _ = tl_decomposition.partial_tucker(kernel, rank=[r_out, r_in], modes=[0, 1],
                                                             init="svd", n_iter_max=100, tol=1e-8)
    theirs = np.linalg.norm(kernel - tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])) / np.linalg.norm(kernel)
    assert ours.rel_error <= theirs + 1e-6


def test_tucker2_zero_kernel_and_bad_ranks():
    assert tucker2(np.zeros((4, 4, 3, 3)), (2, 2)).rel_error == 0.0
    with pytest.raises(UsageError, match="exceed"):
        tucker2(np.ones((4, 3, 3, 3)), (4, 2))
    with pytest.raises(UsageError, match="two integers"):
        tucker2(np.ones((4, 3, 3, 3)), (0, 2))


def test_channel_svd_is_optimal_and_exact_at_full_rank():
    kernel = np.random.default_rng(2).standard_normal((8, 6, 3, 3))
    errors = channel_svd_errors(kernel)
    sigma = np.linalg.svd(kernel.reshape(8, -1), compute_uv=False)
    for rank in (1, 3, 8):
        result = channel_svd(kernel, rank)
        u, v = result.factors
        assert u.shape == (8, rank) and v.shape == (rank, 6, 3, 3)
        approx = FORMS[SVD].reconstruct(result.factors)
        actual = np.linalg.norm(kernel - approx) / np.linalg.norm(kernel)
        expected = np.sqrt((sigma[rank:] ** 2).sum() / (sigma ** 2).sum())  # Eckart-Young
        assert result.rel_error == pytest.approx(actual, abs=1e-12) == pytest.approx(expected, abs=1e-12)
        assert errors[rank] == pytest.approx(expected, abs=1e-12)
    assert channel_svd(kernel, 8).rel_error < 1e-12


def test_channel_svd_of_a_1x1_conv_is_two_thin_matrices():
    rng = np.random.default_rng(3)
    kernel = (rng.standard_normal((16, 3)) @ rng.standard_normal((3, 12)))[:, :, None, None]
    result = channel_svd(kernel, 3)
    assert result.rel_error < 1e-12
    np.testing.assert_allclose(FORMS[SVD].reconstruct(result.factors), kernel, atol=1e-10)


def test_data_aware_channel_svd_is_optimal_on_the_data():
    """With the input Gram matrix, channel SVD minimises the layer's output error on that data:
    a kernel of full rank whose inputs span 3 directions is near exact at rank 3 (the weight's own
    SVD is far off there), no rank-3 kernel does better on the data, and the reported error is the
    output error measured."""
    rng = np.random.default_rng(4)
    kernel = rng.standard_normal((16, 12, 1, 1))
    x = rng.standard_normal((12, 3)) @ rng.standard_normal((3, 4000)) + 1e-3 * rng.standard_normal((12, 4000))
    gram = x @ x.T
    matrix = kernel.reshape(16, 12)

    def output_error(result) -> float:
        approx = FORMS[SVD].reconstruct(result.factors).reshape(16, 12)
        return np.linalg.norm((matrix - approx) @ x) / np.linalg.norm(matrix @ x)

    aware, blind = channel_svd(kernel, 3, gram=gram), channel_svd(kernel, 3)
    assert aware.rel_error == pytest.approx(output_error(aware), rel=1e-9)
    assert aware.rel_error < 0.01 < 0.3 < output_error(blind)
    for _ in range(5):  # random rank-3 competitors, fit to the data by least squares
        left = rng.standard_normal((16, 3))
        right = np.linalg.lstsq(left, matrix, rcond=None)[0]
        assert np.linalg.norm((matrix - left @ right) @ x) / np.linalg.norm(matrix @ x) >= aware.rel_error
    # whitened data: the data-aware solve is the weight's own SVD (up to the small ridge)
    same = channel_svd(kernel, 5, gram=np.eye(12) * 7.0)
    np.testing.assert_allclose(FORMS[SVD].reconstruct(same.factors),
                               FORMS[SVD].reconstruct(channel_svd(kernel, 5).factors), atol=1e-8)
    with pytest.raises(UsageError, match="Gram matrix"):
        channel_svd(kernel, 3, gram=np.eye(5))


def test_spatial_svd_recovers_a_separable_kernel():
    rng = np.random.default_rng(4)
    vertical = rng.standard_normal((2, 5, 3))  # (R, S, kh)
    horizontal = rng.standard_normal((7, 2, 4))  # (T, R, kw)
    kernel = np.einsum("trx,rsy->tsyx", horizontal, vertical)
    result = spatial_svd(kernel, 2)
    assert result.rel_error < 1e-12
    h, v = result.factors
    assert h.shape == (7, 2, 4) and v.shape == (2, 5, 3)
    np.testing.assert_allclose(FORMS[SPATIAL_SVD].reconstruct(result.factors), kernel, atol=1e-10)
    assert spatial_svd_errors(kernel)[2] < 1e-7 < spatial_svd_errors(kernel)[1]


def test_every_form_solves_through_the_registry():
    kernel = np.random.default_rng(5).standard_normal((8, 6, 3, 3))
    for name, form in FORMS.items():
        rank = (3, 4) if name == TUCKER2 else 3
        solution = form.solve(kernel, rank)
        approx = form.reconstruct(solution.factors)
        assert solution.rel_error == pytest.approx(np.linalg.norm(kernel - approx) / np.linalg.norm(kernel), rel=1e-6)
        assert 0 < solution.rel_error < 1


def test_a_menu_solving_one_matrix_at_many_ranks_gets_each_ranks_own_svd():
    """The SVD is kept for the last matrix: every rank is the truncation of that matrix's own
    SVD, and a new matrix is decomposed anew (not served the last one's factors)."""
    rng = np.random.default_rng(0)
    first, second = rng.standard_normal((2, 40, 30, 1, 1))
    for kernel in (first, second, first):
        for rank in (3, 7):
            u, v = channel_svd(kernel, rank).factors
            left, sigma, right = np.linalg.svd(kernel[:, :, 0, 0], full_matrices=False)
            np.testing.assert_allclose(u @ v[:, :, 0, 0], (left[:, :rank] * sigma[:rank]) @ right[:rank], atol=1e-10)
