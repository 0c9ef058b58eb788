"""`lors detect compare` and `lors detect ablate`: AdaMixer against AdaMixer + LORS on the
digits-on-photos benchmark, on a CPU, in minutes.

`compare` builds the benchmark (cached), trains the two bench configs with the same schedule
and seeds, scores them with COCOeval and writes a table, ``summary.json``, a plot of AP against
decoder parameters and a picture of predictions. `ablate` runs the paper's Tables 4-8 as
overrides of the LORS bench config and writes a markdown table and a plot per suite
(`lors.experiments.report`). `add_bench_parsers(subparsers)` adds both to the `detect`
command's sub-parsers.

Each training run happens in a child process, so that its peak resident memory (what
``peak_memory_mb`` reports on a CPU) is its own, and two of them (``--jobs``) train at once
with one thread each on a 2-core machine.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from lors.experiments.report import KEYS, METRICS, aggregate, draw_predictions, markdown_table, plot_ap
from lors.data.benchmark import build_or_reuse
from lors.experiments.detection.pretrain import PretrainConfig

VANILLA, LORS = "bench_adamixer", "bench_adamixer_lors"
PRETRAIN_STEPS = PretrainConfig.steps
LEGACY_PRETRAINED = "resnet18_digits.pth"  # the wall-clock-budgeted cache of earlier versions: never used

# The paper's ablations (section 4.3) as overrides of the LORS bench config (4 stages, LORS^A
# r=4 with K=[1,1,2,3], LORS^T r=4). The default row of each table is the bench config itself.
SUITES: dict[str, dict] = {
    "table4": {
        "title": "Table 4: LORS^A and LORS^T",
        "variants": [
            ("no LORS (AdaMixer)", ["lors.adaptive.enabled=false", "lors.static.enabled=false"]),
            ("LORS^A only", ["lors.static.enabled=false"]),
            ("LORS^T only", ["lors.adaptive.enabled=false"]),
            ("LORS^A + LORS^T", []),
        ]},
    "table5": {
        "title": "Table 5: W^shared and W^private in LORS^A",
        "variants": [
            ("W^shared only", ["lors.adaptive.use_private=false"]),
            ("W^private only", ["lors.adaptive.use_shared=false"]),
            ("W^shared + W^private", []),
        ]},
    "table6": {
        "title": "Table 6: LORS^A groups K and rank r",
        "variants": [
            ("K=1, r=2", ["lors.adaptive.groups=1", "lors.adaptive.rank=2"]),
            ("K=1, r=4", ["lors.adaptive.groups=1", "lors.adaptive.rank=4"]),
            ("K=2, r=4", ["lors.adaptive.groups=2", "lors.adaptive.rank=4"]),
            ("K=[1,1,2,3], r=4", []),
            ("K=1, r=8", ["lors.adaptive.groups=1", "lors.adaptive.rank=8"]),
        ]},
    "table7": {
        "title": "Table 7: LORS^T rank r",
        "variants": [(f"r={r}", [f"lors.static.rank={r}"]) for r in (1, 2, 4, 8, 16)]},
    "table8": {
        "title": "Table 8: number of decoder stages (with LORS)",
        "variants": [
            ("2 stages", ["decoder.num_stages=2", "lors.adaptive.groups=[1,2]"]),
            ("4 stages", []),
            ("6 stages", ["decoder.num_stages=6", "lors.adaptive.groups=[1,1,2,2,3,3]"]),
        ]},
}


def suite_variants(suite: str) -> list[tuple[str, list[str]]]:
    """(label, overrides) of each row of an ablation suite; ValueError for an unknown suite."""
    if suite not in SUITES:
        raise ValueError(f"unknown ablation suite {suite!r}: choose one of {', '.join(SUITES)}")
    return [(label, list(ov)) for label, ov in SUITES[suite]["variants"]]


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


def _train_child(cfg, run_dir: str, progress: bool, max_steps: int | None = None,
                 threads: int | None = None) -> None:
    """Child-process body: train (to ``max_steps`` at most) with ``threads`` CPU threads,
    evaluate, write ``result.json``; COCOeval's text goes to ``eval.txt``."""
    import torch

    from lors.engine.checkpoint import find_checkpoint
    from lors.experiments.detection.train import evaluate_checkpoint, train
    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "eval.txt").open("w") as text, contextlib.redirect_stdout(text):
        summary = train(cfg, run_dir, resume=False, progress=progress, stop_after=max_steps)
        if "metrics" not in summary:  # stopped before the end of the schedule: evaluate here
            summary["metrics"] = evaluate_checkpoint(find_checkpoint(run_dir), cfg,
                                                     torch.device("cpu"), progress=progress)
    (run_dir / "result.json").write_text(json.dumps(summary, indent=2))


def train_and_score(run: Run, data_dir: Path, run_dir: Path, progress: bool = True,
                    isolate: bool = True, max_steps: int | None = None,
                    threads: int | None = None, reuse: bool = False) -> dict:
    """Train ``run`` (in a child process with ``threads`` CPU threads if ``isolate``); its KEYS
    (params, AP..., time per step, peak memory) plus steps and run_dir. With ``reuse``, a
    ``result.json`` already in ``run_dir`` is read instead of training again."""
    from lors.models.adamixer.report import detect_report
    cfg = run.load(data_dir)
    if reuse and (run_dir / "result.json").exists():
        print(f"   reusing the finished run in {run_dir}", flush=True)
    else:
        (run_dir / "result.json").unlink(missing_ok=True)
        if not isolate:
            _train_child(cfg, str(run_dir), progress, max_steps)
        else:
            child = multiprocessing.get_context("spawn").Process(
                target=_train_child, args=(cfg, str(run_dir), progress, max_steps, threads))
            child.start()
            child.join()
            if child.exitcode != 0 or not (run_dir / "result.json").exists():
                raise RuntimeError(f"training {run.label} (seed {run.seed}) failed with exit code "
                                   f"{child.exitcode}: see the traceback above and {run_dir / 'log.csv'}")
    summary = json.loads((run_dir / "result.json").read_text())
    report = detect_report(cfg)
    return {"decoder_params": report["decoder"], "total_params": report["total"],
            **{k: summary["metrics"][k] for k in METRICS},
            "seconds_per_step": summary["seconds_per_step"],
            "peak_memory_mb": summary["peak_memory_mb"], "steps": summary["steps"],
            "run_dir": str(run_dir)}


def run_key(cfg, max_steps: int | None) -> str:
    """A short hash of a resolved config and step limit: runs that would train the same thing
    (e.g. the base row that every ablation table repeats) share one run directory."""
    from lors.config import to_dict
    text = json.dumps({"config": to_dict(cfg), "max_steps": max_steps}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def default_jobs() -> int:
    """Concurrent runs by default: one per CPU core, at most 2 (each run then gets the
    other cores' share of threads; two single-thread runs beat one two-thread run on 2 cores)."""
    return max(1, min(2, os.cpu_count() or 1))


def run_all(jobs: list[tuple[str, Run, Path]], data_dir: Path, args: argparse.Namespace,
            reuse: bool = False) -> list[dict]:
    """Train and score each (title, run, run_dir), ``args.jobs`` at a time, each in its own child
    process with ``cpu_count // jobs`` threads; results in the order of ``jobs``. With
    ``reuse``, finished runs are read back (see `train_and_score`)."""
    if args.in_process and (args.jobs or 1) > 1:
        raise ValueError("--in-process trains one run at a time: drop it or pass --jobs 1")
    width = 1 if args.in_process else max(1, args.jobs or default_jobs())
    threads = max(1, (os.cpu_count() or 1) // width)

    def one(job: tuple[str, Run, Path]) -> dict:
        title, run, run_dir = job
        print(f"== {title}", flush=True)
        return train_and_score(run, data_dir, run_dir, not args.quiet and width == 1,
                               isolate=not args.in_process, max_steps=args.max_steps,
                               threads=threads if width > 1 else None, reuse=reuse)

    if width == 1:
        return [one(job) for job in jobs]
    print(f"{len(jobs)} runs, {width} at a time with {threads} CPU thread(s) each", flush=True)
    planned = [planned_steps(run.load(data_dir), args.max_steps) for _, run, _ in jobs]
    with ThreadPoolExecutor(width) as pool, \
            tqdm(total=sum(planned), desc=f"train {len(jobs)} runs", unit="step", disable=args.quiet) as bar:
        futures = [pool.submit(one, job) for job in jobs]
        while not all(f.done() for f in futures):
            wait(futures, timeout=2.0, return_when=FIRST_EXCEPTION)
            bar.update(sum(min(logged_step(d), n) for (_, _, d), n in zip(jobs, planned)) - bar.n)
        return [f.result() for f in futures]


def planned_steps(cfg, max_steps: int | None = None) -> int:
    """Training steps of ``cfg``'s schedule on its train split (``max_steps`` at most), as
    `lors.experiments.detection.train.train` counts them."""
    from lors.experiments.detection.train import EpochSampler
    num_images = len(json.loads(Path(cfg.data.train_annotations).read_text())["images"])
    steps = cfg.train.epochs * EpochSampler(num_images, cfg.train.batch_size, cfg.train.seed).steps
    return min(steps, max_steps) if max_steps else steps


def logged_step(run_dir: Path) -> int:
    """The last step in ``run_dir/log.csv`` (0 if none yet): a running child's progress."""
    try:
        with (run_dir / "log.csv").open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - 200))
            last = f.read().decode(errors="replace").strip().splitlines()[-1]
        return int(last.split(",")[0])
    except (OSError, IndexError, ValueError):
        return 0


def pretrained_backbone(args: argparse.Namespace, data_dir: Path, runs: Sequence[Run]) -> Path | None:
    """With ``args.pretrain``: the digit-pretrained ResNet-18 of ``args.pretrain_steps`` steps,
    with as many stages as the deepest of ``runs`` reads, cached in ``data_dir`` under a name
    keyed by its settings (trained if missing)."""
    if not args.pretrain:
        return None
    levels = max(run.load(data_dir).backbone.num_levels for run in runs)
    from lors.experiments.detection.pretrain import PretrainConfig, cached_digit_backbone
    if (data_dir / LEGACY_PRETRAINED).exists():
        print(f"note: {data_dir / LEGACY_PRETRAINED} was pretrained for a wall-clock budget by an "
              "earlier version and is not used; delete it to free the space", flush=True)
    cfg = PretrainConfig(steps=args.pretrain_steps, levels=levels)
    path = cached_digit_backbone(data_dir, cfg, progress=not args.quiet)
    print(f"backbone: {path} (ResNet-18 pretrained on the train split's digits, {cfg.steps} steps)",
          flush=True)
    return path


def run_compare(args: argparse.Namespace) -> int:
    """Train and score the vanilla and LORS bench configs for each seed; write the outputs."""
    tic = time.perf_counter()
    out = Path(args.out)
    data_dir = build_or_reuse(args.data_dir, args.data_set, progress=not args.quiet)
    models = {"AdaMixer": args.vanilla, "AdaMixer + LORS": args.lors}
    pretrained = pretrained_backbone(args, data_dir, [Run(label, config, args.overrides, args.seeds[0])
                                                      for label, config in models.items()])
    overrides = [*([f"backbone.weights={pretrained}"] if pretrained else []), *args.overrides]

    def run_dir(label: str, seed: int) -> Path:
        return out / f"{'lors' if 'LORS' in label else 'vanilla'}_seed{seed}"

    jobs = [(f"{label} ({config}), seed {seed}", Run(label, config, overrides, seed), run_dir(label, seed))
            for seed in args.seeds for label, config in models.items()]
    per_model: dict[str, list[dict]] = {m: [] for m in models}
    for (_, run, _), result in zip(jobs, run_all(jobs, data_dir, args)):
        per_model[run.label].append(result)
    rows = {m: {**aggregate(r), "n_seeds": len(r), "per_seed": r} for m, r in per_model.items()}
    table = markdown_table(rows)
    plot = plot_ap(rows, out / "ap_vs_decoder_params.png",
                   f"digits-on-photos val, mean over seeds {list(args.seeds)}")
    first = args.seeds[0]
    preds = draw_predictions({m: run_dir(m, first) for m in models}, data_dir, out / "predictions.png")
    summary = {"models": {m: {k: r[k] for k in (*KEYS, *(f"{k}_std" for k in (*METRICS, "seconds_per_step")),
                                                 "per_seed")} | {"config": models[m]}
                          for m, r in rows.items()},
               "seeds": list(args.seeds), "max_steps": args.max_steps, "data_dir": str(data_dir), "overrides": overrides,
               "pretrained_backbone": str(pretrained) if pretrained else None,
               "wall_seconds": time.perf_counter() - tic}
    summary["decoder_params_ratio"] = (rows["AdaMixer + LORS"]["decoder_params"] / rows["AdaMixer"]["decoder_params"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "table.md").write_text(table + "\n")
    print(f"\nAdaMixer vs AdaMixer + LORS, seeds {list(args.seeds)} "
          f"(AP in %, mean ± sample std over seeds; CPU time per training step):\n")
    print(table)
    print(f"\nLORS decoder / vanilla decoder = {summary['decoder_params_ratio']:.1%}; "
          f"wall time {summary['wall_seconds'] / 60:.1f} min")
    print(f"wrote {out / 'summary.json'}, {out / 'table.md'}, {plot}, {preds}")
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    """Train every variant of a suite for each seed; write ablation_SUITE.md and .png."""
    variants = suite_variants(args.suite)
    tic = time.perf_counter()
    data_dir = build_or_reuse(args.data_dir, args.data_set, progress=not args.quiet)
    pretrained = pretrained_backbone(args, data_dir, [Run(label, args.config, [*overrides, *args.overrides], 0)
                                                      for label, overrides in variants])
    common = [*([f"backbone.weights={pretrained}"] if pretrained else []), *args.overrides]
    jobs = {}  # run directory -> job: rows that train the same config share one run
    wanted = []
    for label, overrides in variants:
        for seed in args.seeds:
            run = Run(label, args.config, [*overrides, *common], seed)
            run_dir = Path(args.runs) / run_key(run.load(data_dir), args.max_steps)
            jobs.setdefault(run_dir, (f"{args.suite}: {label}, seed {seed}", run, run_dir))
            wanted.append((label, run_dir))
    results = dict(zip(jobs, run_all(list(jobs.values()), data_dir, args, reuse=not args.retrain)))
    rows = {}
    for label, overrides in variants:
        per_seed = [results[run_dir] for row, run_dir in wanted if row == label]
        rows[label] = {**aggregate(per_seed), "n_seeds": len(per_seed), "per_seed": per_seed,
                       "overrides": overrides}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = SUITES[args.suite]["title"]
    table = markdown_table(rows, "Variant")
    command = " ".join(["lors detect ablate --suite", args.suite,
                        *(["--config", args.config] if args.config != LORS else []),
                        *([f"--max-steps {args.max_steps}"] if args.max_steps else []), *args.overrides,
                        "--seeds", *map(str, args.seeds)])
    md = (f"# {title}\n\nCommand: `{command}`  \nBase config: `{args.config}` plus each row's "
          f"overrides; seeds {list(args.seeds)} (AP in %, mean ± sample std over seeds); "
          f"wall time {(time.perf_counter() - tic) / 60:.1f} min.\n\n{table}\n\n"
          + "\n".join(f"- {label}: `{' '.join(r['overrides']) or '(the base config)'}`" for label, r in rows.items())
          + "\n")
    (out / f"ablation_{args.suite}.md").write_text(md)
    (out / f"ablation_{args.suite}.json").write_text(json.dumps(rows, indent=2))
    plot = plot_ap(rows, out / f"ablation_{args.suite}.png", title)
    print(md)
    print(f"wrote {out / f'ablation_{args.suite}.md'} and {plot}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S", help="train.seed values (default 0)")
    p.add_argument("--data-dir", default="runs/bench_data",
                   help="benchmark folder: built if missing or empty; a folder that holds one is reused "
                        "with its own settings (default runs/bench_data)")
    p.add_argument("--data-set", action="append", default=[], metavar="KEY=VALUE",
                   help="BenchmarkConfig override for a new data folder, e.g. num_train=100 (repeatable); "
                        "on an existing folder a differing value is refused")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--in-process", action="store_true",
                   help="train in this process (starts faster; peak memory is then the largest so far)")
    p.add_argument("--max-steps", type=_positive_int, default=None, metavar="N",
                   help="stop each run after N steps (the schedule is unchanged) and evaluate there")
    p.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                   help="runs trained at the same time, each in its own process with an equal share "
                        "of the CPU threads (default: the number of CPU cores, at most 2)")
    p.add_argument("--pretrain", action=argparse.BooleanOptionalAction, default=True,
                   help=f"start the backbones from a ResNet-18 pretrained as a digit classifier on the "
                        "train split's digits only (cached in DATA_DIR under a name keyed by its "
                        "settings; default on)")
    p.add_argument("--pretrain-steps", type=_positive_int, default=PRETRAIN_STEPS, metavar="N",
                   help=f"training steps of that pretraining (default {PRETRAIN_STEPS}); each "
                        "step count is cached separately")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="detector config overrides for every run (anywhere but right after --seeds)")


def add_bench_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add `compare` and `ablate` to the `detect` command's sub-parsers."""
    p = subparsers.add_parser(
        "compare", help="train and score AdaMixer and AdaMixer + LORS on the digits benchmark",
        description="Build the benchmark (cached), train the vanilla and LORS bench configs with the "
                    "same schedule and seeds, evaluate with COCOeval, print a table and write "
                    "summary.json, table.md, ap_vs_decoder_params.png and predictions.png to --out.")
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--vanilla", default=VANILLA, help=f"vanilla config (default {VANILLA})")
    p.add_argument("--lors", default=LORS, help=f"LORS config (default {LORS})")
    _common(p)
    p.set_defaults(func=run_compare)

    p = subparsers.add_parser(
        "ablate", help="the paper's ablation tables 4-8 at small scale",
        description="Train each variant of a suite (overrides of the LORS bench config) and write "
                    "ablation_SUITE.md, .json and .png to --out-dir.")
    p.add_argument("--suite", required=True, help=f"one of {', '.join(SUITES)}")
    p.add_argument("--config", default=LORS, help=f"base config (default {LORS})")
    p.add_argument("--out-dir", default="docs/results", help="where the table and plot go")
    p.add_argument("--runs", default="runs/ablate",
                   help="run directories, one per resolved config (a hash of it): a finished run is "
                        "reused by every row and later call that trains the same config")
    p.add_argument("--retrain", action="store_true", help="train every row again, even if finished")
    _common(p)
    p.set_defaults(func=run_ablate)
