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

import torch
from torch import nn

from lors.core import share_layers
from lors.core.static import per_layer

SHARINGS = ("none", "lors", "tied")
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # nanoGPT's and timm's names
# The Linears that write a block's output back into the residual stream (Llama, BERT, nanoGPT
# and timm names). The others (q, k, v, gate, up) read the stream, a space adjacent layers share;
# a writer reads its own layer's attention or MLP output, a space of that layer alone.
RESIDUAL_WRITERS = ("o_proj", "down_proj", "attention.output.dense", "output.dense", "attn.proj", "mlp.fc2")


def writes_residual(target: str) -> bool:
    """Whether the Linear at ``target`` (a name within a block) writes the residual stream."""
    return target.endswith(RESIDUAL_WRITERS)


def tie_blocks(blocks: nn.ModuleList, targets: Sequence[str] = BLOCK_LINEARS) -> None:
    """Every block's ``targets`` Linears use block 0's weight tensor; biases stay per block."""
    first = blocks[0]
    for block in blocks[1:]:
        for t in targets:
            block.get_submodule(t).weight = first.get_submodule(t).weight


def apply_sharing(blocks: nn.ModuleList, sharing: str, lors: "LorsSection",
                  std: float | None = None, residual_std: float | None = None) -> None:
    """Make ``blocks`` dense, LORS or tied (see the module docstring), in place.

    With ``std``, a LORS stack's shared part starts as the family's own Linears do rather than
    with `share_layers`' ``init``: shared weight N(0, std) (N(0, residual_std) for the
    projections back into the residual stream, ``attn.proj`` and ``mlp.fc2``) and zero biases;
    the private factors keep ``init`` (A zero for "paper", so every layer starts equal to the
    shared weight).
    """
    if sharing not in SHARINGS:
        raise ValueError(f"unknown sharing {sharing!r}: use one of {SHARINGS}")
    if sharing == "lors":
        stacks = {}
        for target in lors.targets:  # one call per target: attention and MLP may differ in rank
            stacks.update(share_layers(blocks, targets=[target], rank=lors.rank_of(target), groups=lors.groups,
                                       init=lors.init))
        if std is not None:
            with torch.no_grad():
                for target, stack in stacks.items():
                    out_std = residual_std if residual_std is not None and writes_residual(target) else std
                    stack.shared_weight.normal_(0.0, out_std)
                    if stack.bias is not None:
                        stack.bias.zero_()
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
    attn_rank: int | list[int] | None = None  # instead of rank for attn.* targets (e.g. more in deeper layers)
    mlp_rank: int | list[int] | None = None   # instead of rank for mlp.* targets

    def rank_of(self, target: str) -> int | list[int]:
        own = self.attn_rank if target.startswith("attn.") else self.mlp_rank if target.startswith("mlp.") else None
        return self.rank if own is None else own

    def validate(self, n_layer: int) -> None:
        unknown = [t for t in self.targets if t not in BLOCK_LINEARS]
        if unknown or not self.targets:
            raise ValueError(f"config key 'lors.targets' has {unknown or 'no targets'}: choose from {list(BLOCK_LINEARS)}")
        for key in ("rank", "groups", "attn_rank", "mlp_rank"):
            if getattr(self, key) is not None:
                per_layer(getattr(self, key), n_layer, f"config key 'lors.{key}'", count_key="model.n_layer",
                          minimum=1)
