"""torch.distributed when launched by torchrun (gloo on CPU, nccl on GPU); a no-op otherwise."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


#: set by :func:`process_local`: training in this context ignores torchrun's other processes
_LOCAL = contextvars.ContextVar("vitkit_process_local", default=False)


@contextlib.contextmanager
def process_local() -> Iterator[None]:
    """Train on this process alone inside a torchrun launch (no DDP, this process writes its run):
    what a stage needs that shares independent trainings out over the processes (Deep Model
    Assembling's modules)."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def launched_rank() -> int:
    """This process's rank in the torchrun launch (0 without one, or inside :func:`process_local`)."""
    return 0 if _LOCAL.get() else int(os.environ.get("RANK", "0"))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun set up (RANK/WORLD_SIZE in the environment); a single-process
    DistInfo inside :func:`process_local`."""
    if _LOCAL.get():
        return DistInfo()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo, src: int = 0):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
