"""Turn the detector's output into per-image detections, as torchvision's references expect."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class PostProcess(nn.Module):
    """Top-k (query, class) pairs by sigmoid score, boxes rescaled to the original image.

    Args:
        max_detections: k per image (AdaMixer: the number of queries, 100). A query may
            appear with several classes, as in AdaMixer's evaluation.
    """

    def __init__(self, max_detections: int = 100):
        super().__init__()
        self.max_detections = max_detections

    @torch.no_grad()
    def forward(self, outputs: dict, image_sizes: Tensor | Sequence[Sequence[int]],
                orig_sizes: Tensor | Sequence[Sequence[int]] | None = None) -> list[dict[str, Tensor]]:
        """Detections of each image.

        Args:
            outputs: ``pred_logits`` (B, N, C) and ``pred_boxes`` (B, N, 4) absolute xyxy in
                input pixels (the detector's output).
            image_sizes: (B, 2) (height, width) of the input images before padding (the
                targets' ``size``).
            orig_sizes: (B, 2) (height, width) of the original images (the targets'
                ``orig_size``); boxes are rescaled to them. ``None`` keeps input pixels.

        Returns:
            B dicts with ``scores`` (k,), ``labels`` (k,) int64 in [0, C) and ``boxes`` (k, 4)
            absolute xyxy, clipped to the image, sorted by decreasing score.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        B, N, C = logits.shape
        sizes = torch.as_tensor(image_sizes, dtype=boxes.dtype, device=boxes.device).view(B, 2)
        if orig_sizes is not None:
            orig = torch.as_tensor(orig_sizes, dtype=boxes.dtype, device=boxes.device).view(B, 2)
            boxes = boxes * (orig / sizes).flip(-1).repeat(1, 2)[:, None]   # (w, h, w, h) factors
            sizes = orig
        k = min(self.max_detections, N * C)
        scores, index = logits.sigmoid().flatten(1).topk(k, dim=1)           # (B, k)
        labels, query = index % C, torch.div(index, C, rounding_mode="floor")
        picked = boxes.gather(1, query[..., None].expand(-1, -1, 4))         # (B, k, 4)
        results = []
        for b in range(B):
            h, w = sizes[b].tolist()
            clipped = torch.stack([picked[b, :, 0].clamp(0, w), picked[b, :, 1].clamp(0, h),
                                   picked[b, :, 2].clamp(0, w), picked[b, :, 3].clamp(0, h)], dim=-1)
            results.append({"scores": scores[b], "labels": labels[b], "boxes": clipped})
        return results
