"""torch (extra `finetune`) and matplotlib (extra `plots`) are optional: without them optimize,
bench, eval and reports still work, and what needs them stops with one line naming the extra.

Each case runs in a fresh interpreter whose import system reports the blocked packages as not
installed (a meta-path finder raising ModuleNotFoundError, as a real absence does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import model_factory
import onnx_cp

# Prepended to every child script; argv[1] is the comma-separated list of packages to hide.
SHIM = """
import sys

BLOCKED = set(sys.argv.pop(1).split(","))


class NotInstalled:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled)
"""
CLI = SHIM + "from onnx_cp.cli import main\nsys.exit(main(sys.argv[1:]))\n"
# Imports every onnx_cp module that must not need the blocked packages; prints the ones that fail.
IMPORT_ALL = SHIM + """
import importlib
from pathlib import Path

import onnx_cp

SKIP = ("onnx_cp.finetune", "onnx_cp.measure.plots", "onnx_cp.__main__")  # __main__ runs the CLI
root = Path(onnx_cp.__file__).parents[1]
for path in sorted(Path(onnx_cp.__file__).parent.rglob("*.py")):
    name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    if not name.startswith(SKIP):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            print(name, exc)
"""
BOTH = "torch,matplotlib"


def run(script: str, blocked: str, *args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # The onnx_cp under test first on the path (not whichever copy is installed).
    root = str(Path(onnx_cp.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", script, blocked, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line_error(done: subprocess.CompletedProcess, extra: str) -> str:
    """The single stderr line of a run that failed with exit 1, checked to name `extra`."""
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"onnx-cp[{extra}]" in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A tiny CNN and a small labelled npz for it."""
    folder = tmp_path_factory.mktemp("optional")
    onnx.save(model_factory.tiny_cnn(), folder / "model.onnx")
    x = model_factory.smooth_inputs(16, seed=0)
    y = np.random.default_rng(0).integers(0, 10, len(x))
    np.savez(folder / "data.npz", x=x.astype(np.float32), y=y)
    return folder


def test_only_finetune_and_plots_modules_need_the_extras():
    done = run(IMPORT_ALL, BOTH)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


def test_finetune_imports_fail_with_one_clear_error():
    done = run(SHIM + "import onnx_cp.finetune.reconstruct", "torch")
    assert done.returncode == 1
    assert "OnnxCpError: fine-tuning needs PyTorch: pip install 'onnx-cp[finetune]'" in done.stderr


def test_optimize_with_a_rank_and_report_dir(files, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report"
    done = run(CLI, BOTH, "optimize", files / "model.onnx", out, "--rank", "4", "--report-dir", report, "-q")
    assert done.returncode == 0, done.stderr
    assert sum(node.op_type == "Conv" for node in onnx.load(out).graph.node) > 2  # CP chains
    assert json.loads((report / "report.json").read_text())["layers"]
    markdown = (report / "report.md").read_text()
    assert "## Layers" in markdown and markdown.count("onnx-cp[plots]") == 1
    assert not list(report.glob("*.png"))


def test_finetune_stops_with_one_line(files, tmp_path):
    done = run(CLI, "torch", "finetune", files / "model.onnx", tmp_path / "out.onnx",
               "--data", files / "data.npz", "--steps", "1")
    assert one_line_error(done, "finetune").startswith("onnx-cp finetune: error: fine-tuning needs PyTorch")
    assert not (tmp_path / "out.onnx").exists()


def test_optimize_with_finetune_data_stops_with_one_line(files, tmp_path):
    done = run(CLI, "torch", "optimize", files / "model.onnx", tmp_path / "out.onnx", "--rank", "4",
               "--finetune-data", files / "data.npz", "-q")
    one_line_error(done, "finetune")
    assert not (tmp_path / "out.onnx").exists()


def test_bench_and_eval(files, tmp_path):
    bench = run(CLI, BOTH, "bench", files / "model.onnx", "--runs", "5", "--warmup", "1",
                "--json", tmp_path / "bench.json", "-q")
    assert bench.returncode == 0, bench.stderr
    assert json.loads((tmp_path / "bench.json").read_text())["models"][0]["median_ms"] > 0
    evaluated = run(CLI, BOTH, "eval", files / "model.onnx", "--data", files / "data.npz",
                    "--json", tmp_path / "eval.json", "-q")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 16


def test_data_chars_needs_matplotlib_fonts(tmp_path):
    done = run(CLI, "matplotlib", "data", "chars", "--n", "4", "--out", tmp_path / "c.npz")
    assert "matplotlib's bundled fonts" in one_line_error(done, "plots")
    assert not (tmp_path / "c.npz").exists()


def test_data_chars_needs_no_torch(tmp_path):
    done = run(CLI, "torch", "data", "chars", "--n", "4", "--out", tmp_path / "c.npz", "-q")
    assert done.returncode == 0, done.stderr
    assert np.load(tmp_path / "c.npz")["x"].shape == (4, 1, 24, 24)
