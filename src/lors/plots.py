"""Pictures people would rather look at than read: detections drawn on images."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
          "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324"]


def draw_boxes(image: Image.Image, det: dict[str, torch.Tensor], class_names: Sequence[str],
               width: int = 2) -> Image.Image:
    """A copy of ``image`` with ``det["boxes"]`` (n, 4, absolute xyxy), their class names and,
    if given, ``det["scores"]`` drawn on it."""
    image = image.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    scores = det.get("scores")
    for k, (box, label) in enumerate(zip(det["boxes"].tolist(), det["labels"].tolist())):
        color = COLORS[label % len(COLORS)]
        draw.rectangle(box, outline=color, width=width)
        text = class_names[label] + (f" {scores[k]:.2f}" if scores is not None else "")
        x, y = box[0], max(box[1] - 11, 0)
        draw.rectangle(draw.textbbox((x, y), text), fill=color)
        draw.text((x, y), text, fill="white")
    return image


def draw_detections(image: Image.Image, det: dict[str, torch.Tensor], class_names: Sequence[str],
                    out: str | Path) -> Path:
    """Save ``image`` with ``det`` drawn on it as a PNG."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_boxes(image, det, class_names).save(out)
    return out
