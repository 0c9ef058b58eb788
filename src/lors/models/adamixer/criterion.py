"""AdaMixer's training loss: focal classification, L1 and GIoU box losses on every stage."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from lors.models.adamixer.boxes import aligned_generalized_box_iou
from lors.models.adamixer.matcher import HungarianMatcher, normaliser

TERMS = ("loss_cls", "loss_l1", "loss_giou")


def num_boxes_per_process(targets: list[dict], device) -> float:
    """The mean number of target boxes per process (at least 1): dividing each process's
    summed loss by it and averaging gradients (as DDP does) gives the loss averaged over all
    boxes of the global batch."""
    n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(n.item(), 1.0)


class SetCriterion(nn.Module):
    """Match each stage's predictions to the targets and score the matches.

    Args:
        num_classes: C.
        matcher: a HungarianMatcher.
        weight_dict: weight of each term, ``{"loss_cls": 2, "loss_l1": 5, "loss_giou": 2}``
            (AdaMixer), the same for every stage.
        focal_alpha, focal_gamma: focal loss parameters (0.25, 2).

    ``forward`` returns the unweighted terms of every stage i as ``loss_cls_{i}``,
    ``loss_l1_{i}``, ``loss_giou_{i}``; ``total(losses)`` weights and sums them.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        unknown = set(weight_dict) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; the terms are {TERMS}")
        self.num_classes, self.matcher = num_classes, matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def stage_losses(self, outputs: dict, targets: list[dict], num_boxes: float) -> dict[str, Tensor]:
        """The three terms for one stage's ``pred_logits`` (B, Q, C) and ``pred_boxes`` (B, Q, 4)."""
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()  # loss in fp32 under autocast
        indices = self.matcher(outputs, targets)
        batch = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(logits.device)
        query = torch.cat([q for q, _ in indices]).to(logits.device)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)

        onehot = torch.zeros_like(logits)
        onehot[batch, query, labels] = 1.0  # unmatched queries learn "no object": all zeros
        loss_cls = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                      reduction="sum") / num_boxes

        matched = boxes[batch, query]                                                   # (M, 4)
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(boxes)
        scale = torch.stack([normaliser(t) for t in targets]).to(boxes)[batch]         # (M, 4)
        loss_l1 = (matched / scale - target_boxes / scale).abs().sum() / num_boxes
        loss_giou = (1 - aligned_generalized_box_iou(matched, target_boxes)).sum() / num_boxes
        return {"loss_cls": loss_cls, "loss_l1": loss_l1, "loss_giou": loss_giou}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, Tensor]:
        """Losses of every stage.

        Args:
            outputs: the detector's output; ``outputs["stages"]`` holds each stage's
                ``pred_logits`` (B, Q, C) and ``pred_boxes`` (B, Q, 4, absolute xyxy).
            targets: B dicts with ``labels`` (T_b,) int64 in [0, C), ``boxes`` (T_b, 4) absolute
                xyxy in input pixels, and ``size`` (h, w) of the input image. T_b may be 0.

        Returns:
            ``loss_cls_{i}``, ``loss_l1_{i}``, ``loss_giou_{i}`` for each stage i, unweighted,
            each a sum over matches divided by the number of target boxes.
        """
        for t in targets:
            labels = t["labels"]
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"target labels must lie in [0, {self.num_classes}), got "
                                 f"{labels.min().item()}..{labels.max().item()} (image_id "
                                 f"{t.get('image_id', '?')}): map category ids to contiguous labels")
        num_boxes = num_boxes_per_process(targets, outputs["pred_logits"].device)
        losses = {}
        for i, stage in enumerate(outputs["stages"]):
            for name, value in self.stage_losses(stage, targets, num_boxes).items():
                losses[f"{name}_{i}"] = value
        return losses

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """Weighted sum of the terms that ``forward`` returned."""
        return sum(self.weight_dict[key.rsplit("_", 1)[0]] * value for key, value in losses.items())


def build_criterion(cfg) -> SetCriterion:
    """SetCriterion from a DetectorConfig's ``loss`` and ``decoder.num_classes``."""
    loss = cfg.loss
    matcher = HungarianMatcher(cost_class=loss.match_cls_weight, cost_l1=loss.match_l1_weight,
                               cost_giou=loss.match_giou_weight, focal_alpha=loss.focal_alpha,
                               focal_gamma=loss.focal_gamma)
    weights = {"loss_cls": loss.cls_weight, "loss_l1": loss.l1_weight, "loss_giou": loss.giou_weight}
    return SetCriterion(cfg.decoder.num_classes, matcher, weights, focal_alpha=loss.focal_alpha,
                        focal_gamma=loss.focal_gamma)
