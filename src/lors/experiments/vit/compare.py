"""`lors vit compare` and `lors vit sweep`: the four-way comparison (`lors.experiments.compare`) and
the Pareto sweep (`lors.experiments.sweep`) for the ViT."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from lors.experiments.compare import Task, compare
from lors.experiments.sweep import sweep
from lors.experiments.vit.train import RESUME_FREE, train
from lors.models.vit import build_vit, load_vit_config


def _embedding(model) -> int:
    """The patch embedding, class token and positions: what every variant has in full."""
    return (sum(p.numel() for p in model.patch_embed.parameters()) + model.cls_token.numel()
            + model.pos_embed.numel())


def _train(cfg, run_dir: str, progress: bool) -> dict:
    return train(cfg, run_dir, resume=True, progress=progress)  # finished runs are reused


def _images(cfg) -> int:
    return cfg.train.batch_size


def _example_loss(model, cfg):
    """One training batch (for the FLOPs per image)."""
    m, n, device = cfg.model, cfg.train.batch_size, model.cls_token.device
    x = torch.zeros(n, m.in_chans, m.img_size, m.img_size, device=device)
    return F.cross_entropy(model(x), torch.zeros(n, dtype=torch.long, device=device)), n


VIT_TASK = Task(title="ViT on Fashion-MNIST", load=load_vit_config, build=build_vit, embedding=_embedding,
                train=_train, depth_key="model.depth", width_key="model.embed_dim", heads_key="model.num_heads",
                metric="val_acc", metric_label="test accuracy (%)", lower_is_better=False, unit="images",
                units_per_step=_images, resume_free=RESUME_FREE, example_loss=_example_loss)


# `lors vit compare` and `lors vit sweep` with their defaults (keywords of `compare` and `sweep`)
compare_vit = partial(compare, VIT_TASK, seeds=(0, 1), out="runs/vit_compare", dense="vit_small", lors="vit_small_lors",
                      tied="vit_small_tied")
sweep_vit = partial(sweep, VIT_TASK, seeds=(0,), out="runs/vit_sweep", dense="vit_small", lors="vit_small_lors",
                    widths=(32, 40, 48, 64), ranks=(4, 8, 16, 32), alloc="vit_small_lors_alloc")
