"""Fine-tuning with DistributedDataParallel: 2 processes on this machine (gloo), data sharded,
gradients averaged (both ranks end with the same weights), only rank 0 writes.

The default test forks two workers that join a process group the way torchrun sets it up (RANK,
WORLD_SIZE, MASTER_ADDR/PORT): forking reuses the imported torch, which keeps the test to seconds.
The end-to-end `torchrun -m onnx_cp finetune` test costs three fresh torch imports (half a minute
on a busy 2-core machine): it runs when ONNX_CP_TORCHRUN_TEST=1.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.distributed as dist
from test_finetune import accuracy, oriented_gratings

import model_factory
from onnx_cp.finetune import finetune

pytestmark = pytest.mark.skipif(not dist.is_available(),
                                reason="this torch build has no torch.distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    (xt, yt), (xv, yv) = oriented_gratings(256, 0), oriented_gratings(128, 1)
    result = finetune(model_factory.tiny_cnn(num_classes=4), (xt, yt), val=(xv, yv), epochs=2,
                      optimizer="sgd", lr=0.05, checkpoint=f"{folder}/run.ckpt")
    np.savez(f"{folder}/state{rank}.npz", **result.state)
    if rank == 0:
        onnx.save(result.model, f"{folder}/out.onnx")
        with open(f"{folder}/history.json", "w") as f:
            json.dump(result.history, f)
    elif result.model is not None:
        raise AssertionError("a rank other than 0 produced the output model")


def test_two_processes_train_one_model(tmp_path):
    context = multiprocessing.get_context("fork")
    port = _free_port()
    workers = [context.Process(target=_worker, args=(rank, port, str(tmp_path))) for rank in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=180)
    for w in workers:
        if w.is_alive():
            w.kill()
    assert [w.exitcode for w in workers] == [0, 0]
    rows = json.loads((tmp_path / "history.json").read_text())
    # each rank trained on its half of the data: 128 samples / 32 per step = 4 steps per epoch
    assert [r["step"] for r in rows] == [0, 4, 8]
    states = [np.load(tmp_path / f"state{rank}.npz") for rank in (0, 1)]
    for name in states[0].files:  # gradients were averaged: both replicas stayed identical
        np.testing.assert_array_equal(states[0][name], states[1][name], err_msg=name)
    xv, yv = oriented_gratings(128, 1)
    tuned = onnx.load(tmp_path / "out.onnx")
    assert accuracy(tuned, xv, yv) >= accuracy(model_factory.tiny_cnn(num_classes=4), xv, yv) + 0.3
    assert (tmp_path / "run.ckpt").exists()


@pytest.mark.skipif(os.environ.get("ONNX_CP_TORCHRUN_TEST") != "1",
                    reason="end-to-end torchrun run is slow; set ONNX_CP_TORCHRUN_TEST=1")
def test_torchrun_cli(tmp_path):
    (xt, yt), (xv, yv) = oriented_gratings(256, 0), oriented_gratings(128, 1)
    model = model_factory.tiny_cnn(num_classes=4)
    onnx.save(model, tmp_path / "in.onnx")
    np.savez(tmp_path / "train.npz", x=xt, y=yt)
    np.savez(tmp_path / "val.npz", x=xv, y=yv)
    out, history = tmp_path / "out.onnx", tmp_path / "history.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "onnx_cp", "finetune", str(tmp_path / "in.onnx"), str(out),
           "--data", str(tmp_path / "train.npz"), "--val", str(tmp_path / "val.npz"),
           "--epochs", "2", "--optimizer", "sgd", "--lr", "0.05", "--history", str(history),
           "--checkpoint", str(tmp_path / "run.ckpt")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(history.read_text())["history"]
    assert [r["step"] for r in rows] == [0, 4, 8]
    assert done.stdout.count("kept epoch") == 1  # only rank 0 reports and writes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.onnx", "out.onnx", "train.npz", "val.npz", "history.json", "run.ckpt"])
    assert accuracy(onnx.load(out), xv, yv) >= accuracy(model, xv, yv) + 0.3
