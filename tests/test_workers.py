"""Solver worker processes die with their caller (no orphans holding a CI step's pipes open)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

CALLER = textwrap.dedent("""
    import numpy as np
    from onnx_cp.cp import decompose_many

    if __name__ == "__main__":
        rng = np.random.default_rng(0)
        jobs = [(rng.standard_normal((256, 256, 3, 3)), 64) for _ in range(4)]
        decompose_many(jobs, workers=2, max_iter=100000, tol=0.0)
""")


def _children(pid: int) -> set[int]:
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.add(int(status.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and PR_SET_PDEATHSIG")
def test_workers_die_when_the_caller_is_killed(tmp_path):
    script = tmp_path / "caller.py"
    script.write_text(CALLER)
    caller = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        deadline = time.monotonic() + 60
        workers: set[int] = set()
        while time.monotonic() < deadline and len(workers) < 2:
            time.sleep(0.5)
            workers = {p for p in _children(caller.pid) if "resource_tracker" not in
                       Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")}
        assert len(workers) >= 2, "the workers did not start"
        time.sleep(2)  # past the workers' start-up
        caller.send_signal(signal.SIGKILL)
        caller.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers), "orphaned solver workers"
    finally:
        if caller.poll() is None:
            caller.kill()
