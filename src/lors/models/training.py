"""The ``train:`` section that the transformer families trained on the engine's loop share
(`lors.models.gpt`, `lors.models.vit`): a step budget, AdamW with weight decay on matrices, a
warm-up then cosine schedule, clipping, logging and checkpointing. A family subclasses it to
change defaults or add keys.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

from lors.config import at_least, positive, validate_sections  # noqa: F401 (re-exported: defined here before)


@dataclass
class StepTrainConfig:
    batch_size: int = 16
    steps: int = 1000                      # the budget: steps x batch_size examples
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1              # on weight matrices only
    clip_grad: float = 1.0
    seed: int = 0
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    checkpoint_every: int = 250
    log_every: int = 20
    eval_every: int = 0                    # 0: evaluate at the end only
    output_dir: str = "runs/train"

    def validate(self) -> None:
        for key in ("batch_size", "steps", "checkpoint_every", "log_every"):
            at_least(f"train.{key}", getattr(self, key), 1)
        for key in ("warmup_steps", "eval_every"):
            at_least(f"train.{key}", getattr(self, key), 0)
        positive("train.lr", self.lr)
        at_least("train.weight_decay", self.weight_decay, 0)
        at_least("train.clip_grad", self.clip_grad, 0, "0 disables clipping")
        if self.warmup_steps >= self.steps:
            warnings.warn(f"train.warmup_steps={self.warmup_steps} is not below train.steps={self.steps}: the "
                          f"learning rate never reaches train.lr={self.lr:g} (the last step runs at "
                          f"{self.steps / max(1, self.warmup_steps):.0%} of it); use fewer warm-up steps",
                          stacklevel=2)

