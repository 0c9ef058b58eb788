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

from lors.config import check_rule
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
class LorsLayers:
    """What every ``lors:`` config section shares: the ``rank`` and ``groups`` of LORS's private
    residuals over a stack, each an int (every layer) or a list of one per layer (per decoder
    stage, for the detector), checked by `lors.core.static.per_layer` (`check_per_layer`).

    The transformers' ``lors:`` section is one (`LorsSection`: one LORS^T over the blocks). The
    detector's ``lors:`` section (`lors.models.adamixer.config.LorsConfig`) nests two, each one
    of these with its own defaults: ``lors.adaptive`` (LORS^A on the generated mixing) and
    ``lors.static`` (LORS^T on the output projection).
    """
    rank: int | list[int] = 8
    groups: int | list[int] = 1

    def check_per_layer(self, prefix: str, count: int, count_key: str, unit: str = "layer",
                        keys: Sequence[str] = ("rank", "groups"), lengths: bool = True) -> None:
        """ValueError unless each of ``keys`` that is set (not None), config key ``PREFIX.KEY``,
        is an int >= 1 or a list of ``count`` of them (one per ``unit``; ``count_key`` is the key
        ``count`` comes from). With ``lengths`` false (a section that is switched off) a list of
        any length passes; its values are still checked."""
        for key in keys:
            value = getattr(self, key)
            if value is not None:
                n = count if lengths or not isinstance(value, list) else len(value)
                per_layer(value, n, f"config key '{prefix}.{key}'", unit=unit, count_key=count_key, minimum=1)


@dataclass
class LorsSection(LorsLayers):
    """The ``lors:`` section of a model config: LORS^T on the block Linears (used when
    ``model.sharing`` is "lors"); ``rank`` and ``groups`` come from `LorsLayers`."""
    targets: list[str] = field(default_factory=lambda: list(BLOCK_LINEARS))
    init: Literal["paper", "official"] = "paper"
    attn_rank: int | list[int] | None = None  # instead of rank for attn.* targets (e.g. more in deeper layers)
    mlp_rank: int | list[int] | None = None   # instead of rank for mlp.* targets

    def rank_of(self, target: str) -> int | list[int]:
        own = self.attn_rank if target.startswith("attn.") else self.mlp_rank if target.startswith("mlp.") else None
        return self.rank if own is None else own

    def validate(self, n_layer: int) -> None:
        """``n_layer``: the model's number of blocks (a `lors.config.LayerCount` names its key)."""
        unknown = [t for t in self.targets if t not in BLOCK_LINEARS]
        check_rule(not unknown and bool(self.targets), "lors.targets",
                   f"has {unknown or 'no targets'}: choose from {list(BLOCK_LINEARS)}")
        self.check_per_layer("lors", n_layer, getattr(n_layer, "key", "model.n_layer"), keys=("rank", "groups", "attn_rank", "mlp_rank"))
