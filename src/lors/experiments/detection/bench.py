"""AdaMixer against AdaMixer + LORS on the digits-on-photos benchmark, on a CPU, in minutes:
`compare` (the two bench configs over seeds) and `ablate` (the paper's Tables 4-8).

`compare` builds the benchmark (cached), pretrains the backbone (cached), trains the two bench
configs with the same schedule and seeds, scores them with COCOeval and writes a table,
``summary.json``, a plot of AP against decoder parameters and a picture of predictions.
`ablate` trains the rows of a suite, ``lors/configs/ablate/SUITE.yaml`` (a title, the config the rows
override and, per row, a label and its ``key=value`` overrides), and writes a markdown table,
its JSON and a plot. Runs go through `lors.experiments.runner` (each in its own process, so its
peak memory is its own; two at a time on a 2-core machine).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lors.config import available_configs, load_config, to_dict
from lors.data.benchmark import build_or_reuse
from lors.engine.checkpoint import find_checkpoint
from lors.engine.sampler import EpochSampler
from lors.experiments.detection.pretrain import PretrainConfig
from lors.experiments.detection.report import KEYS, SHOWN_METRICS, aggregate, draw_predictions, plot_ap, results_table
from lors.experiments.report import write_summary
from lors.experiments.runner import Job, check_width, default_width, logged_step, run_jobs

VANILLA, LORS = "bench_adamixer", "bench_adamixer_lors"
PRETRAIN_STEPS = PretrainConfig.steps


@dataclass
class Variant:
    """A row of an ablation table: its label and its overrides of the suite's config."""
    label: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class Suite:
    """An ablation table (``lors/configs/ablate/NAME.yaml``)."""
    title: str
    config: str = LORS
    variants: list[Variant] = field(default_factory=list)

    def validate(self) -> None:
        if not self.variants:
            raise ValueError(f"ablation suite {self.title!r} has no variants: list at least one row")


def suite_names() -> list[str]:
    return available_configs("ablate")


def load_suite(name: str) -> Suite:
    """The suite ``lors/configs/ablate/NAME.yaml`` (or a YAML path); ValueError for an unknown one."""
    if name not in suite_names() and not Path(name).is_file():
        raise ValueError(f"unknown ablation suite {name!r}: choose one of {', '.join(suite_names())}, "
                         "or pass the path of a suite YAML file")
    return load_config(Suite, name, kind="ablate")


@dataclass
class SweepOptions:
    """How `compare` and `ablate` run: seeds, the benchmark folder, pretraining, parallelism."""
    seeds: list[int] = field(default_factory=lambda: [0])
    data_dir: str = "runs/bench_data"
    data_set: list[str] = field(default_factory=list)  # BenchmarkConfig overrides for a new folder
    overrides: list[str] = field(default_factory=list)  # detector config overrides for every run
    quiet: bool = False
    in_process: bool = False
    max_steps: int | None = None
    jobs: int | None = None
    pretrain: bool = True
    pretrain_steps: int = PRETRAIN_STEPS


def sweep_flags(opts: SweepOptions) -> list[str]:
    """The command-line flags of ``opts`` that change a sweep's figures (seeds last, since
    ``--seeds`` takes every number after it), shell-quoted, for the "Command:" line of a table."""
    import shlex
    default = SweepOptions()
    flags = [*(["--data-dir", opts.data_dir] if opts.data_dir != default.data_dir else []),
             *[f for kv in opts.data_set for f in ("--data-set", kv)],
             *(["--no-pretrain"] if not opts.pretrain else
               ["--pretrain-steps", str(opts.pretrain_steps)] if opts.pretrain_steps != default.pretrain_steps
               else []),
             *(["--max-steps", str(opts.max_steps)] if opts.max_steps else []),
             *opts.overrides, "--seeds", *map(str, opts.seeds)]
    return [shlex.quote(f) for f in flags]


def data_overrides(data_dir: str | Path) -> list[str]:
    """Config overrides pointing a detector config at a benchmark folder."""
    d = Path(data_dir)
    return [f"data.train_images={d / 'train' / 'images'}",
            f"data.train_annotations={d / 'train' / 'annotations.json'}",
            f"data.val_images={d / 'val' / 'images'}",
            f"data.val_annotations={d / 'val' / 'annotations.json'}"]


@dataclass
class Run:
    """One training run: a model label, its config (name or path), overrides and seed."""
    label: str
    config: str
    overrides: list[str]
    seed: int

    def load(self, data_dir: Path):
        from lors.models.adamixer import load_detector_config
        return load_detector_config(self.config, [*self.overrides, *data_overrides(data_dir),
                                                  f"train.seed={self.seed}"])


def train_and_evaluate(cfg, run_dir: str, progress: bool, max_steps: int | None = None) -> dict:
    """Train ``cfg`` into ``run_dir`` (to ``max_steps`` at most), evaluate, write and return
    ``result.json``'s summary; COCOeval's text goes to ``eval.txt``."""
    import contextlib

    import torch

    from lors.experiments.detection.evaluate import evaluate_checkpoint
    from lors.experiments.detection.train import train
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "eval.txt").open("w") as text, contextlib.redirect_stdout(text):
        summary = train(cfg, run_dir, resume=False, progress=progress, stop_after=max_steps)
        if "metrics" not in summary:  # stopped before the end of the schedule: evaluate here
            summary["metrics"] = evaluate_checkpoint(find_checkpoint(run_dir), cfg,
                                                     torch.device("cpu"), progress=progress)
    (run_dir / "result.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_key(cfg, max_steps: int | None) -> str:
    """A short hash of a resolved config and step limit: runs that would train the same thing
    (e.g. the base row that every ablation table repeats) share one run directory."""
    text = json.dumps({"config": to_dict(cfg), "max_steps": max_steps}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def planned_steps(cfg, max_steps: int | None = None) -> int:
    """Training steps of ``cfg``'s schedule on its train split (``max_steps`` at most)."""
    num_images = len(json.loads(Path(cfg.data.train_annotations).read_text())["images"])
    steps = cfg.train.epochs * EpochSampler(num_images, cfg.train.batch_size, cfg.train.seed).steps
    return min(steps, max_steps) if max_steps else steps


def run_all(runs: list[tuple[str, Run, Path]], data_dir: Path, opts: SweepOptions,
            reuse: bool = False) -> list[dict]:
    """Train and score each (title, run, run_dir) with `run_jobs`; each result holds the KEYS
    (params, AP..., time per step, peak memory) plus steps and run_dir. With ``reuse``, a run
    whose ``result.json`` exists is read back instead of trained again."""
    from lors.models.adamixer.report import detect_report
    width = max(1, opts.jobs or (1 if opts.in_process else default_width()))
    check_width(width, isolate=not opts.in_process)  # before any config is loaded
    jobs, cfgs = [], []
    for title, run, run_dir in runs:
        cfg = run.load(data_dir)
        cfgs.append(cfg)
        if reuse and (run_dir / "result.json").exists():
            print(f"== {title}\n   reusing the finished run in {run_dir}", flush=True)
            continue
        (run_dir / "result.json").unlink(missing_ok=True)
        jobs.append(Job(title, train_and_evaluate, (cfg, str(run_dir), not opts.quiet and width == 1, opts.max_steps),
                        steps=planned_steps(cfg, opts.max_steps), done=lambda d=run_dir: logged_step(d)))
    run_jobs(jobs, width=width, isolate=not opts.in_process, quiet=opts.quiet)
    results = []
    for (title, run, run_dir), cfg in zip(runs, cfgs):
        summary = json.loads((run_dir / "result.json").read_text())
        report = detect_report(cfg)
        results.append({"decoder_params": report["decoder"], "total_params": report["total"],
                        **{k: summary["metrics"][k] for k in SHOWN_METRICS},
                        "seconds_per_step": summary["seconds_per_step"],
                        "peak_memory_mb": summary["peak_memory_mb"], "steps": summary["steps"],
                        "run_dir": str(run_dir)})
    return results


def pretrained_backbone(opts: SweepOptions, data_dir: Path, runs: Sequence[Run]) -> Path | None:
    """With ``opts.pretrain``: the digit-pretrained ResNet-18 of ``opts.pretrain_steps`` steps,
    with as many stages as the deepest of ``runs`` reads, cached in ``data_dir`` under a name
    keyed by its settings (trained if missing)."""
    if not opts.pretrain:
        return None
    levels = max(run.load(data_dir).backbone.num_levels for run in runs)
    from lors.experiments.detection.pretrain import cached_digit_backbone
    cfg = PretrainConfig(steps=opts.pretrain_steps, levels=levels)
    path = cached_digit_backbone(data_dir, cfg, progress=not opts.quiet)
    print(f"backbone: {path} (ResNet-18 pretrained on the train split's digits, {cfg.steps} steps)",
          flush=True)
    return path


def compare(opts: SweepOptions, out: str | Path = "runs/compare", vanilla: str = VANILLA,
            lors: str = LORS) -> dict:
    """Train and score the vanilla and LORS configs for each seed; write summary.json, table.md,
    ap_vs_decoder_params.png and predictions.png to ``out``; returns the summary."""
    tic = time.perf_counter()
    out = Path(out)
    data_dir = build_or_reuse(opts.data_dir, opts.data_set, progress=not opts.quiet)
    models = {"AdaMixer": vanilla, "AdaMixer + LORS": lors}
    folders = {"AdaMixer": "vanilla", "AdaMixer + LORS": "lors"}  # run folders: <folder>_seed<S>
    pretrained = pretrained_backbone(opts, data_dir, [Run(label, config, opts.overrides, opts.seeds[0])
                                                      for label, config in models.items()])
    overrides = [*([f"backbone.weights={pretrained}"] if pretrained else []), *opts.overrides]

    def run_dir(label: str, seed: int) -> Path:
        return out / f"{folders[label]}_seed{seed}"

    runs = [(f"{label} ({config}), seed {seed}", Run(label, config, overrides, seed), run_dir(label, seed))
            for seed in opts.seeds for label, config in models.items()]
    per_model: dict[str, list[dict]] = {m: [] for m in models}
    for (_, run, _), result in zip(runs, run_all(runs, data_dir, opts)):
        per_model[run.label].append(result)
    rows = {m: {**aggregate(r), "n_seeds": len(r), "per_seed": r} for m, r in per_model.items()}
    table = results_table(rows)
    plot = plot_ap(rows, out / "ap_vs_decoder_params.png",
                   f"digits-on-photos val, mean over seeds {list(opts.seeds)}")
    preds = draw_predictions({m: run_dir(m, opts.seeds[0]) for m in models}, data_dir, out / "predictions.png")
    spread = tuple(f"{k}_std" for k in (*SHOWN_METRICS, "seconds_per_step"))
    summary = {"models": {m: {k: r[k] for k in (*KEYS, *spread, "per_seed")} | {"config": models[m]}
                          for m, r in rows.items()},
               "seeds": list(opts.seeds), "max_steps": opts.max_steps, "data_dir": str(data_dir),
               "overrides": overrides, "pretrained_backbone": str(pretrained) if pretrained else None,
               "wall_seconds": time.perf_counter() - tic}
    summary["decoder_params_ratio"] = (rows["AdaMixer + LORS"]["decoder_params"] / rows["AdaMixer"]["decoder_params"])
    written = write_summary(out, summary, table)
    print(f"\nAdaMixer vs AdaMixer + LORS, seeds {list(opts.seeds)} "
          f"(AP in %, mean ± sample std over seeds; CPU time per training step):\n")
    print(table)
    print(f"\nLORS decoder / vanilla decoder = {summary['decoder_params_ratio']:.1%}; "
          f"wall time {summary['wall_seconds'] / 60:.1f} min")
    print(f"wrote {', '.join(map(str, written))}, {plot}, {preds}")
    return summary


def ablate(opts: SweepOptions, suite: str, config: str | None = None, out_dir: str | Path = "runs/ablate",
           runs_dir: str | Path = "runs/ablate", retrain: bool = False) -> dict:
    """Train every row of ``suite`` for each seed (on ``config``, default the suite's); write
    ablation_SUITE.md, .json and .png to ``out_dir``; returns the rows."""
    spec = load_suite(suite)
    config = config or spec.config
    variants = [(v.label, list(v.overrides)) for v in spec.variants]
    tic = time.perf_counter()
    data_dir = build_or_reuse(opts.data_dir, opts.data_set, progress=not opts.quiet)
    pretrained = pretrained_backbone(opts, data_dir, [Run(label, config, [*ov, *opts.overrides], 0)
                                                      for label, ov in variants])
    common = [*([f"backbone.weights={pretrained}"] if pretrained else []), *opts.overrides]
    jobs = {}  # run directory -> job: rows that train the same config share one run
    wanted = []
    for label, overrides in variants:
        for seed in opts.seeds:
            run = Run(label, config, [*overrides, *common], seed)
            run_dir = Path(runs_dir) / run_key(run.load(data_dir), opts.max_steps)
            jobs.setdefault(run_dir, (f"{suite}: {label}, seed {seed}", run, run_dir))
            wanted.append((label, run_dir))
    results = dict(zip(jobs, run_all(list(jobs.values()), data_dir, opts, reuse=not retrain)))
    rows = {}
    for label, overrides in variants:
        per_seed = [results[run_dir] for row, run_dir in wanted if row == label]
        rows[label] = {**aggregate(per_seed), "n_seeds": len(per_seed), "per_seed": per_seed,
                       "overrides": overrides}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(rows, "Variant")
    command = " ".join(["lors detect ablate --suite", suite,
                        *(["--config", config] if config != spec.config else []), *sweep_flags(opts)])
    md = (f"# {spec.title}\n\nCommand: `{command}`  \nBase config: `{config}` plus each row's "
          f"overrides; seeds {list(opts.seeds)} (AP in %, mean ± sample std over seeds); "
          f"wall time {(time.perf_counter() - tic) / 60:.1f} min.\n\n{table}\n\n"
          + "\n".join(f"- {label}: `{' '.join(r['overrides']) or '(the base config)'}`" for label, r in rows.items())
          + "\n")
    name = Path(suite).stem
    (out / f"ablation_{name}.md").write_text(md)
    (out / f"ablation_{name}.json").write_text(json.dumps(rows, indent=2))
    plot = plot_ap(rows, out / f"ablation_{name}.png", spec.title)
    print(md)
    print(f"wrote {out / f'ablation_{name}.md'} and {plot}")
    return rows
