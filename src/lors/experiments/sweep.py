"""Is LORS on the dense Pareto front? The sweep behind `lors lm sweep` and `lors vit sweep`.

At one budget (steps x batch) and seeds, it trains dense models at several widths (the front)
and LORS models at the base width with several private ranks, plus optionally one config with
ranks allocated by depth, and puts them on two axes: the val metric against non-embedding
parameters (what sharing saves) and against training FLOPs per unit (what LORS still pays: a
LORS layer computes the dense layer's product plus its low-rank one).

For each LORS row the summary says where the dense front lies at its parameter count (the dense
metric interpolated linearly in log-parameters between the two dense widths around it; None
outside the widths trained) and its gap to the dense model of the base width. Runs go through
`lors.experiments.compare.train_runs`: one folder per model and seed, a rerun reuses finished
runs, a folder of other settings is refused. Writes ``summary.json``, ``table.md``,
``metric_vs_params.png`` and ``metric_vs_flops.png``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

from lors.experiments.compare import Task, aggregate, config_value, train_runs
from lors.experiments.report import Column, Series, markdown_table, plot_points, write_summary


def sweep_configs(task: Task, dense: str, lors: str, widths: Sequence[int], ranks: Sequence[int],
                  alloc: str | None, overrides: Sequence[str]) -> dict[str, Any]:
    """{name: config}: ``dense-<width>`` for each width, ``LORS-r<rank>`` for each rank (at the
    width of ``lors``), and ``LORS-alloc`` (the config ``alloc``) when given."""
    if not widths or not ranks:
        raise ValueError("a sweep needs at least one dense width (--widths) and one LORS rank (--ranks)")
    for what, values in (("width", widths), ("rank", ranks)):
        if any(v < 1 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"--{what}s must be distinct positive integers, got {list(values)}")
    cfgs = {f"dense-{w}": task.load(dense, [*overrides, f"{task.width_key}={w}"]) for w in sorted(widths)}
    cfgs.update({f"LORS-r{r}": task.load(lors, [*overrides, f"lors.rank={r}"]) for r in sorted(ranks)})
    if alloc:
        cfgs["LORS-alloc"] = task.load(alloc, overrides)
    return cfgs


def front_at(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """The dense front's metric at ``x`` parameters: linear in log(parameters) between the two
    points around ``x`` (``points``: (parameters, metric)); None outside them."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0)) if x1 > x0 else 0.0
            return y0 + t * (y1 - y0)
    return None


def verdicts(rows: Sequence[dict], metric: str, lower_is_better: bool, base: str) -> dict[str, dict]:
    """For each LORS row: its share of the parameters of the dense row ``base``, its gap to it,
    the dense front at its parameter count and whether it is better than that front."""
    dense = {r["model"]: r for r in rows if r["sharing"] == "none"}
    front = [(r["non_embedding_params"], r[metric]) for r in dense.values()]
    ref = dense[base]
    out = {}
    for r in rows:
        if r["sharing"] == "none":
            continue
        at = front_at(front, r["non_embedding_params"])
        gap = r[metric] - ref[metric]
        out[r["model"]] = {
            "non_embedding_share": r["non_embedding_params"] / ref["non_embedding_params"],
            "vs_dense": gap, "vs_dense_relative": gap / ref[metric] if ref[metric] else None,
            "dense_front": at,
            "beats_front": None if at is None else (r[metric] < at if lower_is_better else r[metric] > at)}
    return out


def sweep(task: Task, seeds: Sequence[int], out: str | Path, dense: str, lors: str, widths: Sequence[int],
          ranks: Sequence[int], alloc: str | None = None, overrides: Sequence[str] = (), jobs: int | None = None,
          quiet: bool = False) -> dict:
    """Train every model of the sweep for every seed; write and print the table and both plots;
    returns the summary."""
    tic = time.perf_counter()
    out = Path(out)
    cfgs = sweep_configs(task, dense, lors, widths, ranks, alloc, overrides)
    base = f"dense-{config_value(task.load(lors, overrides), task.width_key)}"
    if base not in cfgs:
        raise ValueError(f"--widths must include the LORS model's width ({base.split('-')[1]}): the gaps are "
                         "measured against the dense model of that width")
    rows = aggregate(task, cfgs, train_runs(task, cfgs, seeds, out, jobs, quiet))
    for r in rows:
        r["rank"] = None if r["sharing"] == "none" else r["model"].removeprefix("LORS-")
    return report_sweep(task, rows, seeds, out, base, {"dense": dense, "lors": lors, "alloc": alloc},
                        overrides, task.units_per_step(next(iter(cfgs.values()))),
                        next(iter(cfgs.values())).train.steps, time.perf_counter() - tic)


def report_sweep(task: Task, rows: list[dict], seeds: Sequence[int], out: Path, base: str, configs: dict,
                 overrides: Sequence[str], units: int, steps: int, wall_seconds: float) -> dict:
    """The table, both plots, ``summary.json`` and the printed verdicts, from the rows."""
    m = task.metric
    found = verdicts(rows, m, task.lower_is_better, base)
    ref = next(r for r in rows if r["model"] == base)
    flops = "train_flops_per_unit"

    def front_cell(r):
        v = found.get(r["model"])
        if v is None:
            return ""
        if v["dense_front"] is None:
            return "outside the dense widths"
        return f"{v['dense_front']:.4f} ({'better' if v['beats_front'] else 'worse'})"

    columns = [Column("Model", lambda r: r["model"]),
               Column("Depth x width", lambda r: r["depth_x_width"]),
               Column("Non-embedding params", lambda r: f"{r['non_embedding_params']:,} "
                                                        f"({r['non_embedding_params'] / ref['non_embedding_params']:.0%})"),
               Column(f"Training MFLOPs per {task.unit.rstrip('s')}", lambda r: f"{r[flops] / 1e6:.2f}"),
               Column(task.metric_label, lambda r: f"{r[m]:.4f}" + (f" ± {r[m + '_std']:.4f}" if len(seeds) > 1 else "")),
               Column(f"vs {base}", lambda r: "" if r["model"] == base else
                      f"{r[m] - ref[m]:+.4f} ({(r[m] - ref[m]) / ref[m]:+.1%})" if ref[m] else f"{r[m] - ref[m]:+.4f}"),
               Column("dense front at its params", front_cell)]
    table = markdown_table(rows, columns)
    dense = [r for r in rows if r["sharing"] == "none"]
    shared = [r for r in rows if r["sharing"] != "none"]
    title = f"{task.title}, {steps * units:,} {task.unit} per run, seeds {list(seeds)}"
    for key, scale, xlabel, name in (("non_embedding_params", 1e6, "non-embedding parameters (M)", "metric_vs_params.png"),
                                     (flops, 1e6, f"training MFLOPs per {task.unit.rstrip('s')}", "metric_vs_flops.png")):
        plot_points([Series("dense (widths)", [r[key] / scale for r in dense], [r[m] for r in dense],
                            [r[m + "_std"] for r in dense], notes=[r["depth_x_width"].split(" x ")[1] for r in dense],
                            style="o-"),
                     Series("LORS (ranks)", [r[key] / scale for r in shared], [r[m] for r in shared],
                            [r[m + "_std"] for r in shared], notes=[r["rank"] for r in shared], style="s")],
                    out / name, xlabel, task.metric_label, title, logx=key == "non_embedding_params",
                    xticks=[r[key] / scale for r in dense], xformat=lambda v: f"{v:.3g}")
    summary = {"task": task.title, "seeds": list(seeds), "overrides": list(overrides), "configs": configs,
               "base": base, f"{task.unit}_per_run": steps * units, "verdicts": found, "rows": rows,
               "wall_seconds": wall_seconds}
    written = write_summary(out, summary, table)
    print(f"\n{title} ({task.metric_label}, mean ± sample std):\n")
    print(table)
    for name, v in found.items():
        where = ("outside the dense widths" if v["dense_front"] is None else
                 f"{'better' if v['beats_front'] else 'worse'} than the dense front ({v['dense_front']:.4f})")
        rel = "" if v["vs_dense_relative"] is None else f" ({v['vs_dense_relative']:+.1%})"
        print(f"{name}: {v['non_embedding_share']:.1%} of {base}'s non-embedding parameters, "
              f"{v['vs_dense']:+.4f}{rel} against it, {where}")
    print(f"\nwall time {wall_seconds / 60:.1f} min; wrote {', '.join(map(str, written))}, "
          f"{out / 'metric_vs_params.png'}, {out / 'metric_vs_flops.png'}")
    return summary
