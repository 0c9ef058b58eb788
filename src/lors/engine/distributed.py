"""Process-group helpers for ``torchrun --nproc_per_node=N -m lors …`` (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group that torchrun describes in the environment, if any.

    Returns (rank, world_size, device). Without torchrun: (0, 1, cuda:0 or cpu).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:  # "cuda" alone: this process's local GPU
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def setup(device: str | None, batch_size: int) -> tuple[int, int, torch.device, int]:
    """`init_distributed` and this process's share of a global batch of ``batch_size``:
    (rank, world, device, per-process batch). ValueError if the batch does not divide."""
    rank, world, dev = init_distributed(device)
    if batch_size % world:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by the {world} processes: make it "
                         "a multiple of the process count")
    return rank, world, dev, batch_size // world


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
