"""`lors lm compare` and `lors lm sweep`: the four-way comparison (`lors.experiments.compare`) and
the Pareto sweep (`lors.experiments.sweep`) for the byte-level GPT."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

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


def compare_lm(seeds: Sequence[int] = (0, 1), out: str | Path = "runs/lm_compare", dense: str = "gpt_small",
               lors: str = "gpt_small_lors", tied: str = "gpt_small_tied", overrides: Sequence[str] = (),
               jobs: int | None = None, quiet: bool = False) -> dict:
    return compare(GPT_TASK, seeds, out, dense, lors, tied, overrides, jobs, quiet)


def sweep_lm(seeds: Sequence[int] = (0,), out: str | Path = "runs/lm_sweep", dense: str = "gpt_small",
             lors: str = "gpt_small_lors", widths: Sequence[int] = (48, 64, 96, 128), ranks: Sequence[int] = (4, 8, 16, 32),
             alloc: str | None = "gpt_small_lors_alloc", overrides: Sequence[str] = (), jobs: int | None = None,
             quiet: bool = False) -> dict:
    return sweep(GPT_TASK, seeds, out, dense, lors, widths, ranks, alloc, overrides, jobs, quiet)
