"""Settings from onnx-cp.toml / [tool.onnx-cp] in pyproject.toml; the command line wins."""

from __future__ import annotations

import json

import onnx
import pytest

import model_factory
from onnx_cp.cli import main


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    onnx.save(model_factory.tiny_cnn(), tmp_path / "in.onnx")
    return tmp_path


def ranks_written(workdir) -> dict:
    report = json.loads((workdir / "r.json").read_text())
    return {row["name"]: row["rank"] for row in report["layers"]}


def optimize(*extra) -> int:
    return main(["optimize", "in.onnx", "out.onnx", "--report", "r.json", "-q", *extra])


def test_onnx_cp_toml_in_the_working_directory(workdir):
    (workdir / "onnx-cp.toml").write_text('rank = 4\nlayers = "conv2"\n')
    assert optimize() == 0
    assert ranks_written(workdir) == {"conv1": None, "conv2": 4, "fc": None}
    assert json.loads((workdir / "r.json").read_text())["config"] == "onnx-cp.toml"


def test_command_line_wins_over_the_file(workdir):
    (workdir / "onnx-cp.toml").write_text('rank = 4\nlayers = "conv2"\n')
    assert optimize("--rank", "6", "--layers", ".") == 0
    assert ranks_written(workdir) == {"conv1": 6, "conv2": 6, "fc": None}


def test_pyproject_table_and_per_layer_ranks(workdir):
    table = '[project]\nname = "x"\n\n[tool.onnx-cp]\nrank = { conv1 = 3, conv2 = 5 }\n'
    (workdir / "pyproject.toml").write_text(table)
    assert optimize() == 0
    assert ranks_written(workdir) == {"conv1": 3, "conv2": 5, "fc": None}


def test_explicit_config_file(workdir):
    (workdir / "ci.toml").write_text('[tool.onnx-cp]\nrank = 7\nexclude = "conv1"\n')
    assert optimize("--config", "ci.toml") == 0
    assert ranks_written(workdir) == {"conv1": None, "conv2": 7, "fc": None}


@pytest.mark.parametrize("content, message", [
    ('rnak = 4\n', "unknown setting"),
    ('rank = [\n', "not a readable TOML"),
    ('[other]\nrank = 4\n', "unexpected table"),
])
def test_bad_config_is_a_usage_error(workdir, capsys, content, message):
    (workdir / "onnx-cp.toml").write_text(content)
    assert optimize() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (workdir / "out.onnx").exists()


def test_missing_config_file(workdir, capsys):
    assert optimize("--config", "nope.toml") == 2
    assert "no such file" in capsys.readouterr().err
