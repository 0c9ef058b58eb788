"""Hungarian matching of predictions to targets, with AdaMixer's costs.

cost = w_cls * focal_cost + w_l1 * L1(normalised xyxy) - w_giou * GIoU, the same terms and
weights (2, 5, 2) as the loss, so that each target is matched to the query that the loss
would favour.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from lors.models.adamixer.boxes import generalized_box_iou


def normaliser(target: dict) -> Tensor:
    """(4,) tensor (w, h, w, h) of a target's image size; boxes divided by it lie in [0, 1]."""
    if "size" not in target:
        raise ValueError("each target needs 'size' (height, width of the input image) to normalise boxes")
    h, w = torch.as_tensor(target["size"], dtype=torch.float32).tolist()
    return torch.tensor([w, h, w, h])


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth boxes, per image.

    Args:
        cost_class: weight of the focal classification cost.
        cost_l1: weight of the L1 distance between normalised xyxy boxes.
        cost_giou: weight of the (negative) generalised IoU.
        focal_alpha, focal_gamma: the focal cost's alpha and gamma (0.25, 2).
    """

    def __init__(self, cost_class: float = 2.0, cost_l1: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        self.cost_class, self.cost_l1, self.cost_giou = cost_class, cost_l1, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor) -> Tensor:
        """Matching costs of Q predictions against T targets.

        Args:
            logits: (Q, C) class logits; boxes: (Q, 4) normalised xyxy.
            labels: (T,) int64 in [0, C); target_boxes: (T, 4) normalised xyxy.

        Returns:
            (Q, T) costs.
        """
        prob = logits.float().sigmoid()
        eps = 1e-12
        # focal loss of calling the target's class positive, minus that of calling it negative
        neg = -(1 - prob + eps).log() * (1 - self.focal_alpha) * prob.pow(self.focal_gamma)
        pos = -(prob + eps).log() * self.focal_alpha * (1 - prob).pow(self.focal_gamma)
        cost_class = pos[:, labels] - neg[:, labels]
        cost_l1 = torch.cdist(boxes.float(), target_boxes.float(), p=1)
        cost_giou = -generalized_box_iou(boxes.float(), target_boxes.float())
        return self.cost_class * cost_class + self.cost_l1 * cost_l1 + self.cost_giou * cost_giou

    @staticmethod
    def assign(cost: Tensor) -> tuple[Tensor, Tensor]:
        """Minimum-cost assignment of a (Q, T) matrix -> (query indices, target indices)."""
        if not torch.isfinite(cost).all():
            raise ValueError("matching costs are not finite: the predictions contain NaN or inf "
                             "(lower the learning rate, or enable gradient clipping)")
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)

    @torch.no_grad()
    def match_image(self, logits: Tensor, boxes: Tensor, target: dict) -> tuple[Tensor, Tensor]:
        """Match one image: logits (Q, C), boxes (Q, 4) absolute xyxy, a target dict with
        ``labels`` (T,), ``boxes`` (T, 4) absolute xyxy and ``size`` (h, w)."""
        scale = normaliser(target).to(boxes.device)
        cost = self.cost_matrix(logits, boxes / scale, target["labels"].to(boxes.device),
                                target["boxes"].to(boxes.device) / scale)
        return self.assign(cost)

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """Match a batch with one cost computation for all images, then one assignment each.

        Args:
            outputs: ``pred_logits`` (B, Q, C) and ``pred_boxes`` (B, Q, 4) absolute xyxy.
            targets: B dicts with ``labels`` (T_b,), ``boxes`` (T_b, 4) absolute xyxy and
                ``size`` (h, w).

        Returns:
            B pairs (query indices, target indices), each of length min(Q, T_b).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        B, Q = logits.shape[:2]
        if len(targets) != B:
            raise ValueError(f"{B} images of predictions but {len(targets)} targets")
        device = boxes.device
        scales = torch.stack([normaliser(t) for t in targets]).to(device)            # (B, 4)
        sizes = [len(t["boxes"]) for t in targets]
        labels = torch.cat([t["labels"].to(device) for t in targets])
        target_boxes = torch.cat([t["boxes"].to(device) / s for t, s in zip(targets, scales)]).view(-1, 4)
        pred_boxes = (boxes / scales[:, None]).flatten(0, 1)                          # (B*Q, 4)
        cost = self.cost_matrix(logits.flatten(0, 1), pred_boxes, labels, target_boxes).view(B, Q, sum(sizes))
        return [self.assign(c[b]) for b, c in enumerate(cost.split(sizes, dim=-1))]
