"""AdaMixer against AdaMixer + LORS on the digits-on-photos benchmark, on a CPU, in minutes:
`compare` (the two bench configs over seeds) and `ablate` (the paper's Tables 4-8).

`compare` builds the benchmark (cached), pretrains the backbone (cached), trains the two bench
configs with the same schedule and seeds, scores them with COCOeval and writes a table,
``summary.json``, a plot of AP against decoder parameters and a picture of predictions.
`ablate` trains the rows of a suite, ``lors/configs/ablate/SUITE.yaml`` (a title, the config the rows
override and, per row, a label and its ``key=value`` overrides; a row may also name its own
config, its own seeds and a part of the suite, so that ``--part`` trains one part per call), and
writes a markdown table, its JSON and a plot from every row whose runs are finished, plus AP
against epochs where rows differ in length or evaluate during training. Runs go through
`lors.experiments.runner` (each in its own process, so its peak memory is its own; two at a time
on a 2-core machine).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lors.config import available_configs, load_config, to_dict
from lors.data.benchmark import build_or_reuse
from lors.engine.checkpoint import find_checkpoint
from lors.engine.sampler import EpochSampler
from lors.experiments.detection.pretrain import PretrainConfig
from lors.experiments.detection.report import (KEYS, SHOWN_METRICS, aggregate, draw_predictions, mean_curve, plot_ap,
                                               plot_ap_epochs, plot_lors_norms, read_norms, results_table, val_curve)
from lors.experiments.report import write_summary
from lors.experiments.runner import Job, check_width, default_width, logged_step, run_jobs

VANILLA, LORS = "bench_adamixer", "bench_adamixer_lors"
LABELS = {"vanilla": "AdaMixer", "lors": "AdaMixer + LORS"}  # compare's two models: role -> the label it reports
PRETRAIN_STEPS = PretrainConfig.steps


@dataclass
class Variant:
    """A row of an ablation table: its label and its overrides of its config (``config``,
    default the suite's), its seeds (default the command's ``--seeds``, else 0; ``--seeds``
    replaces them) and the ``part`` of the suite it belongs to (``--part`` trains one part)."""
    label: str
    overrides: list[str] = field(default_factory=list)
    config: str | None = None
    seeds: list[int] | None = None
    part: str = ""


@dataclass
class Suite:
    """An ablation table (``lors/configs/ablate/NAME.yaml``)."""
    title: str
    config: str = LORS
    variants: list[Variant] = field(default_factory=list)

    def validate(self) -> None:
        if not self.variants:
            raise ValueError(f"ablation suite {self.title!r} has no variants: list at least one row")
        labels = [v.label for v in self.variants]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"ablation suite {self.title!r} has rows with the same label {twice}: "
                             "give each row its own label (the table is keyed by it)")
        for v in self.variants:
            if v.seeds is not None and (not v.seeds or len(set(v.seeds)) < len(v.seeds)):
                raise ValueError(f"row {v.label!r} of suite {self.title!r} has seeds {v.seeds}: list one or "
                                 "more distinct seeds, or leave seeds out to use --seeds")

    def parts(self) -> list[str]:
        """The suite's parts, in the order their rows come."""
        return list(dict.fromkeys(v.part for v in self.variants if v.part))

    def select(self, parts: Sequence[str] | None) -> list[Variant]:
        """The rows of ``parts`` (every row for None); ValueError naming the suite's parts."""
        if parts is None:
            return list(self.variants)
        unknown = [p for p in parts if p not in self.parts()]
        if unknown:
            have = (f"its parts are {', '.join(self.parts())}" if self.parts()
                    else "it has none (no row names a part): drop --part")
            raise ValueError(f"ablation suite {self.title!r} has no part {', '.join(map(repr, unknown))}: {have}")
        return [v for v in self.variants if v.part in parts]


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
    ``--seeds`` takes every number after it; none for ``seeds=None``, a suite's own seeds per
    row), shell-quoted, for the "Command:" line of a table."""
    import shlex
    default = SweepOptions()
    flags = [*(["--data-dir", opts.data_dir] if opts.data_dir != default.data_dir else []),
             *[f for kv in opts.data_set for f in ("--data-set", kv)],
             *(["--no-pretrain"] if not opts.pretrain else
               ["--pretrain-steps", str(opts.pretrain_steps)] if opts.pretrain_steps != default.pretrain_steps
               else []),
             *(["--max-steps", str(opts.max_steps)] if opts.max_steps else []),
             *opts.overrides, *(["--seeds", *map(str, opts.seeds)] if opts.seeds is not None else [])]
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


def steps_per_epoch(cfg) -> int:
    """Training steps of one epoch of ``cfg`` on its train split."""
    num_images = len(json.loads(Path(cfg.data.train_annotations).read_text())["images"])
    return EpochSampler(num_images, cfg.train.batch_size, cfg.train.seed).steps


def planned_steps(cfg, max_steps: int | None = None) -> int:
    """Training steps of ``cfg``'s schedule on its train split (``max_steps`` at most)."""
    steps = cfg.train.epochs * steps_per_epoch(cfg)
    return min(steps, max_steps) if max_steps else steps


def read_result(cfg, run_dir: Path) -> dict:
    """The KEYS (params, AP..., time per step, peak memory), steps and run_dir of the finished
    run of ``cfg`` in ``run_dir`` (its ``result.json``)."""
    from lors.models.adamixer.report import detect_report
    summary = json.loads((run_dir / "result.json").read_text())
    report = detect_report(cfg)
    return {"decoder_params": report["decoder"], "total_params": report["total"],
            **{k: summary["metrics"][k] for k in SHOWN_METRICS},
            "seconds_per_step": summary["seconds_per_step"],
            "peak_memory_mb": summary["peak_memory_mb"], "steps": summary["steps"],
            "run_dir": str(run_dir)}


def run_all(runs: list[tuple[str, Run, Path]], data_dir: Path, opts: SweepOptions,
            reuse: bool = False) -> list[dict]:
    """Train and score each (title, run, run_dir) with `run_jobs`; each result holds the KEYS
    (params, AP..., time per step, peak memory) plus steps and run_dir. With ``reuse``, a run
    whose ``result.json`` exists is read back instead of trained again."""
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
    return [read_result(cfg, run_dir) for (_, _, run_dir), cfg in zip(runs, cfgs)]


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
    models = {LABELS["vanilla"]: vanilla, LABELS["lors"]: lors}  # the table's rows, by label
    folders = {label: role for role, label in LABELS.items()}  # run folders: <role>_seed<S>
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
    summary = {"models": {m: {k: r[k] for k in (*KEYS, *(f"{k}_std" for k in (*SHOWN_METRICS, "seconds_per_step")),
                                                "per_seed")} | {"config": models[m]} for m, r in rows.items()},
               "seeds": list(opts.seeds), "max_steps": opts.max_steps, "data_dir": str(data_dir),
               "overrides": overrides, "pretrained_backbone": str(pretrained) if pretrained else None,
               "wall_seconds": time.perf_counter() - tic}
    summary["decoder_params_ratio"] = (rows[LABELS["lors"]]["decoder_params"] / rows[LABELS["vanilla"]]["decoder_params"])
    write_compare(rows, summary, out, {m: run_dir(m, opts.seeds[0]) for m in models}, data_dir)
    return summary


def write_compare(rows: dict[str, dict], summary: dict, out: Path, first_runs: dict[str, Path], data_dir: Path) -> None:
    """Write `compare`'s table.md and summary.json, the plot of AP against decoder parameters
    and the predictions of ``first_runs`` (label -> run of the first seed) into ``out``, and
    print the table, the parameter ratio and, for fewer than 4 seeds, where the 4-seed figures are."""
    seeds = summary["seeds"]
    table = results_table(rows)
    plot = plot_ap(rows, out / "ap_vs_decoder_params.png", f"digits-on-photos val, mean over seeds {seeds}")
    preds = draw_predictions(first_runs, data_dir, out / "predictions.png")
    written = write_summary(out, summary, table)
    print(f"\nAdaMixer vs AdaMixer + LORS, seeds {seeds} "
          f"(AP in %, mean ± sample std over seeds; CPU time per training step):\n")
    print(table)
    print(f"\nLORS decoder / vanilla decoder = {summary['decoder_params_ratio']:.1%}; "
          f"wall time {summary['wall_seconds'] / 60:.1f} min")
    if len(seeds) < 4:
        print(f"The AP gap above is a {len(seeds)}-seed estimate (its seed spread is about as large): "
              "docs/results/detection.md, \"Four seeds\", has it over seeds 0-3. CPU floats differ between "
              "processor models, so on another processor the figures fall within that spread, not to the digit.")
    print(f"wrote {', '.join(map(str, written))}, {plot}, {preds}")


@dataclass
class PlannedRun:
    """One (row, seed) of an ablation suite: its run, run directory (a hash of the resolved
    config, shared by rows that train the same thing) and resolved config."""
    label: str
    seed: int
    run: Run
    run_dir: Path
    cfg: object


def ablate(opts: SweepOptions, suite: str, config: str | None = None, out_dir: str | Path = "runs/ablate",
           runs_dir: str | Path = "runs/ablate", retrain: bool = False, parts: Sequence[str] | None = None) -> dict:
    """Train the rows of ``suite`` (only those of ``parts``, if given), each for its seeds, and
    write ablation_SUITE.md, .json and .png to ``out_dir`` from every row whose runs are
    finished (a row of another part counts once an earlier call has trained it); returns those
    rows. Where rows differ in ``train.epochs`` or evaluate during training
    (``train.eval_every_epochs``), ablation_SUITE_epochs.png shows AP against epochs too.

    A row trains its own config, else ``config``, else the suite's (``config`` cannot replace a
    row's own); its seeds are ``opts.seeds`` unless that is None, else its own, else [0].
    Steps: `plan_suite` (the runs), `run_all` (train the chosen part's), `finished_results`,
    `aggregate_rows` (mean over seeds per row), `write_ablation` (table, JSON, plots).
    """
    spec = load_suite(suite)
    own = [v.label for v in spec.variants if v.config]
    if config and own:
        raise ValueError(f"suite {suite!r} names the config of rows {own}, which --config would not change: "
                         "drop --config, or copy the suite and edit its rows")
    chosen = {v.label for v in spec.select(parts)}
    tic = time.perf_counter()
    data_dir = build_or_reuse(opts.data_dir, opts.data_set, progress=not opts.quiet)
    planned = plan_suite(spec, opts, config or spec.config, data_dir, runs_dir)
    jobs = {}  # run directory -> job: rows that train the same config share one run
    for p in planned:
        if p.label in chosen:
            jobs.setdefault(p.run_dir, (f"{suite}: {p.label}, seed {p.seed}", p.run, p.run_dir))
    results = dict(zip(jobs, run_all(list(jobs.values()), data_dir, opts, reuse=not retrain)))
    results = finished_results(planned, results)
    rows, pending = aggregate_rows(spec, opts, planned, results, config or spec.config)
    shown = dataclasses.replace(opts, seeds=opts.seeds if opts.seeds is not None else None
                                if _per_row_seeds(spec, opts) else [0])
    command = " ".join(["lors detect ablate --suite", suite,
                        *(["--config", config] if config and config != spec.config else []), *sweep_flags(shown)])
    write_ablation(spec, Path(suite).stem, rows, pending, out_dir, command,
                   seeds=None if _per_row_seeds(spec, opts) else shown.seeds,
                   base=config or spec.config, wall=f"wall time{' of this call' if parts else ''} "
                                                   f"{(time.perf_counter() - tic) / 60:.1f} min",
                   epochs_plot=_epochs_plot(planned), norms=norms_run(planned, results))
    return rows


def norms_run(planned: Sequence[PlannedRun], results: dict[Path, dict]) -> tuple[str, dict] | None:
    """(label, norms) of the suite's first finished run that logged LORS's norms
    (``train.log_private_norms``), for ablation_SUITE_norms.png; None if none did."""
    for p in planned:
        if p.run_dir in results and p.cfg.train.log_private_norms:
            norms = read_norms(p.run_dir, steps_per_epoch(p.cfg))
            if norms:
                return f"{p.label}, seed {p.seed}", norms
    return None


def _per_row_seeds(spec: Suite, opts: SweepOptions) -> bool:
    """Whether the rows keep seeds of their own (no --seeds and some row lists seeds)."""
    return opts.seeds is None and any(v.seeds is not None for v in spec.variants)


def _seeds_of(v: Variant, opts: SweepOptions) -> list[int]:
    return list(opts.seeds if opts.seeds is not None else v.seeds if v.seeds is not None else [0])


def _epochs_plot(planned: Sequence[PlannedRun]) -> bool:
    """Whether rows differ in length or evaluate during training (then AP against epochs)."""
    return len({p.cfg.train.epochs for p in planned}) > 1 or any(p.cfg.train.eval_every_epochs for p in planned)


def plan_suite(spec: Suite, opts: SweepOptions, base: str, data_dir: Path, runs_dir: str | Path) -> list[PlannedRun]:
    """Every (row, seed) of ``spec``, all parts: each row's config (else ``base``) with its
    overrides, the common ones (the cached backbone, ``opts.overrides``) and its seed."""
    pretrained = pretrained_backbone(opts, data_dir, [Run(v.label, v.config or base, [*v.overrides, *opts.overrides], 0)
                                                      for v in spec.variants])  # every row: the same backbone per part
    common = [*([f"backbone.weights={pretrained}"] if pretrained else []), *opts.overrides]
    planned = []
    for v in spec.variants:
        for seed in _seeds_of(v, opts):
            run = Run(v.label, v.config or base, [*v.overrides, *common], seed)
            cfg = run.load(data_dir)
            planned.append(PlannedRun(v.label, seed, run, Path(runs_dir) / run_key(cfg, opts.max_steps), cfg))
    return planned


def finished_results(planned: Sequence[PlannedRun], results: dict[Path, dict]) -> dict[Path, dict]:
    """``results`` (run directory -> result of this call) plus the finished runs of the other
    parts, read back from their ``result.json``."""
    out = dict(results)
    for p in planned:
        if p.run_dir not in out and (p.run_dir / "result.json").exists():
            out[p.run_dir] = read_result(p.cfg, p.run_dir)
    return out


def aggregate_rows(spec: Suite, opts: SweepOptions, planned: Sequence[PlannedRun], results: dict[Path, dict],
                   base: str) -> tuple[dict[str, dict], list[Variant]]:
    """The table's rows (label -> mean over the seeds whose runs are finished, their per-seed
    results, overrides, config and seeds where needed, epochs and the mean AP curve where
    rows differ in length) and the rows not run yet."""
    own = any(v.config for v in spec.variants)
    epochs_plot = _epochs_plot(planned)
    rows, pending = {}, []
    for v in spec.variants:
        done = [p for p in planned if p.label == v.label and p.run_dir in results]
        if not done:
            pending.append(v)
            continue
        per_seed = [results[p.run_dir] for p in done]
        row = {**aggregate(per_seed), "n_seeds": len(per_seed), "per_seed": per_seed, "overrides": list(v.overrides)}
        if own:
            row["config"] = v.config or base
        if _per_row_seeds(spec, opts) or len(done) < len(_seeds_of(v, opts)):
            row["seeds"] = [p.seed for p in done]
        if epochs_plot:
            spe = [steps_per_epoch(p.cfg) for p in done]
            row["epochs"] = statistics.fmean(r["steps"] / n for r, n in zip(per_seed, spe))
            curves = [[(step / n, ap) for step, ap in val_curve(p.run_dir)] for p, n in zip(done, spe)]
            if any(len(c) > 1 for c in curves):
                row["curve"] = mean_curve(curves)
        rows[v.label] = row
    return rows, pending


def write_ablation(spec: Suite, name: str, rows: dict[str, dict], pending: Sequence[Variant], out_dir: str | Path,
                   command: str, seeds: Sequence[int] | None, base: str, wall: str, epochs_plot: bool,
                   norms: tuple[str, dict] | None = None) -> list[Path]:
    """Write ablation_NAME.md (the command, the table, each row's settings, the rows not run
    yet), its JSON and plot (AP against decoder parameters; AP against epochs with
    ``epochs_plot``; LORS's private norms against epochs, ablation_NAME_norms.png, with
    ``norms``: (run label, `read_norms`)) into ``out_dir``; print the markdown. ``seeds`` None:
    seeds per row."""
    own = any(v.config for v in spec.variants)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(rows, "Variant")
    what = ("Each row's config plus its overrides (below)" if own else f"Base config: `{base}` plus each row's overrides")
    seeds_text = "seeds per row (below)" if seeds is None else f"seeds {list(seeds)}"
    md = (f"# {spec.title}\n\nCommand: `{command}`  \n"
          + (f"Run in parts, one call each (`{'`, `'.join('--part ' + p for p in spec.parts())}`); every call writes "
             "this table from the rows whose runs are finished.  \n" if spec.parts() else "")
          + f"{what}; {seeds_text} (AP in %, mean ± sample std over seeds); {wall}.\n\n{table}\n\n"
          + "\n".join(_row_line(label, r, own) for label, r in rows.items())
          + "".join(f"\n- {v.label}: not run yet (`{command} --part {v.part}`)" if v.part else
                    f"\n- {v.label}: not run yet" for v in pending)
          + "\n")
    (out / f"ablation_{name}.md").write_text(md)
    (out / f"ablation_{name}.json").write_text(json.dumps(rows, indent=2))
    plots = [plot_ap(rows, out / f"ablation_{name}.png", spec.title)]
    if epochs_plot:
        plots.append(plot_ap_epochs(rows, out / f"ablation_{name}_epochs.png", spec.title))
    if norms is not None:
        plots.append(plot_lors_norms(norms[1], out / f"ablation_{name}_norms.png",
                                     f"{spec.title}\nLORS's private terms per stage: {norms[0]}"))
    print(md)
    print(f"wrote {out / f'ablation_{name}.md'} and {', '.join(map(str, plots))}")
    return [out / f"ablation_{name}.md", out / f"ablation_{name}.json", *plots]


def _row_line(label: str, row: dict, with_config: bool) -> str:
    """The markdown bullet of a row: its config (when rows have their own), overrides and seeds."""
    overrides = " ".join(row["overrides"])
    if with_config:
        text = f"`{row['config']}`" + (f" with `{overrides}`" if overrides else "")
    else:
        text = f"`{overrides or '(the base config)'}`"
    if "seeds" in row:
        text += f"; seeds {', '.join(map(str, row['seeds']))}"
    return f"- {label}: {text}"
