"""`onnx-cp bench` and `onnx-cp eval`: tables, JSON files, reports, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from test_measure_profile import chain_cnn

import model_factory
from onnx_cp.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    onnx.save(model_factory.tiny_cnn(), folder / "original.onnx")
    onnx.save(chain_cnn(), folder / "optimized.onnx")
    rng = np.random.default_rng(0)
    np.savez(folder / "data.npz", x=rng.standard_normal((12, 3, 16, 16)).astype(np.float32),
             y=rng.integers(0, 10, 12))
    return folder


def test_bench_table_json_and_report(files, tmp_path, capsys):
    code = main(["bench", str(files / "original.onnx"), str(files / "optimized.onnx"),
                 "--runs", "3", "--warmup", "1", "--profile", "--profile-runs", "2",
                 "--json", str(tmp_path / "bench.json"), "--report-dir", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert code == 0
    header = out.splitlines()[0].split()
    assert header[:4] == ["model", "median", "ms", "p10"]
    assert "optimized" in out and "per-layer time of optimized" in out
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [m["name"] for m in result["models"]] == ["original", "optimized"]
    for model in result["models"]:
        assert {"path", "median_ms", "p10_ms", "p90_ms", "runs", "ratio_to_first"} <= set(model)
    assert result["threads"] == 1 and result["batch"] == 1
    assert [layer["name"] for layer in result["profile"]["optimized"]["layers"]][:2] == ["conv1", "conv2"]
    for png in ("latency.png", "layer_latency.png"):
        with Image.open(tmp_path / "report" / png) as image:
            image.verify()
    assert (tmp_path / "report" / "report.md").exists()


def test_eval_json_and_report(files, tmp_path, capsys):
    code = main(["eval", str(files / "optimized.onnx"), "--data", str(files / "data.npz"),
                 "--reference", str(files / "original.onnx"), "--batch-size", "5",
                 "--json", str(tmp_path / "eval.json"), "--report-dir", str(tmp_path / "r")])
    assert code == 0
    assert "top-1 agreement" in capsys.readouterr().out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["n"] == 12
    assert 0 <= result["top1"] <= result["top5"] <= 1
    assert 0 <= result["agreement_top1"] <= 1 and result["max_abs_error"] > 0
    assert (tmp_path / "r" / "report.json").exists()


def _bad_data(folder: Path, case: str) -> Path:
    x = np.zeros((4, 3, 16, 16), np.float32)
    if case == "empty folder":
        (folder / "empty").mkdir()
        return folder / "empty"
    if case == "unreadable image":
        (folder / "imgs" / "a").mkdir(parents=True)
        (folder / "imgs" / "a" / "0.png").write_bytes(b"garbage")
        return folder / "imgs"
    arrays = {
        "missing x": {"y": np.zeros(4, int)},
        "wrong shape": {"x": np.zeros((4, 3, 16), np.float32)},
        "wrong dtype": {"x": x.astype(np.int32)},
        "labels out of range": {"x": x, "y": np.array([0, 1, 2, 99])},
        "non-integer labels": {"x": x, "y": np.array([0.5, 1, 2, 3])},
        "shape does not fit the model": {"x": np.zeros((4, 1, 16, 16), np.float32)},
    }[case]
    np.savez(folder / "bad.npz", **arrays)
    return folder / "bad.npz"


@pytest.mark.parametrize("case, message", [
    ("missing x", "no array 'x'"),
    ("wrong shape", "expected (N, C, H, W)"),
    ("wrong dtype", "dtype int32; expected float32"),
    ("labels out of range", "label 99 is out of range"),
    ("non-integer labels", "non-integer labels"),
    ("shape does not fit the model", "the data's samples are 1x16x16"),
    ("empty folder", "no images"),
    ("unreadable image", "unreadable image"),
])
def test_eval_bad_data_is_one_line(files, tmp_path, capsys, case, message):
    data = _bad_data(tmp_path, case)
    code = main(["eval", str(files / "original.onnx"), "--data", str(data)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("onnx-cp eval: error: ")
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, code, message", [
    (["bench", "{d}/missing.onnx"], 1, "no such file"),
    (["bench", "{d}/original.onnx", "--input-shape", "x:1,3,9,9"], 2, "does not fit"),
    (["bench", "{d}/original.onnx", "--threads", "lots"], 2, "threads"),
    (["eval", "{d}/original.onnx", "--data", "{d}/data.npz", "--mean", "a,b"], 2, "--mean"),
    (["eval", "{d}/original.onnx", "--data", "{d}/data.npz", "--size", "8,8"], 2, "image folders"),
])
def test_bad_arguments_are_one_line(files, capsys, argv, code, message):
    assert main([a.format(d=files) for a in argv]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_real_process_prints_no_traceback(files, tmp_path):
    bad = _bad_data(tmp_path, "wrong dtype")
    proc = subprocess.run(
        [sys.executable, "-m", "onnx_cp", "eval", str(files / "original.onnx"), "--data", str(bad)],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
