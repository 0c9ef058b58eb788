"""COCO box evaluation with pycocotools' COCOeval, as torchvision's detection references do.

Predictions are one dict per image:

    image_id  int, a COCO image id of `coco_gt`
    boxes     (n, 4) absolute xyxy pixels in the *original* image (see `rescale_boxes`)
    labels    (n,) contiguous labels 0..C-1, mapped to category ids by `label_to_cat_id`
    scores    (n,) confidences

Only the images that appear in the predictions are scored (so a subset or one rank's shard
can be evaluated); give an image with no detections an entry with empty tensors.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any, Mapping, Sequence

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lors.data.coco import fill_eval_defaults

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


def rescale_boxes(boxes: torch.Tensor, from_size: Sequence[int] | torch.Tensor, to_size: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Scale xyxy boxes (n, 4) from an image of (h, w) `from_size` to one of (h, w) `to_size`.

    Maps predictions on the resized network input back to the original image:
    `rescale_boxes(boxes, target["size"], target["orig_size"])`.
    """
    (fh, fw), (th, tw) = [int(v) for v in from_size], [int(v) for v in to_size]
    scale = boxes.new_tensor([tw / fw, th / fh, tw / fw, th / fh])
    return boxes * scale


def _to_coco_results(
    predictions: Sequence[Mapping[str, Any]], label_to_cat_id: Sequence[int] | Mapping[int, int], img_ids: set
) -> list[dict]:
    """Per-image prediction dicts -> COCO result records {image_id, category_id, bbox xywh, score}."""
    num_labels = len(label_to_cat_id)
    results = []
    for i, pred in enumerate(predictions):
        missing = [k for k in ("image_id", "boxes", "labels", "scores") if k not in pred]
        if missing:
            raise ValueError(f"prediction #{i} lacks key(s) {missing}: each needs image_id, boxes, labels, scores")
        image_id = int(pred["image_id"])
        if image_id not in img_ids:
            raise ValueError(
                f"prediction #{i} has image id {image_id}, which is not in the ground-truth json: "
                f"evaluate against the annotation file the images came from"
            )
        boxes = torch.as_tensor(pred["boxes"], dtype=torch.float64).reshape(-1, 4)
        labels = torch.as_tensor(pred["labels"], dtype=torch.int64).reshape(-1)
        scores = torch.as_tensor(pred["scores"], dtype=torch.float64).reshape(-1)
        if not len(boxes) == len(labels) == len(scores):
            raise ValueError(
                f"prediction for image id {image_id} has {len(boxes)} boxes, {len(labels)} labels and "
                f"{len(scores)} scores: they must have the same length"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= num_labels):
            raise ValueError(
                f"prediction for image id {image_id} has label {int(labels.max())} (or {int(labels.min())}) "
                f"outside 0..{num_labels - 1}: labels are contiguous, one per entry of label_to_cat_id"
            )
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
        for box, label, score in zip(xywh.tolist(), labels.tolist(), scores.tolist()):
            results.append(
                {"image_id": image_id, "category_id": int(label_to_cat_id[label]), "bbox": box, "score": score}
            )
    return results


def coco_evaluate(
    coco_gt: COCO,
    predictions: Sequence[Mapping[str, Any]],
    label_to_cat_id: Sequence[int] | Mapping[int, int],
    verbose: bool = True,
) -> dict[str, float]:
    """Score box predictions with COCOeval and return {AP, AP50, AP75, APs, APm, APl}.

    Args:
        coco_gt: ground truth, e.g. `CocoDetection.coco`. Annotations lacking `area`/`iscrowd`
            get the defaults COCOeval needs (w*h, 0).
        predictions: one dict per image (see the module docstring).
        label_to_cat_id: `label_to_cat_id[label]` is the COCO category id, e.g.
            `CocoDetection.label_to_cat_id`.
        verbose: print COCOeval's 12-line summary.

    Returns:
        dict of floats in [0, 1]; -1.0 where COCOeval has no ground truth for a metric (e.g. APs
        on images without small objects). With no predictions, or no detections at all, every
        value is 0.0 and a warning says so.
    """
    fill_eval_defaults(coco_gt)
    img_ids = set(coco_gt.getImgIds())
    results = _to_coco_results(predictions, label_to_cat_id, img_ids)
    if not results:
        # COCO.loadRes indexes results[0] and crashes on an empty list
        warnings.warn(
            f"coco_evaluate got {len(predictions)} prediction dict(s) holding no detections: "
            f"returning 0.0 for every metric",
            stacklevel=2,
        )
        return {k: 0.0 for k in METRICS}

    with contextlib.redirect_stdout(io.StringIO()):  # loadRes/evaluate/accumulate progress lines
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = sorted({int(p["image_id"]) for p in predictions})
        evaluator.evaluate()
        evaluator.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluator.summarize()
    if verbose:
        print(summary.getvalue(), end="")
    return {k: float(v) for k, v in zip(METRICS, evaluator.stats[:6])}
