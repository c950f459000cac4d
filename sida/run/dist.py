"""Distributed setup: the only path. A plain `python -m` run is a world of size 1.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR; without them we build a one-process
group on an in-memory store, so the training code never branches on "distributed or not".
gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # The process group the training loops average gradients over: None is the whole job. A
    # subgroup lets a benchmark run a one-process loop on rank 0 beside a job-wide one.
    group: object = None

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes files and logs."""
        return self.rank == 0


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """Resolve the config's `device` ('auto' | 'cpu' | 'cuda') to a torch device."""
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but no CUDA device is visible: set device: cpu or auto")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def launched() -> bool:
    """True in a process a launcher started as part of a job (torchrun sets these)."""
    return "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def init(device_pref: str = "auto", threads: int = 0) -> DistInfo:
    """Join (or create) the process group; idempotent."""
    if threads > 0:
        torch.set_num_threads(threads)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if launched():
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown() -> None:
    """Leave the process group (quietly if there is none)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op for a world of one)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def gather_objects(obj: object) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
