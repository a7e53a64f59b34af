"""`onnx-cp optimize` end to end: outputs, preservation, reports and every bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import model_factory
from onnx_cp import optimize
from onnx_cp.cli import main
from onnx_cp.runtime import model_io
from onnx_cp.settings import ExplicitRanks, LayerSelection


def run_ort(model: onnx.ModelProto | str, feeds: dict) -> list[np.ndarray]:
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


def cli(*args) -> int:
    return main([str(a) for a in args])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.fixture
def low_rank_model(tmp_path) -> Path:
    """A 16x8x5x5 Conv that is exactly rank 6, with a symbolic batch and a bias."""
    kernel = model_factory.low_rank_kernel(16, 8, 5, 5, rank=6, seed=1)
    bias = np.linspace(-1, 1, 16).astype(np.float32)
    model = model_factory.conv_model(kernel, bias, input_shape=["N", 8, 12, 12], pads=[2, 1, 2, 1])
    path = tmp_path / "low_rank.onnx"
    onnx.save(model, path)
    return path


def test_rank_r_on_a_rank_r_kernel_is_exact(low_rank_model, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    assert cli("optimize", low_rank_model, out, "--rank", "6", "--report", report) == 0
    table = capsys.readouterr().out
    assert "conv" in table and "decomposed" in table and "verified" in table
    x = np.random.default_rng(0).standard_normal((3, 8, 12, 12)).astype(np.float32)
    expected, = run_ort(str(low_rank_model), {"x": x})
    actual, = run_ort(str(out), {"x": x})
    assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 1e-4
    data = json.loads(report.read_text())
    layer, = data["layers"]
    assert layer["status"] == "decomposed" and layer["rank"] == 6 and layer["rel_error"] < 1e-5
    assert layer["macs_after"] < layer["macs_before"]
    assert data["verification"]["max_rel_error"] < 1e-4
    assert data["totals"]["decomposed"] == 1
    stages = data["stage_seconds"]  # where the run's time went, in the order the stages ran
    assert list(stages)[:3] == ["load and exact rewrites", "rank choice", "build and verification"]
    assert all(seconds >= 0 for seconds in stages.values())
    assert sum(stages.values()) <= data["seconds"] + 1e-2


def test_rank_is_clipped_to_flop_break_even(low_rank_model, tmp_path):
    result = optimize(low_rank_model, 10_000)
    layer, = result.report["layers"]
    assert "clipped" in layer["note"]
    assert layer["macs_after"] < layer["macs_before"]


def test_everything_else_is_preserved(tmp_path):
    proto = model_factory.tiny_cnn()
    proto.producer_name, proto.producer_version = "exporter", "9.9"
    proto.doc_string = "model doc"
    proto.graph.doc_string = "graph doc"
    onnx.helper.set_model_props(proto, {"author": "me", "license": "MIT"})
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    result = optimize(proto, 4)
    out = result.model
    assert isinstance(out, onnx.ModelProto)
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["logits"]
    assert out.graph.input[0].type == proto.graph.input[0].type  # symbolic batch "N" kept
    assert out.graph.output[0].type == proto.graph.output[0].type
    assert {(o.domain, o.version) for o in out.opset_import} == {(o.domain, o.version) for o in proto.opset_import}
    assert out.ir_version == proto.ir_version
    assert {p.key: p.value for p in out.metadata_props} == {"author": "me", "license": "MIT"}
    assert (out.producer_name, out.producer_version, out.doc_string) == ("exporter", "9.9", "model doc")
    assert out.graph.doc_string == "graph doc"
    untouched = [n.name for n in out.graph.node if "/cp/" not in n.name]
    assert untouched == ["relu1", "relu2", "gap", "flatten", "fc"]
    assert [n.name for n in proto.graph.node][0] == "conv1"  # the caller's model is not modified
    assert len(proto.graph.node) == 7


def test_layers_and_exclude_select_by_regex():
    proto = model_factory.tiny_cnn()
    only2 = optimize(proto, 4, layers=LayerSelection("conv2")).report["layers"]
    assert [r["status"] for r in only2] == ["skipped", "decomposed", "skipped"]
    assert "not matched by the layer filter" in only2[0]["reason"]
    not2 = optimize(proto, 4, layers=LayerSelection(exclude="2$")).report["layers"]
    assert [r["status"] for r in not2] == ["decomposed", "skipped", "skipped"]
    per_layer = optimize(proto, ExplicitRanks(5, {"conv2": 3})).report["layers"]
    assert [r["rank"] for r in per_layer] == [5, 3, None]  # a rank means CP: the Gemm is left alone


def test_default_policy_respects_error_budget_and_gain():
    proto = model_factory.tiny_cnn()
    kernel = model_factory.low_rank_kernel(32, 16, 5, 5, rank=8, seed=0)
    for init in proto.graph.initializer:
        if init.name == "conv2.weight":
            init.CopyFrom(numpy_helper.from_array(kernel, init.name))
    rows = optimize(proto).report["layers"]
    conv1, conv2, fc = rows
    assert conv1["status"] == "skipped" and "budget" in conv1["reason"]  # random 3x3: no rank pays
    assert fc["status"] == "skipped" and "svd" in fc["reason"]  # a 10x32 Gemm: no SVD rank halves it
    assert conv2["status"] == "decomposed" and conv2["rel_error"] <= 0.15
    assert conv2["macs_after"] * 2 <= conv2["macs_before"]


def test_ir_model_input_returns_ir_model_and_is_not_modified():
    model = ir.from_proto(model_factory.tiny_cnn())
    before = ir.to_proto(model).SerializeToString()
    result = optimize(model, 4)
    assert isinstance(result.model, ir.Model)
    assert ir.to_proto(model).SerializeToString() == before


def test_external_data_in_and_out(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    proto = model_factory.tiny_cnn()
    onnx.save(proto, folder / "model.onnx", save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    out = tmp_path / "out.onnx"
    assert cli("optimize", folder / "model.onnx", out, "--rank", "4", "-q") == 0
    assert (tmp_path / "out.onnx.data").is_file()
    loaded = onnx.load(out, load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in loaded.graph.initializer)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert run_ort(str(out), {"x": x})[0].shape == (2, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out.onnx", "out.onnx.data"]


def test_large_model_path_keeps_weights_memory_mapped(tmp_path, monkeypatch):
    """Models over the protobuf limit stay external end to end (the limit is lowered here)."""
    monkeypatch.setattr(model_io, "PROTOBUF_SAFE_BYTES", 1000)
    proto = model_factory.tiny_cnn()
    onnx.save(proto, tmp_path / "big.onnx", save_as_external_data=True, location="big.data",
              size_threshold=0)
    result = optimize(tmp_path / "big.onnx", 4)
    assert result.report["verification"]["max_rel_error"] < 1.0
    model_io.save_model(result.model, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").is_file()
    x = np.zeros((1, 3, 16, 16), np.float32)
    assert run_ort(str(tmp_path / "out.onnx"), {"x": x})[0].shape == (1, 10)


def test_torch_dynamo_export_is_rewritten(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 5, stride=2, padding=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10),
    ).eval()
    path = tmp_path / "torch.onnx"
    batch = torch.export.Dim("batch")
    torch.onnx.export(net, (torch.randn(2, 3, 16, 16),), str(path), dynamo=True,
                      dynamic_shapes=({0: batch},), input_names=["x"], output_names=["y"])
    exported = onnx.load(path, load_external_data=False)
    assert exported.opset_import[0].version >= 18
    out = tmp_path / "out.onnx"
    assert cli("optimize", path, out, "--rank", "8", "-q") == 0
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    y, = run_ort(str(out), {"x": x})
    assert y.shape == (3, 10) and np.all(np.isfinite(y))
    assert sum(n.op_type == "Conv" for n in onnx.load(out).graph.node) == 8


def test_opset11_constant_node_weights(tmp_path):
    kernel = model_factory.low_rank_kernel(8, 4, 3, 3, rank=2, seed=0)
    proto = model_factory.conv_model(kernel, np.ones(8, np.float32), weight_as="constant", opset=11,
                                     input_shape=["N", 4, 10, 10], pads=[1, 1, 1, 1])
    result = optimize(proto, 2)
    assert result.report["layers"][0]["status"] == "decomposed"
    assert result.report["verification"]["max_rel_error"] < 1e-4
    assert result.model.opset_import[0].version == 11


# ---- bad input: one line on stderr, exit 1 (2 for usage), nothing left behind ----

def assert_nothing_written(folder: Path, allowed: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == allowed


def test_missing_input(tmp_path, capsys):
    assert cli("optimize", tmp_path / "nope.onnx", tmp_path / "out.onnx") == 1
    assert "no such file" in one_error_line(capsys)
    assert_nothing_written(tmp_path, set())


@pytest.mark.parametrize("content", [b"hello, I am not a model\n", b"\x08\x07\x12\xff\xff\xff"])
def test_not_onnx(tmp_path, capsys, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    assert cli("optimize", bad, tmp_path / "out.onnx") == 1
    assert "not a valid ONNX model" in one_error_line(capsys)
    assert_nothing_written(tmp_path, {"bad.onnx"})


def test_truncated_protobuf(tmp_path, capsys):
    data = model_factory.tiny_cnn().SerializeToString()
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(data[: len(data) // 2])
    assert cli("optimize", bad, tmp_path / "out.onnx") == 1
    assert "ONNX model" in one_error_line(capsys)
    assert_nothing_written(tmp_path, {"cut.onnx"})


def test_output_folder_missing(low_rank_model, tmp_path, capsys):
    assert cli("optimize", low_rank_model, tmp_path / "no" / "out.onnx", "--rank", "2") == 1
    assert "does not exist" in one_error_line(capsys)


def test_output_is_input_needs_force(low_rank_model, capsys):
    before = low_rank_model.read_bytes()
    assert cli("optimize", low_rank_model, low_rank_model, "--rank", "2") == 2
    assert "--force" in one_error_line(capsys)
    assert low_rank_model.read_bytes() == before
    assert cli("optimize", low_rank_model, low_rank_model, "--rank", "2", "--force", "-q") == 0
    assert low_rank_model.read_bytes() != before


def test_external_data_outside_folder_is_refused(tmp_path, capsys):
    proto = model_factory.tiny_cnn()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 4096)
    folder = tmp_path / "model"
    folder.mkdir()
    for tensor in proto.graph.initializer:
        tensor.ClearField("raw_data")
        del tensor.float_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value="../secret.bin")
    (folder / "m.onnx").write_bytes(proto.SerializeToString())
    assert cli("optimize", folder / "m.onnx", tmp_path / "out.onnx", "--rank", "2") == 1
    assert "outside the model's folder" in one_error_line(capsys)
    assert not (tmp_path / "out.onnx").exists()


def test_model_onnxruntime_cannot_run(tmp_path, capsys):
    kernel = np.ones((4, 3, 3, 3), np.float32)  # 3 input channels per kernel, input has 5
    proto = model_factory.conv_model(kernel, None, input_shape=[1, 5, 8, 8])
    path = tmp_path / "broken.onnx"
    onnx.save(proto, path)
    assert cli("optimize", path, tmp_path / "out.onnx", "--rank", "2") == 1
    line = one_error_line(capsys)
    assert "onnxruntime cannot run the input model" in line or "checker" in line
    assert_nothing_written(tmp_path, {"broken.onnx"})


@pytest.mark.parametrize("rank", ["0", "abc", "=3", "conv=-1", "-5"])
def test_invalid_rank(low_rank_model, tmp_path, capsys, rank):
    assert cli("optimize", low_rank_model, tmp_path / "out.onnx", f"--rank={rank}") == 2
    assert "--rank" in one_error_line(capsys)
    assert not (tmp_path / "out.onnx").exists()


def test_rank_for_unknown_layer(low_rank_model, tmp_path, capsys):
    assert cli("optimize", low_rank_model, tmp_path / "out.onnx", "--rank", "nosuch=3") == 2
    assert "unknown Conv layer" in one_error_line(capsys)


def test_invalid_input_shape(low_rank_model, tmp_path, capsys):
    assert cli("optimize", low_rank_model, tmp_path / "o.onnx", "--rank", "2", "--input-shape", "x:1,a") == 2
    assert "--input-shape" in one_error_line(capsys)


def test_model_without_eligible_conv_is_written_unchanged(tmp_path, capsys):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(model_factory.make_model(graph), path)
    assert cli("optimize", path, tmp_path / "out.onnx") == 0
    assert "written unchanged" in capsys.readouterr().out
    assert onnx.load(tmp_path / "out.onnx").graph.node[0].op_type == "Relu"


def test_quantized_model_is_not_an_error(tmp_path, capsys):
    """ConvInteger-only models (already quantized) have no Conv: written unchanged, exit 0."""
    w = numpy_helper.from_array(np.ones((4, 4, 3, 3), np.uint8), "w")
    graph = helper.make_graph(
        [helper.make_node("ConvInteger", ["x", "w"], ["y"], name="qconv")], "q",
        [helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [1, 4, 4, 4])], [w])
    path = tmp_path / "q.onnx"
    onnx.save(model_factory.make_model(graph), path)
    assert cli("optimize", path, tmp_path / "out.onnx") == 0
    assert "written unchanged" in capsys.readouterr().out


def test_no_temporary_files_left_after_success(low_rank_model, tmp_path):
    assert cli("optimize", low_rank_model, tmp_path / "out.onnx", "--rank", "3", "-q") == 0
    assert sorted(os.listdir(tmp_path)) == ["low_rank.onnx", "out.onnx"]


def test_python_dash_m_entry_point(low_rank_model, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "onnx_cp", "optimize", str(low_rank_model),
                           str(tmp_path / "o.onnx"), "--rank", "0"], capture_output=True, text=True)
    assert done.returncode == 2 and "rank must be at least 1" in done.stderr


def _photos(folder: Path, n: int, size=(20, 24)) -> Path:
    """Unlabelled photos as users have them: one sub-folder of differently sized images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "photos").mkdir(parents=True)
    for i in range(n):
        pixels = rng.integers(0, 256, (size[0] + i, size[1], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "photos" / f"{i}.png")
    return folder


def test_unlabelled_photo_folder_drives_every_data_stage(tmp_path):
    """A folder of photos in one sub-folder, resized by --size, distils without labels; the report
    says which stage read which data and how many samples."""
    model = tmp_path / "m.onnx"
    onnx.save(model_factory.tiny_cnn(), model)
    photos = _photos(tmp_path / "data", 6)
    code = main(["optimize", str(model), str(tmp_path / "o.onnx"), "--rank", "4", "--finetune-data", str(photos),
                 "--teacher-from-input", "--epochs", "1", "--reconstruct-steps", "5", "--size", "16,16",
                 "--mean", "0.5", "--std", "0.25", "--channel-order", "bgr", "--report",
                 str(tmp_path / "r.json"), "-q"])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["data"]["fine-tuning"] == {"source": str(photos), "samples": 6}
    assert report["data"]["reconstruction"]["samples"] == 6
    assert report["finetune"]["teacher"] == "input model"
    assert "reconstruction and fine-tuning" in report["stage_seconds"]
    assert report["finetune"]["lr"] == 0.003 and report["finetune"]["lr_probe"] == []  # too short to probe


def test_the_summary_names_the_learning_rate_and_its_probe():
    from onnx_cp.cli.optimize import _measurement_lines

    tuned = {"history": [{}, {}], "seconds": 12.0, "best_epoch": 1, "lr": 0.0009,
             "lr_probe": [{"lr": 0.003}, {"lr": 0.0009}, {"lr": 0.0003}]}
    text = "\n".join(_measurement_lines({"finetune": tuned}))
    assert "at peak lr 9e-04, chosen by a probe of 3e-03/9e-04/3e-04; kept epoch 1" in text
