"""A small vision transformer for 28 x 28 grey images, from timm's `VisionTransformer` (its
blocks name their Linears ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, as the GPT's do),
with its blocks dense, LORS or tied (`lors.models.sharing`), and its config.

Load a config with ``load_vit_config("vit_small_lors", ["lors.rank=16"])`` (``lors/configs/vit/``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

from lors.config import Sections, at_least, load_config, multiple_of, positive, within
from lors.models.sharing import LorsSection, apply_sharing
from lors.models.training import StepTrainConfig


@dataclass
class VitModelConfig:
    img_size: int = 28
    patch_size: int = 4
    in_chans: int = 1
    num_classes: int = 10
    embed_dim: int = 64
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    sharing: Literal["none", "lors", "tied"] = "none"

    def validate(self) -> None:
        for key in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads"):
            at_least(f"model.{key}", getattr(self, key), 1)  # first: the divisions below need them >= 1
        positive("model.mlp_ratio", self.mlp_ratio)
        multiple_of("model.img_size", self.img_size, "model.patch_size", self.patch_size)
        multiple_of("model.embed_dim", self.embed_dim, "model.num_heads", self.num_heads)


@dataclass
class VitTrainConfig(StepTrainConfig):
    batch_size: int = 64
    steps: int = 1500
    warmup_steps: int = 100
    weight_decay: float = 0.05
    checkpoint_every: int = 500
    eval_every: int = 250
    output_dir: str = "runs/vit"


@dataclass
class VitDataConfig:
    root: str = "/usr/share/datasets/fashion-mnist"  # the Debian package dataset-fashion-mnist
    train_images: int = 60000  # the first N of the train split (fewer: a quicker run)
    test_images: int = 10000

    def validate(self) -> None:
        within("data.train_images", self.train_images, 1, 60000, "[]", "the train split's size")
        within("data.test_images", self.test_images, 1, 10000, "[]", "the test split's size")


class VitConfig(Sections, lors_layers="model.depth"):
    model: VitModelConfig
    lors: LorsSection
    train: VitTrainConfig
    data: VitDataConfig


def load_vit_config(name_or_path: str | None = None, overrides: Sequence[str] = ()) -> VitConfig:
    """A preset in lors/configs/vit (or a YAML path), with ``key=value`` overrides, validated."""
    return load_config(VitConfig, name_or_path, overrides, kind="vit")


def build_vit(cfg: VitConfig, device: torch.device | str | None = None) -> nn.Module:
    """timm's VisionTransformer as ``cfg.model`` describes it (class token, no pre-norm), with its
    blocks shared as ``cfg.model.sharing`` says. Needs timm: pip install -e '.[vit]'."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as err:
        raise ValueError("the ViT needs timm: pip install -e '.[vit]' (or pip install timm)") from err
    m = cfg.model
    with torch.device(device) if device is not None else torch.device("cpu"):
        model = VisionTransformer(img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans,
                                  num_classes=m.num_classes, embed_dim=m.embed_dim, depth=m.depth,
                                  num_heads=m.num_heads, mlp_ratio=m.mlp_ratio)
    apply_sharing(model.blocks, m.sharing, cfg.lors, std=0.02)  # as timm starts its Linears: std 0.02, zero bias
    return model
