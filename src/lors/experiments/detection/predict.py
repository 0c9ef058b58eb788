"""Detections of a trained detector on one image file: drawn on it, and written as COCO results."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from lors.data import coco
from lors.data.transforms import make_coco_transforms
from lors.experiments.detection.evaluate import _to_coco_results, load_detector, predict
from lors.experiments.report import draw_detections


def predict_image(checkpoint: str | Path, image_path: str | Path, out: str | Path | None = None,
                  score_threshold: float = 0.3, overrides: Sequence[str] = (),
                  json_out: str | Path | None = None, image_id: int = 0) -> int:
    """Detect with the run (or ckpt_* folder) ``checkpoint`` on the image ``image_path`` and keep
    the detections scoring >= ``score_threshold``: drawn on the image, saved to ``out``, and/or
    written to ``json_out`` as COCO results, a list of ``{image_id, category_id, bbox [x, y, w, h]
    in pixels of the original image, score}`` (the run's ``label_to_cat_id`` gives the category
    ids). Returns how many were kept."""
    if out is None and json_out is None:
        raise ValueError("nothing to write: pass an output image (out) and/or a JSON path (json_out)")
    image = coco.load_rgb(Path(image_path))  # 8-bit RGB, 16-bit scaled; ImageFileError (a ValueError) names the file
    model, cfg, state = load_detector(checkpoint, overrides)
    transform = make_coco_transforms(False, (cfg.data.min_size,), cfg.data.max_size)
    batch, size, _ = coco.collate_fn([transform(image, {"boxes": torch.zeros(0, 4)})], cfg.data.size_divisor)
    det = predict(model, batch, size, torch.tensor([[image.height, image.width]]), cfg.test.max_detections)[0]
    keep = det["scores"] >= score_threshold
    kept = {k: v[keep] for k, v in det.items()}
    if out is not None:
        draw_detections(image, kept, state["class_names"], out)
    if json_out is not None:
        results = _to_coco_results([{"image_id": image_id, **kept}], state["label_to_cat_id"], {image_id})
        json_out = Path(json_out)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=1))
    return int(keep.sum())
