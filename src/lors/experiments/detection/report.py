"""What `compare` and `ablate` report: the mean over seeds, the markdown table, AP against
decoder parameters, AP against epochs and a picture of predictions on val images (written with
`lors.experiments.report`)."""
from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Mapping, Sequence

import torch
from PIL import Image

from lors.data.coco import CocoDetection, collate_fn
from lors.data.transforms import make_coco_transforms
from lors.engine.loop import read_val
from lors.experiments.detection.evaluate import load_detector, predict
from lors.experiments.report import Column, Series, draw_boxes, image_grid, markdown_table, mean_and_spread, plot_points

SHOWN_METRICS = ("AP", "AP50", "AP75")  # of COCO_METRICS, those the tables show
# per model, in summary.json and the table
KEYS = ("decoder_params", "total_params", "AP", "AP50", "AP75", "seconds_per_step", "peak_memory_mb")
HEADERS = {"decoder_params": "Decoder params", "total_params": "Total params", "AP": "AP",
           "AP50": "AP50", "AP75": "AP75", "seconds_per_step": "s / step", "peak_memory_mb": "Peak mem (MB)"}


def aggregate(per_seed: list[dict]) -> dict:
    """Mean of each KEY over seeds, with ``KEY_std`` (sample std, 0 for one seed) for the metrics."""
    out = mean_and_spread(per_seed, KEYS, (*SHOWN_METRICS, "seconds_per_step"))
    out["decoder_params"], out["total_params"] = per_seed[0]["decoder_params"], per_seed[0]["total_params"]
    return out


def _fmt(row: dict, key: str) -> str:
    v = row[key]
    if key.endswith("params"):
        return f"{int(v):,}"
    if key in SHOWN_METRICS:
        std = row.get(f"{key}_std", 0.0)
        return f"{100 * v:.1f}" + (f" ± {100 * std:.1f}" if row.get("n_seeds", 1) > 1 else "")
    if key == "seconds_per_step":
        return f"{v:.2f}"
    return f"{v:.0f}"


def results_table(rows: Mapping[str, dict], first: str = "Model") -> str:
    """A markdown table of ``rows`` (label -> aggregated KEYS); AP columns in percent."""
    columns = [Column(first, lambda r: r["label"]),
               *(Column(HEADERS[k], lambda r, k=k: _fmt(r, k)) for k in KEYS)]
    return markdown_table([{"label": label, **row} for label, row in rows.items()], columns)


def plot_ap(rows: Mapping[str, dict], path: Path, title: str) -> Path:
    """AP and AP50 (percent, with the spread over seeds) against decoder parameters."""
    xs = [r["decoder_params"] / 1e6 for r in rows.values()]
    series = [Series(key, xs, [100 * r[key] for r in rows.values()],
                     [100 * r.get(f"{key}_std", 0.0) for r in rows.values()], notes=list(rows), style=marker)
              for key, marker in (("AP", "o"), ("AP50", "s"))]
    top = max(100 * (r[k] + r.get(f"{k}_std", 0.0)) for r in rows.values() for k in ("AP", "AP50"))
    return plot_points(series, path, "decoder parameters (M)", "COCO metric on val (%)", title,
                       xlim=(0, 1.15 * max(xs)),
                       ylim=(0, max(5.0, 1.15 * top)))  # a fixed floor of scale, so noise near 0 looks like 0


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, AP) of each evaluation in a run's ``val.csv`` (during and at the end of training),
    by step, one per step (`lors.engine.loop.read_val`: a step evaluated twice keeps its last
    row); empty if it has none."""
    return [(r["step"], r["AP"]) for r in read_val(Path(run_dir) / "val.csv")]


def mean_curve(curves: Sequence[Sequence[tuple[float, float]]]) -> list[dict]:
    """Per-seed (epoch, AP) curves -> one point per epoch that any seed evaluated: ``epoch``,
    ``AP`` (mean over the seeds that have it), ``AP_std`` (sample std, 0 for one) and
    ``n_seeds``."""
    by_epoch: dict[float, list[float]] = {}
    for curve in curves:
        for epoch, ap in curve:
            by_epoch.setdefault(round(epoch, 6), []).append(ap)
    return [{"epoch": e, "AP": statistics.fmean(v), "AP_std": statistics.stdev(v) if len(v) > 1 else 0.0,
             "n_seeds": len(v)} for e, v in sorted(by_epoch.items())]


def plot_ap_epochs(rows: Mapping[str, dict], path: Path, title: str) -> Path:
    """AP (percent, spread over seeds) against epochs: a line per row that evaluated during
    training (its ``curve``), and per config the AP at the end of each of its rows' schedules
    (``epochs``), so that schedules of different length sit on one axis."""
    series = [Series(f"{label}, during training", [p["epoch"] for p in r["curve"]],
                     [100 * p["AP"] for p in r["curve"]], [100 * p["AP_std"] for p in r["curve"]], style=".-")
              for label, r in rows.items() if r.get("curve")]
    ends: dict[str, list[dict]] = {}
    for r in rows.values():
        ends.setdefault(r.get("config", ""), []).append(r)
    if len({r["epochs"] for r in rows.values()}) > 1 or not series:
        for config, group in ends.items():
            group = sorted(group, key=lambda r: r["epochs"])
            series.append(Series(f"{config or 'each row'}: end of each schedule", [r["epochs"] for r in group],
                                 [100 * r["AP"] for r in group], [100 * r.get("AP_std", 0.0) for r in group],
                                 style="s"))
    top = max((y + (e or 0)) for s in series for y, e in zip(s.y, s.err or [0] * len(s.y)))
    return plot_points(series, path, "epochs", "COCO AP on val (%)", title,
                       xlim=(0, 1.05 * max(x for s in series for x in s.x)), ylim=(0, max(5.0, 1.15 * top)))


def read_norms(run_dir: Path, steps_per_epoch: int) -> dict[str, list[tuple[float, float]]]:
    """The LORS norms a run logged (``train.log_private_norms``: ``shared_a``, ``private_a<i>``,
    ``shared_t``, ``private_t<i>`` columns of log.csv) as {column: [(epoch, norm)]}, the
    steps where they were measured; {} for a run that logged none."""
    path = Path(run_dir) / "log.csv"
    if not path.exists():
        return {}
    with path.open() as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in (rows[0] if rows else {}) if c.startswith(("shared_", "private_"))]
    return {c: [(int(r["step"]) / steps_per_epoch, float(r[c])) for r in rows if r[c] not in ("", "nan")]
            for c in columns}


def plot_lors_norms(norms: Mapping[str, Sequence[tuple[float, float]]], path: Path, title: str) -> Path:
    """Each stage's private LORS term relative to the shared one (||private_i|| / ||shared||, in
    percent) against epochs: LORS^A (the mixing generators, solid) and LORS^T (the output
    projection, dashed). Where the private terms stay near zero, the private path learns late."""
    series = []
    for kind, style, name in (("a", "-", "LORS^A"), ("t", "--", "LORS^T")):
        shared = dict(norms.get(f"shared_{kind}", ()))
        for column in sorted(c for c in norms if c.startswith(f"private_{kind}")):
            points = [(e, 100 * v / shared[e]) for e, v in norms[column] if shared.get(e)]
            if points:
                series.append(Series(f"{name} stage {column[len('private_' + kind):]}", [e for e, _ in points],
                                     [v for _, v in points], style=style))
    if not series:
        raise ValueError("no LORS norms to plot: the run did not log them (train.log_private_norms=true) "
                         "or has no shared term to compare with")
    top = max(max(s.y) for s in series)
    return plot_points(series, path, "epochs", "||private|| / ||shared|| (%)", title,
                       xlim=(0, 1.02 * max(max(s.x) for s in series)), ylim=(0, 1.1 * top))


def draw_predictions(runs: Mapping[str, Path], data_dir: Path, path: Path, num_images: int = 4,
                     score_threshold: float = 0.3, min_shown: int = 2, scale: int = 3) -> Path:
    """A grid of val images: ground truth in the first row, then one row per trained run
    (label -> run directory) with its detections scoring >= ``score_threshold``, and at least
    its ``min_shown`` best, so that a weak model still shows what it predicts."""

    def enlarge(image, det):
        image = image.resize((image.width * scale, image.height * scale), Image.BILINEAR)
        return draw_boxes(image, {**det, "boxes": det["boxes"] * scale}, names)

    rows: dict[str, list] = {}
    for label, run_dir in runs.items():
        model, cfg, _ = load_detector(run_dir)
        val = CocoDetection(data_dir / "val" / "images", data_dir / "val" / "annotations.json",
                            make_coco_transforms(False, (cfg.data.min_size,), cfg.data.max_size))
        names = val.class_names
        if "ground truth" not in rows:
            gt = []
            for i in range(min(num_images, len(val))):
                image = val.load_image(val.ids[i])
                target = val.load_target(val.ids[i], *image.size)
                gt.append(enlarge(image, {"boxes": target["boxes"], "labels": target["labels"]}))
            rows["ground truth"] = gt
        images, sizes, targets = collate_fn([val[i] for i in range(len(rows["ground truth"]))])
        orig = torch.stack([t["orig_size"] for t in targets])
        tiles = []
        for i, det in enumerate(predict(model, images, sizes, orig, cfg.test.max_detections)):
            keep = det["scores"] >= score_threshold  # sorted by score
            keep[:min_shown] = True
            tiles.append(enlarge(val.load_image(val.ids[i]), {k: v[keep] for k, v in det.items()}))
        rows[label] = tiles
    captions = {label: f"{label}: detections with score >= {score_threshold}, and at least the best {min_shown}"
                for label in runs}
    return image_grid(rows, captions, path)
