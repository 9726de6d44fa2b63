"""Multi-GPU / multi-node data parallelism (DDP) for runs started with ``torchrun``.

``torchrun --nproc_per_node=N -m training run CONFIG`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
`init` then joins the process group (NCCL on CUDA, gloo on CPU), pins each rank to ``cuda:LOCAL_RANK``
and the engine wraps the trainable module in `DistributedDataParallel`. Training batches are sharded by
a `DistributedSampler` (see `training.data.BatchLoader`); validation runs on every rank over the whole
val split, so early-stopping and best-epoch decisions agree without extra messages. Only rank 0 writes
events, checkpoints and the bundle. A stop request on any rank stops all of them (`any_flag`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    """This process's rank from torchrun's environment (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def init(device: torch.device) -> DistEnv:
    """Join the process group when launched by torchrun; a no-op single-process env otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistEnv(world, rank, local, backend)


def rank_device(device: torch.device, env: DistEnv) -> torch.device:
    if env.enabled and device.type == "cuda":
        return torch.device("cuda", env.local_rank)
    return device


def wrap(module: nn.Module, env: DistEnv, device: torch.device) -> nn.Module:
    if not env.enabled:
        return module
    if device.type == "cuda":
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index], output_device=device.index
        )
    return nn.parallel.DistributedDataParallel(module)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def any_flag(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not env.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device if env.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.barrier()


def broadcast_state(module: nn.Module, env: DistEnv) -> None:
    """Make every rank hold rank 0's parameters and buffers (e.g. after loading a best checkpoint)."""
    if not env.enabled:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
