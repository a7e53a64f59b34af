"""Parity of the interpreter with onnxruntime on whole models: the test factory's CNN, every
shipped model in models/, and their CP-rewritten versions, at two batch sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

import model_factory
import onnx_cp
from onnx_cp.finetune import to_torch
from onnx_cp.runtime.inputs import fill_input_shapes, random_inputs
from onnx_cp.runtime.session import run_model
from onnx_cp.settings import SolverSettings

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "models").glob("*.onnx"))
RTOL = 1e-4


def _random_factors(kernel: np.ndarray, rank: int):
    """Any factors will do for parity (and they are instant): the chain's numbers, not its
    accuracy, are under test."""
    rng = np.random.default_rng(rank)
    return [rng.standard_normal((n, rank)) * 0.5 for n in kernel.shape]


def _parity(model: onnx.ModelProto | ir.Model, batches=(1, 3)) -> None:
    ir_model = model if isinstance(model, ir.Model) else ir.serde.deserialize_model(model)
    module = to_torch(ir_model).eval()
    names = [v.name for v in ir_model.graph.outputs]
    for batch in batches:
        shapes = {name: [batch] + dims[1:]
                  for name, dims in fill_input_shapes(ir_model).items()}
        feeds = random_inputs(ir_model, shapes, seed=batch)
        expected = run_model(ir_model, feeds, "model")
        with torch.no_grad():
            got = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        got = got if isinstance(got, tuple) else (got,)
        for name, e, g in zip(names, expected, got):
            g = g.numpy()
            assert g.shape == e.shape, name
            err = np.abs(g.astype(np.float64) - e).max() / max(np.abs(e).max(), 1e-6)
            assert err <= RTOL, f"{name}: relative error {err:.2e} at batch {batch}"


def _rewritten(model, rank: int = 4):
    return onnx_cp.optimize(model, rank, solver=SolverSettings(workers=1, decomposer=_random_factors)).model


def test_tiny_cnn_parity():
    _parity(model_factory.tiny_cnn())


def test_tiny_cnn_cp_rewrite_parity():
    rewritten = _rewritten(model_factory.tiny_cnn())
    assert any("/cp/" in n.name for n in rewritten.graph.node)
    _parity(rewritten)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_model_parity(path):
    _parity(onnx_cp.runtime.model_io.load_model(path))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_model_cp_rewrite_parity(path):
    rewritten = _rewritten(onnx_cp.runtime.model_io.load_model(path))
    _parity(rewritten)


def test_grouped_strided_conv_cp_rewrite_parity():
    kernel = model_factory.low_rank_kernel(8, 2, 5, 3, 3).astype(np.float32)
    model = model_factory.conv_model(kernel, np.ones(8, np.float32), input_shape=("N", 4, 13, 11),
                                     group=2, strides=[2, 1], pads=[2, 1, 1, 0])
    _parity(_rewritten(model, rank=3))
