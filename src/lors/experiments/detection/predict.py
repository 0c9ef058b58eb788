"""Detections of a trained detector on one image file, drawn on it."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from lors.data import coco
from lors.data.transforms import make_coco_transforms
from lors.experiments.detection.evaluate import load_detector, predict
from lors.experiments.report import draw_detections


def predict_image(checkpoint: str | Path, image_path: str | Path, out: str | Path,
                  score_threshold: float = 0.3, overrides: Sequence[str] = ()) -> int:
    """Draw the detections scoring >= ``score_threshold`` of the run (or ckpt_* folder)
    ``checkpoint`` on the image ``image_path``, saved to ``out``; returns how many."""
    image = coco.load_rgb(Path(image_path))  # 8-bit RGB, 16-bit scaled; ImageFileError (a ValueError) names the file
    model, cfg, state = load_detector(checkpoint, overrides)
    transform = make_coco_transforms(False, (cfg.data.min_size,), cfg.data.max_size)
    batch, size, _ = coco.collate_fn([transform(image, {"boxes": torch.zeros(0, 4)})], cfg.data.size_divisor)
    det = predict(model, batch, size, torch.tensor([[image.height, image.width]]), cfg.test.max_detections)[0]
    keep = det["scores"] >= score_threshold
    draw_detections(image, {k: v[keep] for k, v in det.items()}, state["class_names"], out)
    return int(keep.sum())
