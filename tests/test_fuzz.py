"""A fast, seeded slice of benchmarks/fuzz.py: mutated Conv models and bad options through the CLI
in-process; every invariant (exit codes, one stderr line, IN unchanged, nothing left on failure,
OUT computing IN's function on success) must hold. Long runs: python benchmarks/fuzz.py --seed S --count N."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fuzz  # noqa: E402

SEED = 20240601
COUNT = 160  # about 15-25 s on one core


def test_fuzz_slice_keeps_every_promise(tmp_path):
    lines = []
    result = fuzz.fuzz(SEED, COUNT, tmp_path, log=lines.append)
    counts = result["counts"]
    assert not result["failures"], "\n".join(lines)
    assert counts["cases"] == COUNT
    assert counts.get("tracebacks/fallback lines", 0) == 0
    # The slice exercises every outcome: refusals of both kinds and real rewrites.
    assert counts.get("exit 1", 0) > 0 and counts.get("exit 2", 0) > 0
    assert counts.get("writes with decomposed layers", 0) > 0


def test_cases_are_reproducible(tmp_path):
    first = fuzz.build_case(SEED, 7, tmp_path / "a")
    second = fuzz.build_case(SEED, 7, tmp_path / "b")
    assert first.describe() == second.describe()
    assert [a.replace(str(tmp_path / "a"), "") for a in first.argv] == \
        [b.replace(str(tmp_path / "b"), "") for b in second.argv]
    assert (first.folder / "in.onnx").read_bytes() == (second.folder / "in.onnx").read_bytes()


@pytest.mark.parametrize("argv_tail", [["--rank", "nan"], ["--max-error", "-1"], ["--layers", "(["]])
def test_bad_options_are_one_line(tmp_path, argv_tail):
    import onnx

    import model_factory

    model = tmp_path / "in.onnx"
    onnx.save(model_factory.tiny_cnn(), str(model))
    case = fuzz.Case(0, 0, tmp_path, ["optimize", str(model), str(tmp_path / "out.onnx"), "-q", *argv_tail],
                     model, tmp_path / "out.onnx")
    outcome = fuzz.run_case(case)
    assert outcome.code == 2 and not outcome.violations, outcome


def test_ctrl_c_during_imports_in_a_subprocess():
    """The console entry point: SIGINT while onnx_cp's subcommands are being imported."""
    import os
    import signal
    import subprocess

    code = ("import signal, os, onnx_cp.cli as c\n"
            "real = c.build_parser\n"
            "def slow():\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    return real()\n"
            "c.build_parser = slow\n"
            "raise SystemExit(c.main(['optimize', 'a', 'b']))\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 130
    assert run.stderr.strip() == "onnx-cp: interrupted"
    assert signal.SIGINT  # noqa: the signal is delivered synchronously to the main thread
