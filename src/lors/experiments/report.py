"""Tables and pictures of every experiment: the mean and spread over seeds, markdown tables,
a plot of a metric against parameters (or anything else), and detections drawn on images.

Each experiment says *what* to show (its rows, columns and series); how it is written lives here.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image, ImageDraw

COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
          "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324"]


def mean_and_spread(per_seed: Sequence[Mapping[str, Any]], keys: Sequence[str],
                    spread: Sequence[str] = ()) -> dict[str, float]:
    """The mean of each of ``keys`` over seeds, and ``KEY_std`` (sample standard deviation, 0
    for one seed) for each of ``spread``."""
    out = {k: statistics.fmean(r[k] for r in per_seed) for k in keys}
    for k in spread:
        values = [r[k] for r in per_seed]
        out[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


@dataclass(frozen=True)
class Column:
    """A table column: its header and how a row's cell is written."""

    header: str
    cell: Callable[[Mapping[str, Any]], str]


def write_summary(out: str | Path, summary: Mapping[str, Any], table: str) -> tuple[Path, Path]:
    """A comparison's ``summary.json`` and ``table.md`` in ``out``; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "summary.json", out / "table.md"
    paths[0].write_text(json.dumps(summary, indent=2))
    paths[1].write_text(table + "\n")
    return paths


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A markdown table, one line per row."""
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.cell(row) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Series:
    """Points of one line or marker set in `plot_points`: x, y, optional error bars (one value
    each, or a (low, high) pair of lists) and a label beside each point."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    err: Sequence[float] | tuple[Sequence[float], Sequence[float]] | None = None
    notes: Sequence[str] = ()
    style: str = "o"
    note_offset: tuple[int, int] = (5, 4)


def plot_points(series: Sequence[Series], path: str | Path, xlabel: str, ylabel: str, title: str,
                hlines: Sequence[tuple[float, str]] = (), logx: bool = False, logy: bool = False,
                xlim: tuple[float, float] | None = None, ylim: tuple[float, float] | None = None,
                xticks: Sequence[float] | None = None, xformat: Callable[[float], str] | None = None) -> Path:
    """A PNG of ``series`` (with error bars and point labels) and horizontal reference lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in series:
        line = ax.errorbar(s.x, s.y, yerr=s.err, fmt=s.style, capsize=3, label=s.label)
        for x, y, note in zip(s.x, s.y, s.notes):
            ax.annotate(note, (x, y), textcoords="offset points", xytext=s.note_offset, fontsize=8,
                        color=line[0].get_color() if len(series) > 1 and "-" in s.style else None)
    for y, label in hlines:
        ax.axhline(y, ls="--", c="gray", label=label)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if xticks is not None:
        ax.set_xticks(list(xticks))
    if xformat is not None:
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: xformat(v)))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if xlim is not None:
        ax.set_xlim(*xlim)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_boxes(image: Image.Image, det: Mapping[str, torch.Tensor], class_names: Sequence[str],
               width: int = 2) -> Image.Image:
    """A copy of ``image`` with ``det["boxes"]`` (n, 4, absolute xyxy), their class names and,
    if given, ``det["scores"]`` drawn on it."""
    image = image.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    scores = det.get("scores")
    for k, (box, label) in enumerate(zip(det["boxes"].tolist(), det["labels"].tolist())):
        color = COLORS[int(label) % len(COLORS)]
        draw.rectangle(box, outline=color, width=width)
        text = class_names[int(label)] + (f" {scores[k]:.2f}" if scores is not None else "")
        x, y = box[0], max(box[1] - 11, 0)
        draw.rectangle(draw.textbbox((x, y), text), fill=color)
        draw.text((x, y), text, fill="white")
    return image


def draw_detections(image: Image.Image, det: Mapping[str, torch.Tensor], class_names: Sequence[str],
                    out: str | Path) -> Path:
    """Save ``image`` with ``det`` drawn on it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_boxes(image, det, class_names).save(out)
    return out


def image_grid(rows: Mapping[str, Sequence[Image.Image]], captions: Mapping[str, str], path: str | Path,
               margin: int = 6, head: int = 16) -> Path:
    """Save a grid of equal-size tiles, one captioned row per entry of ``rows``."""
    first = next(iter(rows.values()))
    tile_w, tile_h = first[0].size
    cols = max(len(tiles) for tiles in rows.values())
    grid = Image.new("RGB", (cols * (tile_w + margin) + margin, len(rows) * (tile_h + head + margin) + margin),
                     "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, tiles) in enumerate(rows.items()):
        y = margin + r * (tile_h + head + margin)
        draw.text((margin, y), captions.get(label, label), fill="black")
        for c, tile in enumerate(tiles):
            grid.paste(tile, (margin + c * (tile_w + margin), y + head))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
