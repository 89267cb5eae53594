"""Data-parallel training with torch.distributed, set up from the environment that torchrun provides.

    torchrun --standalone --nproc_per_node=8 main.py --config configs/vp_cifar.py --mode train    # one node
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --master_port=29500 --nproc_per_node=8 main.py ...

`training.batch_size` is the batch of one process: the global batch is batch_size × world size. Without the
torchrun variables (WORLD_SIZE unset or 1) everything runs in one process and nothing here does any work.
CUDA devices use NCCL (rank r on cuda:LOCAL_RANK); CPU runs use gloo.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Tuple

import torch
import torch.distributed as dist

from .errors import UsageError


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes checkpoints, reports and pictures."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def shard(self):
        """(rank, world size), as the losses and datasets take it."""
        return self.rank, self.world_size


def global_rows(n: int, rank: int = 0, world_size: int = 1) -> Tuple[int, slice]:
    """(rows of the global batch, this rank's slice of them) for a per-rank batch of n.

    Data-parallel randomness (batch order, augmentation, the loss's noise) is drawn for the whole global batch of
    n·world_size rows from a generator that is the same on every rank, and rank r keeps rows [r·n, (r+1)·n): the
    ranks together see exactly what one process with the global batch sees.
    """
    return n * world_size, slice(rank * n, (rank + 1) * n)


STORE_TIMEOUT = datetime.timedelta(minutes=30)  # torch's default for joining the process group


def world_from_env() -> World:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun); a single process when they are absent."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return World()
    missing = [key for key in ("RANK", "MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE={world_size} but {', '.join(missing)} unset: launch with torchrun "
                           "(it sets them) or unset WORLD_SIZE for a single process")
    return World(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def setup(world: World, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU); returns this rank's device."""
    if not world.distributed:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=group_store(world),
                                rank=world.rank, world_size=world.world_size)
    return device


def group_store(world: World) -> dist.Store:
    """The rendezvous store at MASTER_ADDR:MASTER_PORT, its keys prefixed with torchrun's restart count: after a
    rank dies and torchrun restarts the group, the new ranks never read the addresses the dead group published
    (reading them made gloo fail to connect on some restarts). Under torchrun the agent hosts the store; without
    it, rank 0 does."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.world_size,
                          is_master=world.rank == 0 and not agent_store, timeout=STORE_TIMEOUT)
    return dist.PrefixStore(f"sde_diffusion/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of a tensor over all ranks (the tensor itself in a single process)."""
    if not world.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world.world_size


def gather(obj: Any, world: World) -> List[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out: List[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
