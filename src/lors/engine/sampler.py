"""Data order as a function of (seed, epoch, index): what makes a resumed run exact."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler


class EpochSampler(Sampler[int]):
    """This process's share of a permutation drawn from (seed, epoch), from ``start`` on.

    Every process takes every ``world``-th index of the same permutation (trimmed to a
    multiple of ``world * batch``, so all processes run the same number of steps).
    """

    def __init__(self, size: int, batch: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.batch, self.seed, self.rank, self.world = size, batch, seed, rank, world
        self.epoch, self.start = 0, 0
        self.steps = size // (batch * world)
        if size == 0:
            raise ValueError("the training set is empty (no images or items): check the config's "
                             "data.train_* paths (the detector's data.train_annotations and data.train_images)")
        if self.steps == 0:
            raise ValueError(f"the data set has {size} items, fewer than one global batch of "
                             f"{batch * world}: lower train.batch_size")

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        order = torch.randperm(self.size, generator=g)[: self.steps * self.batch * self.world]
        mine = order[self.rank:: self.world]
        return iter(mine[self.start * self.batch:].tolist())

    def __len__(self) -> int:
        return (self.steps - self.start) * self.batch


class SeededItems(Dataset):
    """Wraps a data set so item ``i`` of epoch ``e`` is augmented with RNG seed (seed, e, i),
    whichever process or worker loads it, without touching the caller's RNG."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1000003 + self.epoch) * 1000003 + index)
            return self.dataset[index]
