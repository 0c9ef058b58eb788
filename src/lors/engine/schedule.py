"""The learning-rate schedule of every training loop: a linear warm-up, then a decay.

    lr(step) = lr * decay(step), times warmup_start + (1 - warmup_start) * step / warmup_steps
                                 while step < warmup_steps

with ``decay`` one of
    "constant"  1
    "step"      gamma ** (number of ``milestones`` <= step)       (the detector's 1x schedule)
    "linear"    (total_steps - step) / (total_steps - warmup_steps), clipped to [0, 1]: 1 until the
                warm-up ends, then down to 0 at the end
    "cosine"    (1 + cos(pi * step / total_steps)) / 2

The rate is a function of the step alone, so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

DECAYS = ("constant", "step", "linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    """Learning rate against the global step (0-based: the rate of the step about to run)."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start: float = 0.0  # the warm-up's factor at step 0
    decay: Literal["constant", "step", "linear", "cosine"] = "constant"
    milestones: tuple[int, ...] = ()  # "step": steps at which the rate is multiplied by gamma
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise ValueError(f"unknown learning-rate decay {self.decay!r}: use one of {DECAYS}")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"a schedule needs total_steps >= 1 and warmup_steps >= 0, got "
                             f"{self.total_steps} and {self.warmup_steps}")

    def __call__(self, step: int, base: float | None = None) -> float:
        """The rate at ``step`` for a base rate of ``base`` (default ``self.lr``)."""
        lr = (self.lr if base is None else base) * self._decay(step)
        if step < self.warmup_steps:
            lr *= self.warmup_start + (1 - self.warmup_start) * step / self.warmup_steps
        return lr

    def _decay(self, step: int) -> float:
        if self.decay == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        if self.decay == "linear":
            return min(1.0, max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps)))
        if self.decay == "cosine":
            return 0.5 * (1 + math.cos(math.pi * step / self.total_steps))
        return 1.0

    def scale_groups(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set each parameter group's rate for ``step``: its *own* base rate (the ``lr`` it was
        built with, kept as ``group["base_lr"]`` and saved with the optimiser) times the
        schedule's warm-up and decay, so groups with other rates (a head, LoRA+'s B) keep their
        ratios. ``self.lr`` is not used here; it is the base of ``schedule(step)``. Returns the
        first group's rate."""
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = self(step, group["base_lr"])
        return optimizer.param_groups[0]["lr"]
