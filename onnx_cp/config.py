"""Settings from a file, so that a pipeline keeps them in its repository.

`--config FILE` reads a TOML file: its `[tool.onnx-cp]` table if it has one (pyproject.toml),
else the whole file. Without --config, `onnx-cp.toml` in the working directory, else the
`[tool.onnx-cp]` table of `pyproject.toml` there, is used when present. Keys are the long
options of `onnx-cp optimize` (dashes or underscores); command-line options win.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from onnx_cp.errors import UsageError

TABLE = "onnx-cp"


def find_config(explicit: str | None, folder: Path = Path(".")) -> tuple[Path, dict] | None:
    """The settings table and where it came from, or None when there is none."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise UsageError(f"--config {explicit}: no such file")
        data = _read(path)
        table = data.get("tool", {}).get(TABLE)
        if table is None and path.name == "pyproject.toml":
            raise UsageError(f"--config {explicit}: no [tool.{TABLE}] table")
        return path, _check_table(path, table if table is not None else data)
    own = folder / "onnx-cp.toml"
    if own.is_file():
        return own, _check_table(own, _read(own))
    project = folder / "pyproject.toml"
    if project.is_file():
        table = _read(project).get("tool", {}).get(TABLE)
        if table is not None:
            return project, _check_table(project, table)
    return None


def as_argv(table: dict) -> list[str]:
    """Turn settings into command-line arguments, so argparse checks and converts them."""
    argv: list[str] = []
    for key, value in table.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                argv.append(flag)
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        elif isinstance(value, dict):  # rank = { conv2 = 64 }
            argv += [item for layer, rank in value.items() for item in (flag, f"{layer}={rank}")]
        else:
            argv += [flag, str(value)]
    return argv


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: not a readable TOML file ({exc})") from None


def _check_table(path: Path, table: object) -> dict:
    if not isinstance(table, dict):
        raise UsageError(f"{path}: the onnx-cp settings must be a table")
    nested = [k for k, v in table.items() if isinstance(v, dict) and k != "rank"]
    if nested:
        raise UsageError(f"{path}: unexpected table(s) {nested} in the onnx-cp settings")
    return table
