"""DistributedDataParallel when launched by torchrun (RANK and WORLD_SIZE in the environment).

gloo on CPUs, NCCL when GPUs are present. Each rank trains on its own shard of the data
(every world_size-th sample, padded so all ranks run the same number of steps: DDP needs that);
only rank 0 writes checkpoints and the output model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from onnx_cp.errors import OnnxCpError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we initialised the process group and must destroy it

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> World:
    """Join the process group when launched by torchrun; a single-process World otherwise."""
    cuda = torch.cuda.is_available()
    if not launched_by_torchrun():
        return World(device=torch.device("cuda" if cuda else "cpu"))
    if not dist.is_available():
        raise OnnxCpError("launched with WORLD_SIZE > 1 but this torch build has no "
                          "torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
        owns = True
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


def teardown(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, world: World) -> np.ndarray:
    """Sample indices of this rank: every size-th of 0..n-1, wrapped around so all shards are
    equally long (DistributedSampler's rule)."""
    if world.size == 1:
        return np.arange(n)
    per_rank = -(-n // world.size)
    indices = np.arange(per_rank * world.size) % n
    return indices[world.rank::world.size]


def wrap(module: nn.Module, world: World) -> nn.Module:
    """The module to train: DDP-wrapped when distributed (gradients averaged across ranks)."""
    if not world.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [world.local_rank] if world.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def sum_all(values: list[float], world: World) -> list[float]:
    """Element-wise sum over ranks (for validation counts)."""
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
