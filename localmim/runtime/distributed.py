"""torchrun / DDP helpers: process-group init from the torchrun environment, rank helpers, device choice and the one
``DistributedDataParallel`` wrap (:func:`wrap_ddp`).

Under ``torchrun`` the environment carries ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without it we run as
rank 0 of 1 and never create a process group. The backend is NCCL on CUDA and Gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA (this process's local GPU) when available, else CPU; ``cpu``/``cuda`` as asked.

    Raises:
        ValueError: unknown name, or ``cuda`` asked for on a machine without CUDA.
    """
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto|cpu|cuda, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device=cuda but torch.cuda.is_available() is False")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the default process group when launched by torchrun (idempotent) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, dev)


def setup(device: str, dist_info: DistInfo | None = None) -> DistInfo:
    """``dist_info`` when the stage already started the process group, else :func:`init_distributed` (idempotent):
    a loop called directly (tests, benchmarks) starts it itself."""
    return dist_info if dist_info is not None else init_distributed(device)


def wrap_ddp(model: torch.nn.Module, info: DistInfo, **kwargs: Any) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` under torchrun (one device per process); ``model`` itself in a single
    process. ``kwargs`` go to DDP (e.g. ``forward_sync_buffers=False``)."""
    if not info.distributed:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, **kwargs)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all ranks (in place, returned); a no-op in a single process."""
    if get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= get_world_size()
    return t


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (a no-op in a single process)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[DistInfo]:
    """A stage's process group: started from torchrun's environment on entry (nothing to start in a single
    process), destroyed on exit, also on error. Training loops take the yielded :class:`DistInfo`."""
    info = init_distributed(device)
    try:
        yield info
    finally:
        cleanup()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DDP and/or ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
