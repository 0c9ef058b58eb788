"""`lors lm compare`: does LORS pay off in a GPT trained from scratch?

For the same token budget and seeds it trains four models and reports val bits per byte:
  dense        the base config (``model.sharing=none``);
  LORS         LORS^T on all four block Linears (the LORS preset);
  tied         one block's weights for every layer, no private part (ALBERT-style);
  dense-small  a dense model as deep as the base but narrower, with the width whose
               non-embedding parameter count is closest to the LORS model's.
Runs go through `lors.experiments.runner` (each in its own process, two at a time on a 2-core
machine). Writes ``summary.json``, ``table.md``, ``bpb_vs_params.png`` (val bits per byte
against non-embedding parameters) and ``val_curves.png`` (val bits per byte against training
tokens, mean over seeds).
"""
from __future__ import annotations

import copy
import csv
import json
import statistics
import time
from pathlib import Path
from typing import Sequence

from lors.config import to_dict
from lors.core import count_parameters
from lors.experiments.report import Column, Series, markdown_table, mean_and_spread, plot_points
from lors.experiments.runner import Job, default_width, logged_step, run_jobs
from lors.models.gpt import LMConfig, build_gpt, load_lm_config

MODELS = ("dense", "LORS", "tied", "dense-small")


def non_embedding_params(cfg: LMConfig) -> tuple[int, int]:
    """(non-embedding, total) parameters of ``cfg``'s model, shared tensors once; the token
    embedding (tied to the output layer) and learned positions are the embedding."""
    model = build_gpt(cfg, device="meta")
    total = count_parameters(model).total
    embed = model.wte.weight.numel() + (model.wpe.weight.numel() if model.wpe is not None else 0)
    return total - embed, total


def small_width(base: LMConfig, target: int) -> int:
    """The dense width (a multiple of 2 x n_head, so heads stay even) whose non-embedding
    parameter count is closest to ``target``."""
    step = 2 * base.model.n_head
    best = None
    for width in range(step, base.model.n_embd + 1, step):
        cfg = load_lm_config(None, [f"model.{k}={v}" for k, v in to_dict(base.model).items()
                                    if k not in ("n_embd", "sharing")] + [f"model.n_embd={width}"])
        gap = abs(non_embedding_params(cfg)[0] - target)
        if best is None or gap < best[0]:
            best = (gap, width)
    return best[1]


def model_configs(dense: str, lors: str, tied: str, overrides: Sequence[str]) -> dict[str, LMConfig]:
    """The four models' configs (the overrides apply to all)."""
    cfgs = {"dense": load_lm_config(dense, overrides), "LORS": load_lm_config(lors, overrides),
            "tied": load_lm_config(tied, overrides)}
    width = small_width(cfgs["dense"], non_embedding_params(cfgs["LORS"])[0])
    cfgs["dense-small"] = load_lm_config(dense, [*overrides, f"model.n_embd={width}"])
    return cfgs


def train_one(cfg: LMConfig, run_dir: str, progress: bool) -> dict:
    """One run (in its own process): train, evaluate, return the summary."""
    from lors.experiments.lm.train import train
    return train(cfg, run_dir, resume=False, progress=progress)


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    with (run_dir / "val.csv").open() as f:
        return [(int(r["step"]), float(r["val_bpb"])) for r in csv.DictReader(f)]


def compare(seeds: Sequence[int] = (0, 1), out: str | Path = "runs/lm_compare", dense: str = "gpt_small",
            lors: str = "gpt_small_lors", tied: str = "gpt_small_tied", overrides: Sequence[str] = (),
            jobs: int | None = None, quiet: bool = False) -> dict:
    """Train the four models for every seed; write and print the table; returns the summary."""
    tic = time.perf_counter()
    out = Path(out)
    cfgs = model_configs(dense, lors, tied, overrides)
    width = max(1, jobs or default_width())
    runs, job_list = [], []
    for seed in seeds:
        for name, cfg in cfgs.items():
            run_cfg = copy.deepcopy(cfg)
            run_cfg.train.seed = seed
            run_dir = out / f"{name}_seed{seed}"
            runs.append((name, seed, run_dir))
            job_list.append(Job(f"{name}, seed {seed}", train_one, (run_cfg, str(run_dir), not quiet and width == 1),
                                steps=cfg.train.steps, done=lambda d=run_dir: logged_step(d)))
    results = run_jobs(job_list, width=width, quiet=quiet)
    rows = []
    for name, cfg in cfgs.items():
        per_seed = [r for (n, _, _), r in zip(runs, results) if n == name]
        ne, total = non_embedding_params(cfg)
        tokens = cfg.train.batch_size * cfg.model.block_size
        bpb = [r["metrics"]["val_bpb"] for r in per_seed]
        curves = [val_curve(d) for (n, _, d) in runs if n == name]
        rows.append({"model": name, "n_layer": cfg.model.n_layer, "n_embd": cfg.model.n_embd,
                     "sharing": cfg.model.sharing, "non_embedding_params": ne, "total_params": total,
                     "val_bpb_per_seed": bpb,
                     **mean_and_spread([{"val_bpb": b, "tokens_per_s": tokens / r["seconds_per_step"],
                                         "peak_memory_mb": r["peak_memory_mb"]} for b, r in zip(bpb, per_seed)],
                                       ("val_bpb", "tokens_per_s", "peak_memory_mb"), ("val_bpb",)),
                     "curve": [(s, statistics.fmean(c[i][1] for c in curves)) for i, (s, _) in enumerate(curves[0])]})
    dense_ne = rows[0]["non_embedding_params"]
    columns = [Column("Model", lambda r: r["model"]),
               Column("Layers x width", lambda r: f"{r['n_layer']} x {r['n_embd']}"),
               Column("Non-embedding params", lambda r: f"{r['non_embedding_params']:,} "
                                                        f"({r['non_embedding_params'] / dense_ne:.0%})"),
               Column("Total params", lambda r: f"{r['total_params']:,}"),
               Column("Val bits/byte", lambda r: f"{r['val_bpb']:.4f}" + (f" ± {r['val_bpb_std']:.4f}"
                                                                          if len(seeds) > 1 else "")),
               Column("Tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
               Column("Peak mem (MB)", lambda r: f"{r['peak_memory_mb']:.0f}")]
    table = markdown_table(rows, columns)
    base = cfgs["dense"]
    tokens_per_step = base.train.batch_size * base.model.block_size
    plot_points([Series(r["model"], [r["non_embedding_params"] / 1e6], [r["val_bpb"]], [r["val_bpb_std"]],
                        notes=[r["model"]]) for r in rows], out / "bpb_vs_params.png",
                "non-embedding parameters (M)", "val bits per byte", f"byte-level GPT, seeds {list(seeds)}")
    plot_points([Series(r["model"], [s * tokens_per_step / 1e6 for s, _ in r["curve"]], [b for _, b in r["curve"]],
                        style="o-") for r in rows], out / "val_curves.png", "training tokens (M)",
                "val bits per byte", f"val bits per byte during training, mean of seeds {list(seeds)}")
    summary = {"seeds": list(seeds), "overrides": list(overrides), "configs": {"dense": dense, "LORS": lors,
               "tied": tied, "dense-small": f"{dense} model.n_embd={cfgs['dense-small'].model.n_embd}"},
               "tokens_per_run": base.train.steps * tokens_per_step, "rows": rows,
               "wall_seconds": time.perf_counter() - tic}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "table.md").write_text(table + "\n")
    print(f"\nbyte-level GPT, {summary['tokens_per_run']:,} training tokens per run, seeds {list(seeds)} "
          f"(val bits per byte, mean ± sample std):\n")
    print(table)
    print(f"\nwall time {summary['wall_seconds'] / 60:.1f} min; wrote {out / 'summary.json'}, {out / 'table.md'}, "
          f"{out / 'bpb_vs_params.png'}, {out / 'val_curves.png'}")
    return summary
