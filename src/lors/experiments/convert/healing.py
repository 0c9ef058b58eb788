"""Healing curves of finished `lors convert` folders: one table row per folder (its method, budget,
loss and what trained; the held-out measure of the original, of the converted model and after each
`--eval-at-tokens` count; `lors convert evaluate`'s measures on other texts; wall times) and one
plot of the measure against healing tokens, a line per folder.

    lors convert report runs/heal/* --out docs/results/healing

Every figure is read from the folders (``conversion.json``, ``uptrain/log.csv``): nothing is
measured here.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from lors.experiments.convert.run import read_conversion
from lors.experiments.report import Column, Series, markdown_table, plot_points, write_summary

def method(settings: dict) -> str:
    """The method a conversion's settings name, in the words of docs/results/convert.md."""
    if settings["form"] == "drop":
        return "layer dropping"
    if settings["form"] == "lors":
        return "LORS (mean + activation-aware residual)" + ("" if settings["groups"] is None
                                                            else f", groups of {settings['groups']}")
    if settings["groups"] == 1 and settings["writer_groups"] in (1, "same"):
        return "per-layer activation-aware SVD"
    writers = settings["groups"] if settings["writer_groups"] == "same" else settings["writer_groups"]
    return (f"basis over {settings['groups'] or 'all'} layers"
            + ("" if writers == settings["groups"] else f", writers {writers or 'all'}"))


def uptrain_seconds(folder: Path) -> float:
    """The seconds of the healing steps (``uptrain/log.csv``'s column), evaluations left out."""
    path = folder / "uptrain" / "log.csv"
    if not path.is_file():
        return 0.0
    with path.open(newline="") as f:
        by_step = {r["step"]: float(r["seconds"]) for r in csv.DictReader(f)}
    return sum(by_step.values())


def read_healing(folder: str | Path) -> dict:
    """One folder's row: name, method, budget, loss, params, metric, original/converted/healed
    measures, curve (tokens -> measure, 0 the converted model), other texts and wall times."""
    folder = Path(folder)
    done = read_conversion(folder)
    held = next(((k.removeprefix("held_out_"), v) for k, v in done.items() if k.startswith("held_out_")), None)
    if held is None:
        raise ValueError(f"{folder} was converted without --eval-tokens, so it has no held-out measure to report: "
                         "rerun it with --eval-tokens T")
    metric, values = held
    up = done.get("uptrain") or {}
    curve = {0: values["converted"]} | {p["tokens"]: p[metric] for p in up.get("curve", [])}
    settings = up.get("settings") or {}
    return dict(name=folder.name, folder=str(folder), method=method(done["settings"]),
                budget=done["settings"]["budget"], kept=done["kept"], metric=metric,
                loss=settings.get("loss"), params=settings.get("params"), amp=settings.get("amp"),
                original=values["original"], converted=values["converted"], healed=values.get("uptrained"),
                tokens=up.get("tokens", 0), curve=curve, text=done["texts"]["evaluation"]["name"],
                other=[e for e in done.get("evaluations", []) if e["text"]["sha256"]
                       != done["texts"]["evaluation"]["sha256"]],
                convert_seconds=done["seconds"], uptrain_seconds=uptrain_seconds(folder))


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n:,}"


def healing_table(rows: Sequence[dict]) -> str:
    """A markdown table: the measure at each token count any row has, the ratio of the last to
    the original's, each other text (original -> healed) and the wall times."""
    metric = rows[0]["metric"]
    fmt = (lambda v: f"{v:,.1f}") if metric == "perplexity" else (lambda v: f"{v:.4f}")
    points = sorted({t for r in rows for t in r["curve"]})
    others = sorted({e["text"]["name"] for r in rows for e in r["other"]})

    def at(t):
        return lambda r: fmt(r["curve"][t]) if t in r["curve"] else ""

    def on(name):
        def cell(r):
            e = next((e for e in r["other"] if e["text"]["name"] == name), None)
            if e is None:
                return ""
            value = e.get("uptrained", e.get("converted"))
            return f"{fmt(value)} ({value / e['original']:.2f}x of {fmt(e['original'])})" if metric == "perplexity" \
                else f"{fmt(value)} (original 1)"
        return cell

    def last(r):
        value = r["curve"][max(r["curve"])]
        return f"{value / r['original']:.2f}x" if metric == "perplexity" else f"{value:.4f}"
    columns = [Column("folder", lambda r: f"`{r['name']}`"), Column("method", lambda r: r["method"]),
               Column("kept", lambda r: f"{r['kept']:.0%}"),
               Column("healing", lambda r: "" if not r["tokens"] else f"{r['loss']}, {r['params']}, {r['amp']}"),
               Column("original", lambda r: fmt(r["original"])),
               *[Column(f"{_tokens(t)} tokens" if t else "converted", at(t)) for t in points],
               Column("last / original" if metric == "perplexity" else "last", last),
               *[Column(f"on {name}", on(name)) for name in others],
               Column("wall (convert + heal)", lambda r: f"{r['convert_seconds'] / 60:.1f} + "
                                                         f"{r['uptrain_seconds'] / 60:.1f} min")]
    return markdown_table(rows, columns)


STYLES = ("o-", "s--", "^-", "D--", "v-", "P--", "X-", "*--")


def plot_healing(rows: Sequence[dict], path: str | Path) -> Path:
    """The measure against healing tokens, one line per folder, the original as a dashed line."""
    metric = rows[0]["metric"]
    series = [Series(f"{r['method']}, {r['kept']:.0%}" + (f", {r['loss']}" if r["loss"] else "")
                     + (", all tensors" if r["params"] == "all" and r["method"] != "layer dropping" else ""),
                     [t / 1024 for t in sorted(r["curve"])], [r["curve"][t] for t in sorted(r["curve"])],
                     style=STYLES[k % len(STYLES)]) for k, r in enumerate(rows)]
    originals = sorted({round(r["original"], 6) for r in rows})
    return plot_points(series, path, xlabel="healing tokens (K)",
                       ylabel=f"held-out {metric}" + (" (log)" if metric == "perplexity" else ""),
                       title=f"healing on {rows[0]['text']}: held-out {metric} against tokens trained",
                       hlines=[(v, "original") for v in originals], logy=metric == "perplexity")


def write_healing(folders: Sequence[str | Path], out: str | Path) -> tuple[str, Path]:
    """``summary.json``, ``table.md`` and ``healing.png`` of ``folders`` in ``out``; returns the
    table and the plot's path. Folders measured differently (another metric or text) are refused."""
    rows = [read_healing(f) for f in folders]
    if not rows:
        raise ValueError("no folders to report: pass the --out folders of finished lors convert runs")
    kinds = {(r["metric"], r["text"]) for r in rows}
    if len(kinds) > 1:
        raise ValueError(f"the folders are measured differently ({sorted(kinds)}): report the folders of one "
                         "model and held-out text together")
    table = healing_table(rows)
    out = Path(out)
    write_summary(out, {"rows": rows}, table)
    return table, plot_healing(rows, out / "healing.png")
