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
from torch import nn

from sak.pipeline.base.errors import SakError
from sak.pipeline.teachers.forward import bf16_autocast  # noqa: F401  (the one autocast rule, re-exported)


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


# ----------------------------------------------------------------------------------------------
# stage 2 and TIGER: ranks split every global batch (the same samples, in the same order, as one process)


def rank_positions(start: int, steps: int, batch_size: int, env: DistEnv) -> list[int]:
    """Stream positions this rank trains on for steps start+1..steps: its contiguous 1/world part of each
    global batch of `batch_size`. Together the ranks see exactly what one process would, step by step."""
    if batch_size % env.world_size:
        raise SakError(f"--batch-size {batch_size} is not divisible by the {env.world_size} processes")
    per = batch_size // env.world_size
    lo = env.rank * per
    return [s * batch_size + lo + i for s in range(start, steps) for i in range(per)]


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with a gradient: the backward pass sums the incoming gradients over ranks too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = grad.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


def _in_group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of x over ranks as a value, with the gradient of this rank's x (identity in one process).

    DDP averages the gradients over ranks, so a loss of rank_mean(x) gets the gradient of the mean."""
    if not _in_group():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return x + (y / dist.get_world_size() - x.detach())


def rank_mean_value(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, no gradient (numbers to log; contributions compared across the global batch)."""
    if not _in_group():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch (every rank's part), on any device.

    torch's SyncBatchNorm only runs on GPUs; this one all-reduces (sum, sum of squares, count) through a
    differentiable all_reduce, so a DDP run on gloo normalises as one process on the whole batch would.
    Same parameters and buffers as BatchNorm2d (checkpoints are interchangeable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _in_group()):
            return super().forward(x)
        C = x.shape[1]
        count = x.new_full((1,), float(x.numel() // C))
        stats = _SumOverRanks.apply(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]))
        n = stats[-1].detach()
        mean = stats[:C] / n
        var = (stats[C : 2 * C] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / max(float(n) - 1, 1.0))
        y = (x - mean.view(1, C, 1, 1)) * torch.rsqrt(var + self.eps).view(1, C, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)
        return y


def global_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `model` by a GlobalBatchNorm2d holding the very same parameter and
    buffer tensors (in place; an optimizer built before keeps working)."""
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            for pname, p in child.named_parameters(recurse=False):
                setattr(new, pname, p)  # the same Parameter objects
            for bname, b in child.named_buffers(recurse=False):
                setattr(new, bname, b)  # the same buffers (running statistics, batches tracked)
            new.train(child.training)
            setattr(model, name, new)
        else:
            global_batchnorm(child)
    return model


def wrap_ddp(
    model: nn.Module, env: DistEnv, find_unused: bool = False, static_graph: bool = False
) -> nn.Module:
    """The module to run forward on: DDP-wrapped under torchrun (BatchNorm made global first), else model.
    find_unused: parameters may get no gradient in a step; static_graph: the same ones never get one, though
    they make outputs (outputs the loss leaves out)."""
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    global_batchnorm(model)
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused, static_graph=static_graph)


# ----------------------------------------------------------------------------------------------
# decisions rank 0 takes for all (the run folder, its lock) and what rank 0 alone writes


class RankCopyError(SakError):
    """The error rank 0 found, raised on another rank too (which stays silent: rank 0 prints it)."""

    quiet = True


def agree(env: DistEnv, error: str | None) -> None:
    """Rank 0's verdict for every rank: raise `error` (a one-line SakError) everywhere, or go on. Call on
    every rank; the others pass None."""
    if env.distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise SakError(error) if env.is_main else RankCopyError(error)


def gather_to_main(env: DistEnv, obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (rank 0 is the one that uses it)."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
