"""--max-error on layer outputs: the error measured on sample inputs is the layer's real output
error (checked against the rewritten model in onnxruntime), it is far below the kernel error on
inputs that span few directions, and the default policy then picks smaller ranks."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import model_factory
import onnx_cp
from onnx_cp.cli import main as cli_main
from onnx_cp.cp import decompose
from onnx_cp.graph import find_conv_sites
from onnx_cp.ranks.output_error import OutputError
from onnx_cp.runtime.cpu import CHANNEL_BLOCK_ENV, channel_block
from onnx_cp.runtime.tensors import tensor_values
from onnx_cp.settings import ErrorBudget, SolverSettings


def conv_output(model: onnx.ModelProto, value: str, x: np.ndarray) -> np.ndarray:
    return tensor_values(model, [value], "x", x)[0]


@pytest.fixture(scope="module")
def layer():
    """A 5x5 Conv whose kernel is rank 4 on input channels 0-3 plus noise on channels 4-7, which
    the data never excites (dead channels): far from low rank as a kernel, exactly rank 4 on the
    data; the inputs are smooth images on channels 0-3."""
    low = model_factory.low_rank_kernel(16, 4, 5, 5, rank=4, seed=0)
    noise = np.random.default_rng(0).standard_normal((16, 4, 5, 5))
    kernel = np.concatenate([low / np.linalg.norm(low), 0.6 * noise / np.linalg.norm(noise)], axis=1)
    bias = np.random.default_rng(1).standard_normal(16).astype(np.float32)
    model = model_factory.conv_model(kernel.astype(np.float32), bias, input_shape=["N", 8, 16, 16], pads=[2, 2, 2, 2])
    x = model_factory.smooth_inputs(64, seed=0, channels=8)
    x[:, 4:] = 0
    return model, x


def test_output_error_is_the_rewritten_layers_output_error(layer):
    original, x = layer
    model = ir.from_proto(original)
    site, = find_conv_sites(model, {"x": [1, 8, 16, 16], "y": [1, 16, 16, 16]})
    error_of = OutputError(model, [site], x)
    results = [decompose(k, 8, seed=0) for k in site.group_kernels()]
    measured = error_of(site, results)

    solver = SolverSettings(workers=1, decomposer=lambda k, r: results[0])
    rewritten = onnx_cp.optimize(original, 8, solver=solver).model
    target = conv_output(original, "y", x)
    actual = np.linalg.norm(conv_output(rewritten, "y", x) - target) / np.linalg.norm(target)
    assert measured == pytest.approx(actual, rel=1e-3)
    assert measured < 0.2 * results[0].rel_error  # the error sits where the data never looks


@pytest.mark.parametrize("block", [8, 16])  # AVX2 and AVX-512 channel grids
def test_default_policy_on_outputs_takes_ranks_the_kernel_error_refuses(layer, tmp_path, monkeypatch, block):
    monkeypatch.setenv(CHANNEL_BLOCK_ENV, str(block))
    original, x = layer
    np.savez(tmp_path / "samples.npz", x=x)
    on_kernel = onnx_cp.optimize(original, ErrorBudget(0.2), solver=SolverSettings(workers=1)).report
    on_outputs = onnx_cp.optimize(original, ErrorBudget(0.2, str(tmp_path / "samples.npz")),
                                  solver=SolverSettings(workers=1)).report
    assert on_kernel["layers"][0]["status"] == "skipped" and "kernel error" in on_kernel["layers"][0]["reason"]
    row = on_outputs["layers"][0]
    # the data spans 4 of 8 input channels: rank 8 is exact on it, or the smallest grid rank
    assert row["status"] == "decomposed" and row["rank"] <= max(8, block) and "output error" in row["note"]
    assert on_outputs["settings"]["max_error_on"] == "layer outputs"


def test_error_data_with_explicit_ranks_is_a_usage_error(layer, tmp_path):
    original, x = layer
    onnx.save(original, tmp_path / "m.onnx")
    np.savez(tmp_path / "samples.npz", x=x)
    code = cli_main(["optimize", str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx"), "--rank", "4",
                     "--error-data", str(tmp_path / "samples.npz")])
    assert code == 2 and not (tmp_path / "o.onnx").exists()


def test_search_menus_with_data_hold_data_aware_svd_that_the_final_model_keeps(tmp_path, monkeypatch):
    """With sample data the searches' menus judge options by layer-output error, and a 1x1 conv's
    channel SVD is the solve optimal on that data: full rank as a weight, near exact at the block
    rank on inputs that span that many directions. The plan's refinement keeps those factors, so the
    rewritten model (onnxruntime) shows the error the menu promised."""
    monkeypatch.setenv("ONNX_CP_CACHE_DIR", str(tmp_path / "cache"))
    from onnx_cp.graph import CPConvPass
    from onnx_cp.ranks import search
    from onnx_cp.ranks.solve import Refiner, make_solver

    rng = np.random.default_rng(5)
    channels, b = 64, channel_block()
    kernel = rng.standard_normal((channels, channels, 1, 1)).astype(np.float32)
    original = model_factory.conv_model(kernel, input_shape=["N", channels, 8, 8])
    mixing = rng.standard_normal((channels, b))
    x = np.einsum("cd,ndyx->ncyx", mixing, rng.standard_normal((32, b, 8, 8))).astype(np.float32)
    model = ir.from_proto(original)
    shapes = {"x": [1, channels, 8, 8], "y": [1, channels, 8, 8]}
    site, = find_conv_sites(model, shapes)
    solver = make_solver(SolverSettings(workers=1), 0)
    error_of = OutputError(model, [site], x)
    blind, = search.layer_menus([site], solver, {site.name: 1.0}, threads=1)[0]
    aware, = search.layer_menus([site], solver, {site.name: 1.0}, threads=1, error_of=error_of)[0]

    def at_block(menu):
        return next(o for o in menu.options if o.form == "svd" and o.rank == b)

    option = at_block(aware)
    assert option.error < 0.01 and option.measure.startswith("layer output error")
    assert at_block(blind).error > 0.5  # a random square matrix is far from rank b as a weight
    plan = Refiner([site], solver)(search.to_plan({site.name: option}, "chosen", "kept"))
    rewritten = model.clone()
    CPConvPass(plan, sites=find_conv_sites(rewritten, shapes))(rewritten)
    target = conv_output(original, "y", x)
    actual = np.linalg.norm(conv_output(ir.to_proto(rewritten), "y", x) - target) / np.linalg.norm(target)
    assert actual == pytest.approx(option.error, abs=1e-4)
