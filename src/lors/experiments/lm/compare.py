"""`lors lm compare`: the four-way comparison (`lors.experiments.compare`) for the byte-level GPT."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lors.experiments.compare import Task, compare
from lors.experiments.lm.train import RESUME_FREE, train
from lors.models.gpt import build_gpt, embedding_parameters, load_lm_config


def _train(cfg, run_dir: str, progress: bool) -> dict:
    return train(cfg, run_dir, resume=True, progress=progress)  # finished runs are reused


def _tokens(cfg) -> int:
    return cfg.train.batch_size * cfg.model.block_size


GPT_TASK = Task(title="byte-level GPT", load=load_lm_config, build=build_gpt, embedding=embedding_parameters, train=_train,
                depth_key="model.n_layer", width_key="model.n_embd", heads_key="model.n_head", metric="val_bpb",
                metric_label="val bits per byte", lower_is_better=True, unit="tokens", units_per_step=_tokens,
                resume_free=RESUME_FREE)


def compare_lm(seeds: Sequence[int] = (0, 1), out: str | Path = "runs/lm_compare", dense: str = "gpt_small",
               lors: str = "gpt_small_lors", tied: str = "gpt_small_tied", overrides: Sequence[str] = (),
               jobs: int | None = None, quiet: bool = False) -> dict:
    return compare(GPT_TASK, seeds, out, dense, lors, tied, overrides, jobs, quiet)
