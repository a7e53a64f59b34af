"""Nothing is lost: outputs never replace special files, inputs or each other, and a failed run leaves
no model behind (the cases of the reliability campaign, each one a command a user could type)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import model_factory
from onnx_cp.cli import main


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "in.onnx"
    onnx.save(model_factory.tiny_cnn(), path)
    return path


def optimize(model: Path, out: Path, *extra: str) -> int:
    return main(["optimize", str(model), str(out), "--rank", "4", "--workers", "1", "-q", *extra])


def test_a_fifo_as_out_is_refused_and_kept(model, tmp_path, capsys):
    fifo = tmp_path / "out.onnx"
    os.mkfifo(fifo)
    assert optimize(model, fifo) == 1
    assert "not a regular file" in capsys.readouterr().err
    assert fifo.is_fifo()
    link = tmp_path / "link.onnx"
    link.symlink_to(fifo)
    assert optimize(model, link) == 1 and fifo.is_fifo()


@pytest.mark.parametrize("which", ["input", "output", "output data"])
def test_report_onto_a_model_file_is_refused(model, tmp_path, which, capsys):
    out = tmp_path / "out.onnx"
    report = {"input": model, "output": out, "output data": tmp_path / "out.onnx.data"}[which]
    before = model.read_bytes()
    assert optimize(model, out, "--report", str(report)) == 2
    assert "--report" in capsys.readouterr().err
    assert model.read_bytes() == before and not out.exists()


def test_eval_json_onto_its_model_is_refused(model, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 16, 16), np.float32))
    before = model.read_bytes()
    assert main(["eval", str(model), "--data", str(tmp_path / "d.npz"), "--json", str(model)]) == 2
    assert model.read_bytes() == before


def test_out_whose_data_file_is_the_inputs_data_is_refused(tmp_path):
    proto = model_factory.tiny_cnn()
    onnx.save(proto, tmp_path / "in.onnx", save_as_external_data=True, location="m2.onnx.data",
              size_threshold=0)
    before = (tmp_path / "m2.onnx.data").read_bytes()
    assert optimize(tmp_path / "in.onnx", tmp_path / "m2.onnx") == 2
    assert (tmp_path / "m2.onnx.data").read_bytes() == before
    onnx.checker.check_model(str(tmp_path / "in.onnx"))  # the input still loads, weights intact


@pytest.mark.parametrize("case", ["report in a missing folder", "report onto a folder", "report-dir onto a file"])
def test_a_failed_report_leaves_no_model_behind(model, tmp_path, case):
    out = tmp_path / "out.onnx"
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    extra = {"report in a missing folder": ["--report", str(tmp_path / "missing" / "r.json")],
             "report onto a folder": ["--report", str(tmp_path / "a-folder")],
             "report-dir onto a file": ["--report-dir", str(tmp_path / "a-file")]}[case]
    assert optimize(model, out, *extra) in (1, 2)
    assert not out.exists() and not (tmp_path / "out.onnx.data").exists()


def test_absurd_thread_counts_are_usage_errors(model, tmp_path, capsys):
    assert optimize(model, tmp_path / "o.onnx", "--threads", "100000") == 2
    assert "--threads" in capsys.readouterr().err
    assert main(["bench", str(model), "--threads", "100000", "--runs", "1"]) == 2


def test_conflicting_repeats_are_usage_errors(model, tmp_path):
    assert main(["optimize", str(model), str(tmp_path / "o.onnx"), "--rank", "conv1=4", "--rank", "conv1=8"]) == 2
    assert optimize(model, tmp_path / "o.onnx", "--input-shape", "x:1,3,16,16", "--input-shape", "x:2,3,16,16") == 2
    assert main(["optimize", str(model), str(tmp_path / "o.onnx"), "--rank", "4", "--max-error", "0.5"]) == 2
    assert main(["optimize", str(model), str(tmp_path / "o.onnx"), "--target-speedup", "nan"]) == 2
    assert main(["optimize", str(model), str(tmp_path / "o.onnx"), "--max-error", "inf"]) == 2
    assert main(["optimize", str(model), str(tmp_path / "o.onnx"), "--layers", "conv(", "--rank", "4"]) == 2
    assert not (tmp_path / "o.onnx").exists()


def test_input_shapes_too_large_to_run_are_usage_errors(model, tmp_path, capsys):
    assert optimize(model, tmp_path / "o.onnx", "--input-shape", "x:99999999999999999999,3,16,16") == 2
    assert "--input-shape" in capsys.readouterr().err and not (tmp_path / "o.onnx").exists()


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    model = tmp_path / "in.onnx"
    onnx.save(model_factory.tiny_cnn(), model)
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 16, 16), np.float32), y=np.zeros(4, np.int64))
    code = main(["finetune", str(model), str(tmp_path / "o.onnx"), "--data", str(tmp_path / "d.npz"), "--steps", "1",
                 "--checkpoint", str(tmp_path / "missing.ckpt"), "--resume"])
    assert code == 2 and "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()
