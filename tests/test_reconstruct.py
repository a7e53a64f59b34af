"""Layer-wise reconstruction: each CP chain is fitted to the output of the layer it replaced, on
data; measured independently with onnxruntime; nothing but chain weights changes; the optimize
flow runs it before fine-tuning and reports it."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

import model_factory
import onnx_cp
from onnx_cp.cli import main as cli_main
from onnx_cp.finetune.reconstruct import reconstruct_layers
from onnx_cp.finetune.writeback import proto_copy
from onnx_cp.settings import FinetuneSettings, MeasureSettings, SolverSettings

torch.set_num_threads(1)
RANK = 4


def layer_output(model: onnx.ModelProto, name: str, x: np.ndarray) -> np.ndarray:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([name], {"x": x})[0]


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.square(a - b).mean() / np.square(b).mean()))


@pytest.fixture(scope="module")
def original():
    return model_factory.tiny_cnn(seed=3)


@pytest.fixture(scope="module")
def rewritten(original):
    return onnx_cp.optimize(original, RANK, solver=SolverSettings(workers=1)).model


@pytest.fixture(scope="module")
def reconstructed(original, rewritten):
    return reconstruct_layers(rewritten, original, model_factory.smooth_inputs(512, seed=0), steps=150, seed=0)


def test_each_chain_fits_the_replaced_layer_on_unseen_inputs(original, rewritten, reconstructed):
    model, fits = reconstructed
    assert [f.layer for f in fits] == ["conv1", "conv2"]
    assert all(f.status == "fitted" and f.samples == 512 for f in fits)
    held_out = model_factory.smooth_inputs(256, seed=1)
    for fit, output in zip(fits, ["c1", "c2"]):
        target = layer_output(original, output, held_out)
        before = relative_error(layer_output(rewritten, output, held_out), target)
        after = relative_error(layer_output(model, output, held_out), target)
        assert fit.error_before == pytest.approx(before, rel=0.3)  # reported on the fitting samples
        assert after < 0.75 * before, (fit.layer, before, after)
        assert fit.error_after == pytest.approx(after, rel=0.3)


def test_only_chain_weights_change(rewritten, reconstructed):
    model, _ = reconstructed
    assert [(n.name, list(n.input), list(n.output)) for n in model.graph.node] == [
        (n.name, list(n.input), list(n.output)) for n in rewritten.graph.node]
    before = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert before.keys() == after.keys()
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    chain_weights = {name for n in model.graph.node if "/cp/" in n.name for name in n.input[1:]}
    assert changed and changed <= chain_weights
    assert "fc.weight" not in chain_weights


def test_reconstruction_is_deterministic(original, rewritten, reconstructed):
    again, _ = reconstruct_layers(rewritten, original, model_factory.smooth_inputs(512, seed=0), steps=150, seed=0)
    assert again.SerializeToString() == reconstructed[0].SerializeToString()


def test_a_chain_whose_weights_are_shared_is_left_alone(original, rewritten):
    shared = onnx.ModelProto()
    shared.CopyFrom(rewritten)
    shared.graph.node.append(helper.make_node("Identity", ["conv2/cp/out.weight"], ["w_copy"], name="reuse"))
    shared.graph.output.append(onnx.ValueInfoProto(name="w_copy"))
    model, fits = reconstruct_layers(shared, original, model_factory.smooth_inputs(64, seed=0), steps=20)
    by_layer = {f.layer: f for f in fits}
    assert by_layer["conv2"].status.startswith("skipped: weights shared")
    assert by_layer["conv1"].status == "fitted"
    weights = {t.name: t for t in model.graph.initializer}
    original_weights = {t.name: t for t in shared.graph.initializer}
    assert weights["conv2/cp/in.weight"] == original_weights["conv2/cp/in.weight"]


def test_optimize_reconstructs_before_finetuning_and_reports_each_stage(original, tmp_path):
    x = model_factory.smooth_inputs(256, seed=0)
    np.savez(tmp_path / "eval.npz", x=model_factory.smooth_inputs(64, seed=1))
    result = onnx_cp.optimize(original, RANK, solver=SolverSettings(workers=1),
                              finetune=FinetuneSettings(x, teacher_from_input=True, epochs=1, lr=0.01,
                                                        reconstruct_steps=60),
                              measure=MeasureSettings(eval_data=str(tmp_path / "eval.npz")))
    fits = result.report["reconstruction"]["layers"]
    assert [f["status"] for f in fits] == ["fitted", "fitted"]
    assert all(f["error_after"] < f["error_before"] for f in fits)
    accuracy = result.report["accuracy"]
    assert list(accuracy) == ["original", "decomposed", "reconstructed", "finetuned"]
    # the reconstructed model agrees with the input model better than the raw rewrite
    assert accuracy["reconstructed"]["mean_abs_error"] < 0.9 * accuracy["decomposed"]["mean_abs_error"]

    off = onnx_cp.optimize(original, RANK, solver=SolverSettings(workers=1),
                           finetune=FinetuneSettings(x, teacher_from_input=True, epochs=1, reconstruct_steps=0))
    assert "reconstruction" not in off.report


def test_cli_rejects_negative_reconstruction_steps(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(model_factory.tiny_cnn(), path)
    assert cli_main(["optimize", str(path), str(tmp_path / "o.onnx"), "--reconstruct-steps", "-1"]) == 2
    assert "--reconstruct-steps" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


@pytest.fixture(scope="module")
def strided():
    """tiny_cnn with a stride-2 conv2 (pads 2): windows must follow the stride and the padding."""
    model = model_factory.tiny_cnn(seed=3)
    conv2 = next(n for n in model.graph.node if n.name == "conv2")
    conv2.attribute.append(helper.make_attribute("strides", [2, 2]))
    return model, onnx_cp.optimize(model, RANK, solver=SolverSettings(workers=1)).model


def test_windows_reproduce_the_full_maps_exactly(strided):
    from onnx_cp.finetune import reconstruct as r

    _, rewritten = strided
    student = r.proto_copy(rewritten)
    inputs = model_factory.smooth_inputs(6, seed=2)
    chains = r._chains(student)
    plans = r._plans(student, chains, "x", inputs, crop=5, memory=1 << 26, passes=1, seed=0)
    assert [(p.croppable, p.out_hw, p.stride) for p in plans] == [(True, (5, 5), (1, 1)), (True, (5, 5), (2, 2))]
    assert plans[1].in_hw == (4 * 2 + 5, 4 * 2 + 5) and plans[1].crops == 3  # 8x8 map: ceil(64 / 25)
    data = r._collect(student, student, "x", inputs, plans, threads=1)
    for plan, (x, y) in zip(plans, data):
        module = r.to_torch(r._chain_model(student, plan.chain, unpadded=True))
        with torch.no_grad():
            got = module(torch.from_numpy(x)).numpy()
        full = layer_output(student, plan.chain.output, inputs)
        for i in range(plan.images):
            for c, (oy, ox) in enumerate(plan.positions[i]):
                window = full[i, :, oy:oy + plan.out_hw[0], ox:ox + plan.out_hw[1]]
                np.testing.assert_allclose(y[i * plan.crops + c], window, rtol=0, atol=0)
                np.testing.assert_allclose(got[i * plan.crops + c], window, rtol=1e-4, atol=1e-4)


def test_fitting_on_windows_lowers_the_full_map_error(strided):
    original, rewritten = strided
    model, fits = reconstruct_layers(rewritten, original, model_factory.smooth_inputs(256, seed=0), steps=150,
                                     crop=6, seed=0)
    assert all(f.status == "fitted" for f in fits)
    held_out = model_factory.smooth_inputs(128, seed=1)
    for output in ["c1", "c2"]:
        target = layer_output(original, output, held_out)
        before = relative_error(layer_output(rewritten, output, held_out), target)
        after = relative_error(layer_output(model, output, held_out), target)
        assert after < 0.8 * before, (output, before, after)


def test_a_model_with_a_fixed_batch_of_one_is_reconstructed(original, rewritten):
    def batch_one(model):
        copy = onnx.ModelProto()
        copy.CopyFrom(proto_copy(model))
        for value in list(copy.graph.input) + list(copy.graph.output):
            value.type.tensor_type.shape.dim[0].dim_value = 1
        return copy

    model, fits = reconstruct_layers(batch_one(rewritten), batch_one(original), model_factory.smooth_inputs(37, seed=0),
                                     steps=20)
    assert [f.status for f in fits] == ["fitted", "fitted"] and all(f.samples == 37 for f in fits)


def test_a_last_stage_that_is_the_only_difference_is_solved_exactly(rewritten):
    """The chain's last 1x1 stage is linear in its weights: when the target layer differs from the
    chain only there, the least-squares start recovers it (one Adam step allowed, the best kept)."""
    teacher = proto_copy(rewritten)
    rng = np.random.default_rng(7)
    for init in teacher.graph.initializer:
        if init.name in ("conv2/cp/out.weight", "conv2.bias"):
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((w + rng.standard_normal(w.shape) * w.std()).astype(np.float32),
                                                  init.name))
    inputs = model_factory.smooth_inputs(256, seed=0)
    model, fits = reconstruct_layers(rewritten, teacher, inputs, steps=1, seed=0)
    conv2 = next(f for f in fits if f.layer == "conv2")
    assert conv2.error_before > 0.3 and conv2.error_after < 1e-3
    held_out = model_factory.smooth_inputs(64, seed=1)
    assert relative_error(layer_output(model, "c2", held_out), layer_output(teacher, "c2", held_out)) < 1e-3


def test_a_gemm_chain_is_solved_by_reduced_rank_regression(original):
    rewritten = onnx_cp.optimize(original, RANK, solver=SolverSettings(workers=1, decomposition="svd")).model
    assert [n.op_type for n in rewritten.graph.node][-3:] == ["MatMul", "MatMul", "Add"]  # fc as two thin ones
    model, fits = reconstruct_layers(rewritten, original, model_factory.smooth_inputs(256, seed=0), steps=20)
    fc = {f.layer: f for f in fits}["fc"]
    assert fc.status == "fitted" and fc.error_after < fc.error_before
    shapes = {t.name: list(t.dims) for t in model.graph.initializer if t.name.startswith("fc/svd/")}
    assert shapes == {"fc/svd/in.weight": [32, RANK], "fc/svd/out.weight": [RANK, 10]}  # still rank RANK
    held_out = model_factory.smooth_inputs(128, seed=1)
    target = layer_output(original, "logits", held_out)
    before = relative_error(layer_output(rewritten, "logits", held_out), target)
    after = relative_error(layer_output(model, "logits", held_out), target)
    assert after < 0.8 * before
