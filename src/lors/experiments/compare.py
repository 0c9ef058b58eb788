"""Does LORS pay off in a transformer trained from scratch? The four-way comparison behind
`lors lm compare` and `lors vit compare`.

For the same budget (steps x batch) and seeds it trains four models of one family (a `Task`):
  dense        the base config (``model.sharing=none``);
  LORS         LORS^T on all four block Linears (the LORS preset);
  tied         one block's weights for every block, no private part (ALBERT-style);
  dense-small  a dense model of about the LORS model's non-embedding parameter count: as deep
               as the base and narrower (the closest width) when that comes within 5 % of
               it, else shallower too (`small_shape`).
Runs go through `lors.experiments.runner` (each in its own process, two at a time on a 2-core
machine) and resume: a rerun of the same command reuses finished runs and continues interrupted
ones; a run folder that holds other settings is refused, never overwritten. Writes ``summary.json``, ``table.md``, ``metric_vs_params.png`` (the val metric
against non-embedding parameters) and ``val_curves.png`` (the val metric during training,
mean over seeds).
"""
from __future__ import annotations

import copy
import functools
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn

from lors.config import to_dict
from lors.core import count_parameters
from lors.engine.checkpoint import find_checkpoint, read_state
from lors.engine.loop import read_val
from lors.engine.rundir import config_differences, describe
from lors.experiments.report import Column, Series, markdown_table, mean_and_spread, plot_points, write_summary
from lors.experiments.runner import Job, default_width, logged_step, run_jobs

MODELS = ("dense", "LORS", "tied", "dense-small")


@dataclass(frozen=True)
class Task:
    """A model family for `compare`. The callables must be module-level functions (they are
    sent to the child processes)."""

    title: str                                   # "byte-level GPT on the Debian fortunes"
    load: Callable[[str | None, Sequence[str]], Any]      # (preset or path, overrides) -> config
    build: Callable[..., nn.Module]              # (config, device=...) -> model
    embedding: Callable[[nn.Module], int]        # the model's embedding parameters
    train: Callable[[Any, str, bool], dict]      # (config, run_dir, progress) -> summary with metrics
    depth_key: str                               # "model.n_layer"
    width_key: str                               # "model.n_embd"
    heads_key: str                               # "model.n_head"
    metric: str                                  # "val_bpb", in the summary's metrics and val.csv
    metric_label: str                            # "val bits per byte"
    lower_is_better: bool
    unit: str                                    # "tokens", "images": what a step trains on
    units_per_step: Callable[[Any], int]
    example_loss: Callable[[nn.Module, Any], tuple[Any, int]]  # (model, config) -> (the loss of one
    # training batch built on the model's device, the units in it): for `training_flops`
    resume_free: Sequence[str] = ()              # config keys a run may differ in and still be reused


def config_value(cfg: Any, key: str) -> Any:
    """The value at a dotted key ("model.n_embd") of a config."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def non_embedding_params(task: Task, cfg: Any) -> tuple[int, int]:
    """(non-embedding, total) parameters, shared tensors once."""
    model = task.build(cfg, device="meta")
    total = count_parameters(model).total
    return total - task.embedding(model), total


MATCH = 0.05  # dense-small is within this fraction of LORS's non-embedding count where a shape allows


def small_shape(task: Task, base: str, overrides: Sequence[str], target: int) -> list[str]:
    """The overrides of the dense model whose non-embedding count is closest to ``target``:
    the base depth and the closest width (a multiple of 2 x heads) if that is within `MATCH`
    of ``target``; otherwise the deepest smaller depth at which a width comes within `MATCH`
    (width steps too coarse at full depth: a shallower model fills the gap), with its closest
    width; failing both, the closest width at the base depth."""
    cfg = task.load(base, overrides)
    step, depth = 2 * config_value(cfg, task.heads_key), config_value(cfg, task.depth_key)

    @functools.cache  # each shape is built once, however often the search asks for it
    def gap_of(shape: tuple[str, ...]) -> float:
        return abs(non_embedding_params(task, task.load(base, [*overrides, *shape]))[0] - target) / target

    def gap(shape: list[str]) -> float:
        return gap_of(tuple(shape))

    widths = range(step, config_value(cfg, task.width_key) + 1, step)
    best = min(([f"{task.width_key}={w}"] for w in widths), key=gap)
    if gap(best) <= MATCH:
        return best
    for d in range(depth - 1, 0, -1):  # the deepest shape within MATCH
        shape = min(([f"{task.depth_key}={d}", f"{task.width_key}={w}"] for w in widths), key=gap)
        if gap(shape) <= MATCH:
            return shape
    return best


def training_flops(task: Task, cfg: Any) -> float:
    """FLOPs of one training step (forward and backward of one batch) per unit (token, image),
    counted by ``torch.utils.flop_counter`` on the meta device (matmuls and attention, 2 per
    multiply-add; element-wise work not counted). A LORS layer pays the dense layer's matmul
    plus its private term, which at a training batch's many rows it forms as a matrix once per
    step."""
    from torch.utils.flop_counter import FlopCounterMode
    model = task.build(cfg, device="meta")
    with FlopCounterMode(display=False) as counter:
        loss, units = task.example_loss(model, cfg)
        loss.backward()
    return counter.get_total_flops() / units


def model_configs(task: Task, dense: str, lors: str, tied: str, overrides: Sequence[str]) -> dict[str, Any]:
    cfgs = {"dense": task.load(dense, overrides), "LORS": task.load(lors, overrides), "tied": task.load(tied, overrides)}
    shape = small_shape(task, dense, overrides, non_embedding_params(task, cfgs["LORS"])[0])
    cfgs["dense-small"] = task.load(dense, [*overrides, *shape])
    return cfgs


def _percent(value: float | None) -> str:
    return "dense is 0: no ratio" if value is None else f"{value:+.2%}"


def val_curve(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(step, metric) of each evaluation in ``run_dir/val.csv``, one per step (a step evaluated
    twice, as a rerun of a finished run did before such rows were replaced, keeps its last)."""
    return [(r["step"], r[metric]) for r in read_val(run_dir / "val.csv", missing_ok=False)]


def mean_curve(curves: Sequence[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The mean over seeds at each step that every curve has."""
    common = set.intersection(*(set(dict(c)) for c in curves))
    return [(step, statistics.fmean(dict(c)[step] for c in curves)) for step in sorted(common)]


def check_earlier_run(task: Task, name: str, cfg: Any, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run of ``cfg``. A run of other settings is a
    ValueError (never overwritten silently); an unfinished one resumes when trained."""
    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        return False
    state = read_state(ckpt)
    diffs = config_differences(state.get("config", {}), json.loads(json.dumps(to_dict(cfg))), task.resume_free,
                               json.loads(json.dumps(to_dict(type(cfg)()))))
    if diffs:
        raise ValueError(f"{run_dir} holds a {name} run with other settings ({describe(diffs)}): pass another "
                         f"--out to compare these settings, or delete {run_dir} to train it again")
    return state["step"] >= cfg.train.steps


def compare_rows(by: dict[str, float], lower_is_better: bool) -> dict:
    """LORS against the others, from each model's mean metric; the relative gap is None when
    dense scored 0 (a ViT that learned nothing) rather than a division by zero."""
    better = (lambda a, b: a < b) if lower_is_better else (lambda a, b: a > b)
    return {"lors_vs_dense": by["LORS"] - by["dense"],
            "lors_vs_dense_relative": (by["LORS"] - by["dense"]) / by["dense"] if by["dense"] else None,
            "lors_beats_tied": better(by["LORS"], by["tied"]),
            "lors_beats_dense_small": better(by["LORS"], by["dense-small"])}


def compare(task: Task, seeds: Sequence[int], out: str | Path, dense: str, lors: str, tied: str,
            overrides: Sequence[str] = (), jobs: int | None = None, quiet: bool = False) -> dict:
    """Train the four models for every seed; write and print the table; returns the summary."""
    tic = time.perf_counter()
    out = Path(out)
    cfgs = model_configs(task, dense, lors, tied, overrides)
    results = train_runs(task, cfgs, seeds, out, jobs, quiet)
    rows = aggregate(task, cfgs, results)
    small = cfgs["dense-small"]
    configs = {"dense": dense, "LORS": lors, "tied": tied,
               "dense-small": f"{dense} {task.depth_key}={config_value(small, task.depth_key)} "
                              f"{task.width_key}={config_value(small, task.width_key)}"}
    return report(task, rows, seeds, out, configs, overrides, task.units_per_step(cfgs["dense"]),
                  cfgs["dense"].train.steps, time.perf_counter() - tic)


def train_runs(task: Task, cfgs: dict[str, Any], seeds: Sequence[int], out: Path, jobs: int | None,
               quiet: bool) -> dict[str, list[tuple[Path, dict]]]:
    """Train (or reuse, or resume) every model for every seed in ``out/<model>_seed<S>``;
    {model: [(run folder, the run's summary)] in seed order}."""
    width = max(1, jobs or default_width())
    runs, job_list = [], []
    for seed in seeds:
        for name, cfg in cfgs.items():
            run_cfg = copy.deepcopy(cfg)
            run_cfg.train.seed = seed
            run_dir = out / f"{name}_seed{seed}"
            runs.append((name, run_dir))
            if check_earlier_run(task, name, run_cfg, run_dir):  # the child resumes it: no step to train
                print(f"{name}, seed {seed}: reusing the finished run in {run_dir}", flush=True)
            job_list.append(Job(f"{name}, seed {seed}", task.train, (run_cfg, str(run_dir), not quiet and width == 1),
                                steps=cfg.train.steps, done=lambda d=run_dir: logged_step(d)))
    results = run_jobs(job_list, width=width, quiet=quiet)
    per_model: dict[str, list[tuple[Path, dict]]] = {name: [] for name in cfgs}
    for (name, run_dir), result in zip(runs, results):
        per_model[name].append((run_dir, result))
    return per_model


def aggregate(task: Task, cfgs: dict[str, Any], results: dict[str, list[tuple[Path, dict]]]) -> list[dict]:
    """One row per model: its shape, parameter counts, training FLOPs per unit, the metric per
    seed, its mean and spread, throughput, memory and the val curve (mean over seeds)."""
    rows = []
    for name, cfg in cfgs.items():
        per_seed = [r for _, r in results[name]]
        curves = [val_curve(d, task.metric) for d, _ in results[name]]
        ne, total = non_embedding_params(task, cfg)
        units = task.units_per_step(cfg)
        values = [r["metrics"][task.metric] for r in per_seed]
        rows.append({"model": name, "depth_x_width": f"{config_value(cfg, task.depth_key)} x {config_value(cfg, task.width_key)}",
                     "sharing": cfg.model.sharing, "non_embedding_params": ne, "total_params": total,
                     "train_flops_per_unit": training_flops(task, cfg),
                     f"{task.metric}_per_seed": values,
                     **mean_and_spread([{task.metric: v, "units_per_s": units / r["seconds_per_step"],
                                         "peak_memory_mb": r["peak_memory_mb"]} for v, r in zip(values, per_seed)],
                                       (task.metric, "units_per_s", "peak_memory_mb"), (task.metric,)),
                     "curve": mean_curve(curves)})
    return rows


def report(task: Task, rows: list[dict], seeds: Sequence[int], out: Path, configs: dict[str, str],
           overrides: Sequence[str], units: int, steps: int, wall_seconds: float) -> dict:
    """The table, both plots, ``summary.json`` and the printed verdict, from the rows (``units``
    trained per step, ``steps`` per run); returns the summary."""
    by_name = {r["model"]: r for r in rows}
    dense_ne, m = by_name["dense"]["non_embedding_params"], task.metric
    columns = [Column("Model", lambda r: r["model"]),
               Column("Depth x width", lambda r: r["depth_x_width"]),
               Column("Non-embedding params", lambda r: f"{r['non_embedding_params']:,} "
                                                        f"({r['non_embedding_params'] / dense_ne:.0%})"),
               Column("Total params", lambda r: f"{r['total_params']:,}"),
               Column(task.metric_label, lambda r: f"{r[m]:.4f}" + (f" ± {r[m + '_std']:.4f}" if len(seeds) > 1 else "")),
               Column(f"{task.unit.capitalize()}/s", lambda r: f"{r['units_per_s']:,.0f}"),
               Column("Peak mem (MB)", lambda r: f"{r['peak_memory_mb']:.0f}")]
    table = markdown_table(rows, columns)
    plot_points([Series(r["model"], [r["non_embedding_params"] / 1e6], [r[m]], [r[m + "_std"]], notes=[r["model"]])
                 for r in rows], out / "metric_vs_params.png", "non-embedding parameters (M)", task.metric_label,
                f"{task.title}, seeds {list(seeds)}")
    plot_points([Series(r["model"], [s * units / 1e6 for s, _ in r["curve"]], [v for _, v in r["curve"]], style="o-")
                 for r in rows], out / "val_curves.png", f"training {task.unit} (M)", task.metric_label,
                f"{task.metric_label} during training, mean of seeds {list(seeds)}")
    verdict = compare_rows({r["model"]: r[m] for r in rows}, task.lower_is_better)
    verdict["lors_non_embedding_share"] = by_name["LORS"]["non_embedding_params"] / dense_ne
    summary = {"task": task.title, "verdict": verdict, "seeds": list(seeds), "overrides": list(overrides),
               "configs": configs, f"{task.unit}_per_run": steps * units, "rows": rows,
               "wall_seconds": wall_seconds}
    written = write_summary(out, summary, table)
    print(f"\n{task.title}: {summary[f'{task.unit}_per_run']:,} training {task.unit} per run, seeds {list(seeds)} "
          f"({task.metric_label}, mean ± sample std):\n")
    print(table)
    print(f"\nLORS keeps {verdict['lors_non_embedding_share']:.1%} of the dense non-embedding parameters; "
          f"{task.metric_label}: LORS - dense = {verdict['lors_vs_dense']:+.4f} ({_percent(verdict['lors_vs_dense_relative'])}); "
          f"LORS {'beats' if verdict['lors_beats_tied'] else 'does not beat'} tied and "
          f"{'beats' if verdict['lors_beats_dense_small'] else 'does not beat'} dense-small")
    print(f"\nwall time {summary['wall_seconds'] / 60:.1f} min; wrote {', '.join(map(str, written))}, "
          f"{out / 'metric_vs_params.png'}, {out / 'val_curves.png'}")
    return summary
