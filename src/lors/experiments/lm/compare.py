"""`lors lm compare` and `lors lm sweep`: the four-way comparison (`lors.experiments.compare`) and
the Pareto sweep (`lors.experiments.sweep`) for the byte-level GPT."""
from __future__ import annotations

from functools import partial

from lors.experiments.compare import Task, compare
import torch

from lors.experiments.sweep import sweep
from lors.experiments.lm.train import RESUME_FREE, lm_loss, train
from lors.models.gpt import build_gpt, embedding_parameters, load_lm_config


def _train(cfg, run_dir: str, progress: bool) -> dict:
    return train(cfg, run_dir, resume=True, progress=progress)  # finished runs are reused


def _tokens(cfg) -> int:
    return cfg.train.batch_size * cfg.model.block_size


def _example_loss(model, cfg):
    """One training batch (for the FLOPs per token)."""
    x = torch.zeros(cfg.train.batch_size, cfg.model.block_size + 1, dtype=torch.long, device=model.wte.weight.device)
    return lm_loss(model, x[:, :-1], x[:, 1:]), cfg.train.batch_size * cfg.model.block_size


GPT_TASK = Task(title="byte-level GPT", load=load_lm_config, build=build_gpt, embedding=embedding_parameters, train=_train,
                depth_key="model.n_layer", width_key="model.n_embd", heads_key="model.n_head", metric="val_bpb",
                metric_label="val bits per byte", lower_is_better=True, unit="tokens", units_per_step=_tokens,
                resume_free=RESUME_FREE, example_loss=_example_loss)


# `lors lm compare` and `lors lm sweep` with their defaults (keywords of `compare` and `sweep`)
compare_lm = partial(compare, GPT_TASK, seeds=(0, 1), out="runs/lm_compare", dense="gpt_small", lors="gpt_small_lors",
                     tied="gpt_small_tied")
sweep_lm = partial(sweep, GPT_TASK, seeds=(0,), out="runs/lm_sweep", dense="gpt_small", lors="gpt_small_lors",
                   widths=(48, 64, 96, 128), ranks=(4, 8, 16, 32), alloc="gpt_small_lors_alloc")
