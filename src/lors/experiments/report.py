"""Outputs of `lors detect compare` and `ablate`: the mean over seeds, the markdown table, the
plot of AP against decoder parameters and the picture of predictions on val images."""
from __future__ import annotations

import statistics
from pathlib import Path

METRICS = ("AP", "AP50", "AP75")
# per model, in summary.json and the table
KEYS = ("decoder_params", "total_params", "AP", "AP50", "AP75", "seconds_per_step", "peak_memory_mb")


def aggregate(per_seed: list[dict]) -> dict:
    """Mean of each KEY over seeds, with ``KEY_std`` (sample std, 0 for one seed) for the metrics."""
    out = {k: statistics.fmean(r[k] for r in per_seed) for k in KEYS}
    for k in (*METRICS, "seconds_per_step"):
        values = [r[k] for r in per_seed]
        out[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    out["decoder_params"], out["total_params"] = per_seed[0]["decoder_params"], per_seed[0]["total_params"]
    return out


def _fmt(row: dict, key: str) -> str:
    v = row[key]
    if key.endswith("params"):
        return f"{int(v):,}"
    if key in METRICS:
        std = row.get(f"{key}_std", 0.0)
        return f"{100 * v:.1f}" + (f" ± {100 * std:.1f}" if row.get("n_seeds", 1) > 1 else "")
    if key == "seconds_per_step":
        return f"{v:.2f}"
    return f"{v:.0f}"


HEADERS = {"decoder_params": "Decoder params", "total_params": "Total params", "AP": "AP",
           "AP50": "AP50", "AP75": "AP75", "seconds_per_step": "s / step", "peak_memory_mb": "Peak mem (MB)"}


def markdown_table(rows: dict[str, dict], first: str = "Model") -> str:
    """A markdown table of ``rows`` (label -> aggregated KEYS); AP columns in percent."""
    lines = ["| " + " | ".join([first, *(HEADERS[k] for k in KEYS)]) + " |",
             "|" + "---|" * (len(KEYS) + 1)]
    for label, row in rows.items():
        lines.append("| " + " | ".join([label, *(_fmt(row, k) for k in KEYS)]) + " |")
    return "\n".join(lines)


def plot_ap(rows: dict[str, dict], path: Path, title: str) -> Path:
    """AP and AP50 (percent, with the spread over seeds) against decoder parameters."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, marker in (("AP", "o"), ("AP50", "s")):
        xs = [r["decoder_params"] / 1e6 for r in rows.values()]
        ys = [100 * r[key] for r in rows.values()]
        errs = [100 * r.get(f"{key}_std", 0.0) for r in rows.values()]
        ax.errorbar(xs, ys, yerr=errs, fmt=marker, capsize=3, label=key)
        for x, y, label in zip(xs, ys, rows):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    top = max(100 * (r[k] + r.get(f"{k}_std", 0.0)) for r in rows.values() for k in ("AP", "AP50"))
    ax.set_ylim(0, max(5.0, 1.15 * top))  # a fixed floor of scale, so noise near 0 looks like 0
    ax.set_xlim(0, 1.15 * max(r["decoder_params"] for r in rows.values()) / 1e6)
    ax.set_xlabel("decoder parameters (M)")
    ax.set_ylabel("COCO metric on val (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_predictions(runs: dict[str, Path], data_dir: Path, path: Path, num_images: int = 4,
                     score_threshold: float = 0.3, min_shown: int = 2, scale: int = 3) -> Path:
    """A grid of val images: ground truth in the first row, then one row per trained run
    (label -> run directory) with its detections scoring >= ``score_threshold``, and at least
    its ``min_shown`` best, so that a weak model still shows what it predicts."""
    import torch
    from PIL import Image, ImageDraw

    from lors.data.coco import CocoDetection, collate_fn
    from lors.data.transforms import make_coco_transforms
    from lors.engine.checkpoint import load_checkpoint
    from lors.experiments.detection.train import run_config
    from lors.models.adamixer import PostProcess, build_detector
    from lors.plots import draw_boxes

    def enlarge(image, det):
        image = image.resize((image.width * scale, image.height * scale), Image.BILINEAR)
        return draw_boxes(image, {**det, "boxes": det["boxes"] * scale}, names)

    rows = {}
    for label, run_dir in runs.items():
        ckpt, cfg, _ = run_config(run_dir)
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
        model = build_detector(cfg).eval()
        load_checkpoint(ckpt, model)
        images, sizes, targets = collate_fn([val[i] for i in range(len(rows["ground truth"]))])
        with torch.no_grad():
            outputs = model(images, sizes)
        orig = torch.stack([t["orig_size"] for t in targets])
        tiles = []
        for i, det in enumerate(PostProcess(cfg.test.max_detections)(outputs, sizes, orig)):
            keep = det["scores"] >= score_threshold  # PostProcess sorts by score
            keep[:min_shown] = True
            tiles.append(enlarge(val.load_image(val.ids[i]), {k: v[keep] for k, v in det.items()}))
        rows[label] = tiles
    tile_w, tile_h = rows["ground truth"][0].size
    num_images = len(rows["ground truth"])
    margin, head = 6, 16
    grid = Image.new("RGB", (num_images * (tile_w + margin) + margin, len(rows) * (tile_h + head + margin) + margin), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, tiles) in enumerate(rows.items()):
        y = margin + r * (tile_h + head + margin)
        caption = label if label == "ground truth" else \
            f"{label}: detections with score >= {score_threshold}, and at least the best {min_shown}"
        draw.text((margin, y), caption, fill="black")
        for c, tile in enumerate(tiles):
            grid.paste(tile, (margin + c * (tile_w + margin), y + head))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
