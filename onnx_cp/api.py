"""The Python API that the CLI is a thin layer over."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class OptimizeResult:
    model: Any
    report: dict = field(default_factory=dict)


def optimize(model, **kwargs) -> OptimizeResult:  # replaced by the real pass shortly
    raise NotImplementedError
