"""How a stack of transformer blocks is shared, for every model family here (GPT, ViT).

``sharing``:
  "none"  every block keeps its own weights (dense);
  "lors"  the Linears named in ``targets`` share one weight per target plus a private low-rank
          residual per block (`lors.share_layers`, LORS^T);
  "tied"  every block uses block 0's weights of ``targets``; biases and norms stay per block
          (ALBERT-style: sharing without residuals).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

from torch import nn

from lors.core import share_layers

SHARINGS = ("none", "lors", "tied")
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # nanoGPT's and timm's names


def tie_blocks(blocks: nn.ModuleList, targets: Sequence[str] = BLOCK_LINEARS) -> None:
    """Every block's ``targets`` Linears use block 0's weight tensor; biases stay per block."""
    first = blocks[0]
    for block in blocks[1:]:
        for t in targets:
            block.get_submodule(t).weight = first.get_submodule(t).weight


def apply_sharing(blocks: nn.ModuleList, sharing: str, targets: Sequence[str], rank, groups, init: str) -> None:
    """Make ``blocks`` dense, LORS or tied (see the module docstring), in place."""
    if sharing not in SHARINGS:
        raise ValueError(f"unknown sharing {sharing!r}: use one of {SHARINGS}")
    if sharing == "lors":
        share_layers(blocks, targets=list(targets), rank=rank, groups=groups, init=init)
    elif sharing == "tied":
        tie_blocks(blocks, BLOCK_LINEARS)


@dataclass
class LorsSection:
    """The ``lors:`` section of a model config: LORS^T on the block Linears (used when
    ``model.sharing`` is "lors")."""
    targets: list[str] = field(default_factory=lambda: list(BLOCK_LINEARS))
    rank: int | list[int] = 8
    groups: int | list[int] = 1
    init: Literal["paper", "official"] = "paper"

    def validate(self, n_layer: int) -> None:
        unknown = [t for t in self.targets if t not in BLOCK_LINEARS]
        if unknown or not self.targets:
            raise ValueError(f"config key 'lors.targets' has {unknown or 'no targets'}: choose from {list(BLOCK_LINEARS)}")
        for key in ("rank", "groups"):
            value = getattr(self, key)
            values = value if isinstance(value, list) else [value]
            if isinstance(value, list) and len(value) != n_layer:
                raise ValueError(f"config key 'lors.{key}' has {len(value)} values but model.n_layer is {n_layer}: "
                                 "give one per layer or a single int")
            if any(v < 1 for v in values):
                raise ValueError(f"config key 'lors.{key}' must be >= 1, got {value}")
