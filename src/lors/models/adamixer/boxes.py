"""Box formats and overlaps used by AdaMixer.

Three formats, all with the box coordinates in the last dimension:

- ``xyxy``: corners ``(x1, y1, x2, y2)``, the format of targets and predictions;
- ``cxcywh``: centre and size ``(cx, cy, w, h)``;
- ``xyzr``: AdaMixer's query boxes ``(cx, cy, z, r)`` with ``z = log2 sqrt(w h)`` (scale) and
  ``r = log2(h / w)`` (aspect ratio), so ``w = 2^(z - r/2)`` and ``h = 2^(z + r/2)``.

Pairwise functions take ``(..., N, 4)`` and ``(..., M, 4)`` and return ``(..., N, M)``, so the
same code serves one image and a batch of images.
"""
from __future__ import annotations

import torch
from torch import Tensor


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) corners -> (..., 4) centre and size."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) centre and size -> (..., 4) corners."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyzr_to_wh(xyzr: Tensor) -> Tensor:
    """(..., 4) xyzr -> (..., 2) width and height: ``2^z`` times ``2^(-r/2), 2^(r/2)``."""
    z, r = xyzr[..., 2:3], xyzr[..., 3:4]
    return torch.exp2(z) * torch.exp2(torch.cat([-0.5 * r, 0.5 * r], dim=-1))


def xyzr_to_cxcywh(xyzr: Tensor) -> Tensor:
    """(..., 4) xyzr -> (..., 4) centre and size."""
    return torch.cat([xyzr[..., :2], xyzr_to_wh(xyzr)], dim=-1)


def xyzr_to_xyxy(xyzr: Tensor) -> Tensor:
    """(..., 4) xyzr -> (..., 4) corners."""
    return cxcywh_to_xyxy(xyzr_to_cxcywh(xyzr))


def cxcywh_to_xyzr(boxes: Tensor) -> Tensor:
    """(..., 4) centre and size -> (..., 4) xyzr. Sizes must be positive."""
    w, h = boxes[..., 2:3], boxes[..., 3:4]
    z = 0.5 * torch.log2(w * h)  # log2 sqrt(w h)
    r = torch.log2(h / w)
    return torch.cat([boxes[..., :2], z, r], dim=-1)


def xyxy_to_xyzr(boxes: Tensor) -> Tensor:
    """(..., 4) corners -> (..., 4) xyzr. Sizes must be positive."""
    return cxcywh_to_xyzr(xyxy_to_cxcywh(boxes))


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...) area; degenerate boxes have area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _intersection(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise intersection areas, (..., N, 4) x (..., M, 4) -> (..., N, M)."""
    lt = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Pairwise IoU of xyxy boxes, (..., N, 4) x (..., M, 4) -> (..., N, M)."""
    inter = _intersection(boxes1, boxes2)
    union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
    return inter / union.clamp(min=eps)


def box_iof(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Pairwise intersection over the *first* box's area ("foreground"), (..., N, M).

    ``iof[n, m]`` is the fraction of box n covered by box m; AdaMixer turns it into an
    attention bias between queries.
    """
    return _intersection(boxes1, boxes2) / box_area(boxes1)[..., :, None].clamp(min=eps)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Pairwise generalised IoU (Rezatofighi et al. 2019) of xyxy boxes, (..., N, M).

    ``GIoU = IoU - (|C| - |A u B|) / |C|`` with C the smallest box enclosing A and B; in [-1, 1].
    """
    inter = _intersection(boxes1, boxes2)
    union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
    iou = inter / union.clamp(min=eps)
    lt = torch.minimum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.maximum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing.clamp(min=eps)


def aligned_generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """GIoU of matching pairs, (..., 4) x (..., 4) -> (...): the loss needs no N x M matrix."""
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(boxes1) + box_area(boxes2) - inter
    iou = inter / union.clamp(min=eps)
    lt = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    enclosing = (rb - lt).clamp(min=0).prod(-1)
    return iou - (enclosing - union) / enclosing.clamp(min=eps)
