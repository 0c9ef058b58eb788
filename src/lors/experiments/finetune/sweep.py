"""`lors finetune`: the sweep that compares full fine-tuning, PEFT LoRA and Serial LoRA.

    results = run_sweep("minilm_fortunes", ["ranks=[4,8]"], seeds=[0, 1], report="r.md")

The sweep is a config (``lors/configs/finetune/NAME.yaml`` + ``key=value`` overrides, `FinetuneSweep`);
every run goes through `lors.experiments.runner` in a fresh process, so its time and peak
memory are its own. Each run trains in its own folder under ``runs_dir`` (`run_name`: method,
rank, seed and a hash of all that shapes its figures), so a rerun of an interrupted sweep
resumes the unfinished run from its checkpoint and reuses the finished runs' results
(``result.json``; a finished run's checkpoints are deleted, see `lors.experiments.finetune.run`).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from lors.config import load_config, to_dict
from lors.data.text import CATEGORIES, FORTUNES_DIR, TextSplit, load_fortunes
from lors.experiments.finetune.report import _write, comparison, summarize, table, write_plot, write_report
from lors.experiments.finetune.run import (METHODS, PRESET, FinetuneConfig, TrainingFields, training_fields,
                                           finetune, load_minilm, run_config)
from lors.experiments.runner import Job, run_jobs

RUNS_DIR = "runs/finetune"


@dataclass
class FinetuneSweep(TrainingFields):
    """What `lors finetune` compares: every method at every rank (full fine-tuning once), each
    seed, on the same data and budget; the `TrainingFields` (steps, batch_size, max_len, lr,
    head_lr, lora_plus_ratio, adapt_out) go to every run as they are. alpha=None is 2 x rank;
    lr=None as in FinetuneConfig."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    ranks: list[int] = field(default_factory=lambda: [8])  # full fine-tuning runs at the first only
    alpha: float | None = None
    train_per_class: int = 64
    test_per_class: int = 80
    data_dir: str = str(FORTUNES_DIR)

    def validate(self) -> None:
        if not self.methods:
            raise ValueError(f"methods is empty: name at least one of {list(METHODS)}, e.g. methods=[lora]")
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"unknown method '{m}' in methods: use any of {list(METHODS)}, "
                                 f"e.g. methods=[lora,serial-lora]")
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks {self.ranks} must hold at least one rank, each at least 1: "
                             f"e.g. ranks=[4,8,16,32]")
        if len(set(self.methods)) < len(self.methods) or len(set(self.ranks)) < len(self.ranks):
            raise ValueError(f"methods {self.methods} and ranks {self.ranks} must not repeat an entry")
        self.check_training_fields(("train_per_class", "test_per_class"))


def load_sweep(config: str | Path = PRESET, overrides: Sequence[str] = ()) -> FinetuneSweep:
    """A sweep from a preset (lors/configs/finetune/NAME.yaml) or YAML path and key=value overrides,
    validated (ValueError) before anything is loaded or trained."""
    return load_config(FinetuneSweep, str(config), list(overrides), kind="finetune")



def plan(sweep: FinetuneSweep, seeds: Sequence[int]) -> list[FinetuneConfig]:
    """The runs of a sweep, rank-major (an interrupted sweep still holds complete comparisons);
    full fine-tuning, which has no rank, runs at the first rank only."""
    return [FinetuneConfig(method=method, rank=rank, alpha=2.0 * rank if sweep.alpha is None else sweep.alpha,
                           seed=seed, **training_fields(sweep))
            for rank in sweep.ranks for method in sweep.methods
            if method != "full" or rank == sweep.ranks[0] for seed in seeds]


def _data(sweep: FinetuneSweep) -> dict:
    return {"categories": CATEGORIES, "train_per_class": sweep.train_per_class,
            "test_per_class": sweep.test_per_class, "root": sweep.data_dir}


def run_name(cfg: FinetuneConfig, train: TextSplit, test: TextSplit, data: dict, device: str,
             threads: int | None) -> str:
    """A run's folder name, ``METHOD-rRANK-sSEED-HASH``: the hash covers the run's config and data
    (`run_config`), the data settings, the device and the threads, all that shapes its figures."""
    key = json.dumps({"run": run_config(cfg, train, test), "data": data, "device": device, "threads": threads},
                     sort_keys=True)
    return f"{cfg.method}-r{cfg.rank}-s{cfg.seed}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _run_one(cfg: FinetuneConfig, data: dict, device: str, run_dir: str) -> dict:
    """One run (in its own process): load the data, train (or resume) in ``run_dir``, score."""
    train, test = load_fortunes(**data)
    return finetune(cfg, train, test, device=device, load=load_minilm, run_dir=run_dir)


def command_line(config: str | Path = PRESET, overrides: Sequence[str] = (), seeds: Sequence[int] = (0, 1),
                 device: str = "cpu", threads: int | None = None, json_path: str | None = None,
                 report: str | None = None, plot: str | None = None) -> str:
    """The `lors finetune` command that reproduces a sweep."""
    parts = ["lors", "finetune", "--config", str(config), *overrides, "--seeds", *map(str, seeds),
             "--device", device]
    for flag, value in (("--threads", threads), ("--report", report), ("--plot", plot), ("--json", json_path)):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def machine(device: str, threads: int | None = None) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    used = f", {threads} thread{'s' * (threads > 1)} per run" if threads else ""
    return f"CPU, {cores} cores ({platform.processor() or platform.machine()}){used}, torch {torch.__version__}"


def run_sweep(config: str | Path = PRESET, overrides: Sequence[str] = (), seeds: Sequence[int] = (0, 1),
              device: str = "cpu", threads: int | None = None, json_path: str | None = None,
              report: str | None = None, plot: str | None = None, runs_dir: str | Path = RUNS_DIR) -> list[dict]:
    """Load and validate the sweep, train every run of it one at a time, each in a fresh process
    (so its time and peak memory are its own) and its own folder under ``runs_dir`` (`run_name`:
    an unfinished run resumes, a finished one's result is reused), print a line per run, then
    the table and the comparison, and write the JSON, plot and report asked for. Returns the
    runs' results."""
    sweep = load_sweep(config, overrides)
    if not seeds:
        raise ValueError("no seeds: pass at least one, e.g. --seeds 0 1")
    data = _data(sweep)
    train, test = load_fortunes(**data)  # fail early if the data is missing
    configs = plan(sweep, seeds)

    def done(i: int, job: Job, r: dict) -> None:
        print(f"[{i + 1}/{len(configs)}] {r['method']:<11} rank {r['rank']:>2} seed {r['seed']}: "
              f"acc {r['accuracy']:.2f}%  trainable {r['trainable_params']:,}  {r['train_time_s']:.0f} s  "
              f"peak {r['peak_mem_mib']:.0f} MiB", flush=True)

    jobs = [Job(f"{c.method} rank {c.rank} seed {c.seed}", _run_one,
                (c, data, device, str(Path(runs_dir) / run_name(c, train, test, data, device, threads))),
                steps=c.steps) for c in configs]
    results = run_jobs(jobs, width=1, isolate=True, threads=threads, on_result=done)
    meta = {"command": command_line(config, overrides, seeds, device, threads, json_path, report, plot),
            "machine": machine(device, threads), "seeds": list(seeds), "sweep": to_dict(sweep),
            "classes": list(CATEGORIES), "train_size": len(train), "test_size": len(test),
            "steps": sweep.steps, "batch_size": sweep.batch_size, "max_len": sweep.max_len,
            "lr": sweep.lr or "5e-5 full / 1e-3 adapters", "head_lr": sweep.head_lr,
            "alpha": sweep.alpha or "2 x rank", "lora_plus_ratio": sweep.lora_plus_ratio,
            "adapt_out": sweep.adapt_out}
    rows = summarize(results)
    print(table(rows))
    print("\n".join(comparison(rows)))
    if json_path:
        _write(json_path, json.dumps({"meta": meta, "runs": results}, indent=1) + "\n")
    if plot:
        write_plot(rows, plot)
    if report:
        write_report(results, meta, report, plot)
    return results
