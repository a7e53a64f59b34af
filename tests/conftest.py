import os
import sys
from pathlib import Path

# The tests check what the searches decide, not how fast: short benchmarks (see onnx_cp.api.MEASURE_SECONDS).
os.environ.setdefault("ONNX_CP_MEASURE_SECONDS", "0.05")

# Let tests import the shared model factory as `model_factory`.
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def chains_time_as_faster(monkeypatch):
    """The error budget leaves a layer whose chain measures slower than the layer. Tests check what
    the policies decide, not how fast a machine runs a chain: every chain times as half its layer,
    unless a test says otherwise (tests/test_budget.py: test_the_error_budget_leaves_a_slower_chain)."""
    monkeypatch.setattr("onnx_cp.api.time_ratio", lambda site, form, rank, threads=1: 0.5)
