"""DDP plumbing for the trainer: one process per device, started by `torchrun --nproc_per_node=N`.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them (or with WORLD_SIZE=1)
everything here is a no-op and training runs in one process. Backend: NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from sak.pipeline.teachers import bf16_autocast  # noqa: F401  (the one autocast rule, re-exported)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # True when init_distributed created the process group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str | None) -> torch.device:
    """The device a single-process run uses: `name` ("cpu", "cuda", "cuda:1"), or CUDA when available."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def init_distributed(device: str | None = None, timeout_s: float = 600.0) -> DistEnv:
    """Join the process group described by torchrun's environment (if any) and pick the device.

    device: "cpu", "cuda" or None (CUDA when available). Under DDP on CUDA each rank takes cuda:LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device("cuda", local_rank) if kind == "cuda" else torch.device(kind)  # "cuda:3" stays
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=owns)


def shutdown(env: DistEnv, wait: bool = True) -> None:
    """Leave the process group this module created (after a barrier unless wait=False)."""
    if env.owns_group and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean over ranks (in place on a copy); identity in one process."""
    if not env.distributed:
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / env.world_size


def all_reduce_sum(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if not env.distributed:
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
