"""`lors convert compare`: which form of sharing pays on pretrained weights, measured.

For a pretrained model (SmolLM2-135M: held-out perplexity; MiniLM-L6: cosine similarity of its
sentence embeddings to the original's), every row of ``ROWS`` is converted at every budget from
one calibration run, evaluated on disjoint held-out text (by default the fortunes' train and val
parts; any pair of `texts.resolve_text` texts, recorded in the summary), and written as
``summary.json``, ``table.md`` and ``quality_vs_params.png`` (see docs/results/convert.md).
"""
from __future__ import annotations

import copy
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from lors.core.share import find_layers
from lors.experiments.convert.evaluate import (drop_layers, embedding_cosine, layer_similarity, layers_to_drop,
                                               perplexity, record_moments, sentence_embeddings)
from lors.experiments.convert.run import ConvertSettings, calibration_inputs, convert_pretrained
from lors.experiments.convert.texts import resolve_text, text_windows
from lors.experiments.report import Column, Series, markdown_table, plot_points, write_summary
from lors.models.pretrained import CAUSAL, Pretrained, load_pretrained
from lors.models.sharing import writes_residual


@dataclass(frozen=True)
class Row:
    """One way to spend a budget: ``form`` "lors", "basis" or "drop" (layer dropping), with or
    without calibration, over groups of ``groups`` adjacent layers (None: all)."""

    name: str
    label: str
    form: str
    calibrated: bool = True
    groups: int | None = None
    side: str = "in"  # "in", "out", or "mixed": "out" for the Linears that write the residual stream
    allocation: str = "uniform"
    writer_groups: int | str | None = "same"  # groups of the Linears that write the stream ("same": groups)


ROWS = (
    Row("svd", "per-layer SVD of the weights", "basis", False, 1),
    Row("svd-aa", "per-layer activation-aware SVD", "basis", True, 1),
    Row("lors", "LORS: mean of all layers + SVD of each residual", "lors", False),
    Row("lors-aa", "LORS: mean of all layers + activation-aware SVD of each residual", "lors", True),
    Row("drop", "drop the layers whose input and output are most alike", "drop"),
    Row("svd-aa-greedy", "per-layer activation-aware SVD, ranks allocated greedily", "basis", True, 1,
        allocation="greedy"),
    Row("lors-aa-g6", "LORS over groups of 6 adjacent layers, activation-aware", "lors", True, 6),
    Row("basis-g2", "basis shared by 2 adjacent layers (input side), activation-aware", "basis", True, 2),
    Row("basis-g2-out", "basis shared by 2 adjacent layers (output side), activation-aware", "basis", True, 2,
        side="out"),
    Row("basis-g2-mixed", "basis shared by 2 adjacent layers: input side for the Linears that read the "
        "residual stream, output side for those that write it, activation-aware", "basis", True, 2, side="mixed"),
    Row("basis-g3", "basis shared by 3 adjacent layers (input side), activation-aware", "basis", True, 3),
    Row("basis-g2-readers", "basis shared by 2 adjacent layers for the Linears that read the residual stream "
        "(q, k, v, gate, up), per-layer for those that write it (o, down), activation-aware", "basis", True, 2,
        writer_groups=1),
)
ROW_NAMES = tuple(r.name for r in ROWS)


def sides(row: Row, targets: Sequence[str]) -> str | dict[str, str]:
    """``row.side``, with "mixed" spelled out per target."""
    if row.side != "mixed":
        return row.side
    return {t: "out" if writes_residual(t) else "in" for t in targets}


@dataclass
class Measure:
    """What every conversion of a comparison is measured against: the calibration (inputs and
    their moments), the quality measure and the original model's score."""

    pre: Pretrained
    inputs: list[dict]
    moments: object                 # the InputMoments of every Linear of the blocks
    calib_seconds: float
    measure: Callable[[nn.Module], float]
    metric: str                     # "ppl" or "cosine"
    label: str
    better: str                     # "lower" or "higher"
    evaluated: str                  # what it is measured on, in words
    original: float
    similarity: list[float] | None  # per-layer input/output similarity, for the layer-dropping row


def check_rows(rows: Sequence[str], budgets: Sequence[float]) -> list[Row]:
    """The `ROWS` named in ``rows``; ValueError for an unknown row or a budget outside (0, 1)."""
    unknown = [r for r in rows if r not in ROW_NAMES]
    if unknown:
        raise ValueError(f"unknown rows {unknown}: choose from {list(ROW_NAMES)}")
    if not budgets or not all(0 < b < 1 for b in budgets):
        raise ValueError(f"budgets must be fractions with 0 < budget < 1, got {list(budgets)}")
    return [r for r in ROWS if r.name in rows]


def prepare(pre: Pretrained, calib, held, calib_tokens: int, eval_tokens: int, seq_len: int, eval_texts: int,
            need_similarity: bool) -> Measure:
    """Calibrate ``pre`` once on the text ``calib`` and build the measure on ``held``."""
    causal = pre.kind == CAUSAL
    inputs = calibration_inputs(pre, calib, calib_tokens, seq_len if causal else min(seq_len, 128), 4)
    t0 = time.perf_counter()
    moments = record_moments(pre.model, None, inputs)
    calib_seconds = time.perf_counter() - t0
    if causal:
        windows = text_windows(pre.tokenizer, held, eval_tokens, seq_len, "--eval-tokens")
        measure = lambda m: perplexity(m, windows)  # noqa: E731
        metric, label, better = "ppl", "held-out perplexity", "lower"
        evaluated = f"{windows.numel():,} tokens ({len(windows)} windows of {seq_len})"
    else:
        texts = held.entries()[:eval_texts]
        reference = sentence_embeddings(pre.model, pre.tokenizer, texts)
        measure = lambda m: embedding_cosine(m, pre.tokenizer, texts, reference)  # noqa: E731
        metric, label, better = "cosine", "cosine similarity to the original's sentence embeddings", "higher"
        evaluated = f"{len(texts):,} held-out entries of {held.name}"
    return Measure(pre, inputs, moments, calib_seconds, measure, metric, label, better, evaluated,
                   measure(pre.model), layer_similarity(pre.model, inputs) if need_similarity else None)


def convert_row(setup: Measure, row: Row, budget: float, calib_tokens: int) -> dict:
    """Convert a copy of the original by ``row`` at ``budget`` and measure it: one result."""
    pre, n_layers = setup.pre, len(find_layers(setup.pre.model)[1])
    m = copy.deepcopy(pre.model)
    t0 = time.perf_counter()
    if row.form == "drop":
        dropped = layers_to_drop(setup.similarity, budget)
        drop_layers(m, dropped)
        kept, ranks = (n_layers - len(dropped)) / n_layers, {"dropped": dropped}
    else:
        settings = ConvertSettings(budget=budget, form=row.form, side=sides(row, setup.moments.targets),
                                   groups=row.groups, writer_groups=row.writer_groups, allocation=row.allocation,
                                   calib_tokens=calib_tokens if row.calibrated else 0)
        conv = convert_pretrained(Pretrained(m, pre.tokenizer, pre.kind, pre.source), settings,
                                  setup.moments if row.calibrated else None)
        kept, ranks = conv.kept, {t: sorted(set(r)) for t, r in conv.ranks.items()}
    seconds = time.perf_counter() - t0
    return dict(row=row.name, label=row.label, budget=budget, kept=kept, value=setup.measure(m),
                convert_seconds=round(seconds, 1), ranks=ranks)


def compare_conversion(model: str = "smollm2", budgets: Sequence[float] = (0.75, 0.5),
                       rows: Sequence[str] = ROW_NAMES, out: str | Path = "runs/convert_compare",
                       calib_tokens: int = 16384, eval_tokens: int = 8192, seq_len: int = 512,
                       eval_texts: int = 1000, calibration: str | None = None, eval_text: str | None = None,
                       quiet: bool = False) -> dict:
    """Convert ``model`` by each row at each budget and measure it (`prepare`, then `convert_row`
    per row and budget); write ``summary.json``, ``table.md`` and the plot to ``out``; returns
    the summary. ``calibration``, ``eval_text``: texts for `texts.resolve_text` (None: the
    fortunes)."""
    chosen = check_rows(rows, budgets)
    calib = resolve_text(calibration, "calibration", other=eval_text)
    held = resolve_text(eval_text, "evaluation", other=calibration)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    setup = prepare(load_pretrained(model), calib, held, calib_tokens, eval_tokens, seq_len, eval_texts,
                    need_similarity=any(r.form == "drop" for r in chosen))
    results = []
    bar = tqdm(total=len(chosen) * len(budgets), disable=quiet, desc=f"convert {model}", unit="conversion")
    for row in chosen:
        for budget in budgets:
            results.append(convert_row(setup, row, budget, calib_tokens))
            bar.update()
            bar.set_postfix_str(f"{row.name} {budget}: {setup.metric} {results[-1]['value']:.4g}")
    bar.close()
    summary = dict(model=model, metric=setup.metric, metric_label=setup.label, better=setup.better,
                   original=setup.original, budgets=list(budgets), layers=len(find_layers(setup.pre.model)[1]),
                   calib_tokens=int(sum(kw["input_ids"].numel() for kw in setup.inputs)),
                   calibration_seconds=round(setup.calib_seconds, 1), evaluated_on=setup.evaluated,
                   texts=dict(calibration=calib.describe(), evaluation=held.describe()),
                   rows=[asdict(r) for r in chosen], results=results,
                   machine=f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
                   seconds=round(time.perf_counter() - start, 1))
    write_results(summary, out)
    return summary


def write_results(summary: dict, out: Path) -> None:
    """``summary.json``, ``table.md`` and ``quality_vs_params.png`` of a comparison in ``out``."""
    write_summary(out, summary, results_table(summary))
    plot_results(summary, out / "quality_vs_params.png")


def results_table(summary: dict) -> str:
    """One line per row: the parameters kept and the metric at each budget."""
    by = {(r["row"], r["budget"]): r for r in summary["results"]}
    rows = [{"name": r["name"], "label": r["label"]} for r in summary["rows"]]
    fmt = (lambda v: f"{v:,.2f}" if v < 1e4 else f"{v:.2e}") if summary["metric"] == "ppl" else (lambda v: f"{v:.4f}")

    def cell(budget):
        return lambda row: f"{fmt(by[row['name'], budget]['value'])} ({by[row['name'], budget]['kept']:.1%})"
    columns = [Column("method", lambda row: row["label"])]
    columns += [Column(f"{b:.0%} budget: {summary['metric']} (kept)", cell(b)) for b in summary["budgets"]]
    texts = summary.get("texts")  # summaries written before the texts were options have none: the fortunes
    on = "" if texts is None else (f" on {texts['evaluation']['name']} ({texts['evaluation']['part']}), calibrated "
                                   f"on {texts['calibration']['name']} ({texts['calibration']['part']})")
    return (f"{summary['model']}: {summary['metric_label']}{on}, original {fmt(summary['original'])} "
            f"({summary['better']} is better)\n\n" + markdown_table(rows, columns))


STYLES = ("o-", "s--", "^-", "D--", "v-", "P--", "X-", "*--")
CEILING = 1e4  # perplexities above this are off the chart (the model is broken); the legend says so


def plot_results(summary: dict, path: str | Path) -> Path:
    """The metric against the parameters kept, one line per row."""
    causal = summary["metric"] == "ppl"
    series = []
    for k, r in enumerate(summary["rows"]):
        pts = sorted((x["kept"], x["value"]) for x in summary["results"] if x["row"] == r["name"])
        off = causal and any(v > CEILING for _, v in pts)
        series.append(Series(r["name"] + (" (above the chart)" if off else ""), [p[0] * 100 for p in pts],
                             [p[1] for p in pts], style=STYLES[k % len(STYLES)]))
    values = [x["value"] for x in summary["results"]] + [summary["original"]]
    ylim = (summary["original"] * 0.8, min(CEILING, max(values)) * 1.3) if causal else None
    return plot_points(series, path, xlabel="parameters kept, % of the blocks' Linear weights",
                       ylabel=summary["metric_label"] + (" (log)" if causal else ""),
                       title=f"{summary['model']}: conversion at {', '.join(f'{b:.0%}' for b in summary['budgets'])}",
                       hlines=[(summary["original"], "original")], logy=causal, ylim=ylim)
