"""From a checkpoint to detections to COCO AP: the one path every command and report takes.

- `load_detector(path)`: a run directory or ``ckpt_*`` folder -> (model, config, state).
- `predict(model, images, sizes, orig_sizes, max_detections)`: a batch -> one detection dict
  per image (``boxes`` absolute xyxy in the original image, ``labels``, ``scores``, best first).
- `evaluate(model, dataset, cfg, device)` and `evaluate_checkpoint(ckpt, cfg, device)`: COCOeval
  metrics on a data set, with `coco_evaluate`, as torchvision's detection references score.

`coco_evaluate` takes predictions as one dict per image:

    image_id  int, a COCO image id of `coco_gt`
    boxes     (n, 4) absolute xyxy pixels in the *original* image
    labels    (n,) contiguous labels 0..C-1, mapped to category ids by `label_to_cat_id`
    scores    (n,) confidences

Only the images that appear in the predictions are scored (so a subset or one rank's shard
can be evaluated); give an image with no detections an entry with empty tensors.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lors.data.coco import CocoDetection, collate_fn, fill_eval_defaults
from lors.engine.checkpoint import load_checkpoint
from lors.experiments import families
from lors.engine.loop import autocast_dtype, evaluating
from lors.experiments.detection.data import build_datasets, to_device
from lors.models.adamixer import DetectorConfig, PostProcess, build_detector

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


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
        return {k: 0.0 for k in COCO_METRICS}

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
    return {k: float(v) for k, v in zip(COCO_METRICS, evaluator.stats[:6])}


def run_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Path, DetectorConfig, dict]:
    """The checkpoint folder of ``path`` (a run directory or a ckpt_* folder), the
    DetectorConfig stored with it (plus ``overrides``) and its state.json."""
    return families.run_config(path, "detect", DetectorConfig, overrides)


def load_detector(path: str | Path, overrides: Sequence[str] = (), cfg: DetectorConfig | None = None,
                  device: torch.device | str = "cpu") -> tuple[nn.Module, DetectorConfig, dict]:
    """The trained detector of a run directory or ckpt_* folder, in eval mode on ``device``,
    with its config (``cfg`` instead, if given) and its state.json."""
    ckpt, stored, state = run_config(path, overrides)
    cfg = cfg or stored
    model = build_detector(cfg).to(device)
    load_checkpoint(ckpt, model)
    return model.eval(), cfg, state


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, sizes: torch.Tensor, orig_sizes: torch.Tensor,
            max_detections: int, dtype: torch.dtype | None = None) -> list[dict[str, torch.Tensor]]:
    """Detections of a padded batch.

    Args:
        images: (B, 3, H, W) on the model's device; sizes: (B, 2) the (h, w) of each image in it.
        orig_sizes: (B, 2) the (h, w) of the original images, where the boxes are returned.
        max_detections: best-scoring detections kept per image.
        dtype: autocast dtype (None: float32).

    Returns:
        one dict per image: ``boxes`` (n, 4) absolute xyxy, ``labels`` (n,), ``scores`` (n,),
        sorted by score, as float32 CPU tensors (labels int64).
    """
    device = images.device
    with evaluating(model), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        outputs = model(images, sizes)  # in eval mode, then the caller's mode again
    dets = PostProcess(max_detections)(outputs, sizes, orig_sizes.to(device))
    return [{k: (v.float() if v.is_floating_point() else v).cpu() for k, v in d.items()} for d in dets]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: CocoDetection, cfg: DetectorConfig, device: torch.device,
             batch_size: int = 2, progress: bool = True, verbose: bool = True) -> dict[str, float]:
    """COCOeval AP, AP50, AP75, APs, APm, APl of ``model`` on ``dataset``."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=partial(collate_fn, stride=cfg.data.size_divisor),
                        num_workers=cfg.data.num_workers)
    predictions, dtype = [], autocast_dtype(cfg.train.amp, device)
    for images, sizes, targets in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        images, sizes, targets = to_device(images, sizes, targets, device)
        orig = torch.stack([t["orig_size"] for t in targets])
        for t, det in zip(targets, predict(model, images, sizes, orig, cfg.test.max_detections, dtype)):
            predictions.append({"image_id": t["image_id"], **det})
    return coco_evaluate(dataset.coco, predictions, dataset.label_to_cat_id, verbose=verbose)


def evaluate_checkpoint(ckpt: str | Path, cfg: DetectorConfig, device: torch.device,
                        progress: bool = True, verbose: bool = True) -> dict[str, float]:
    """COCOeval metrics of the model in checkpoint folder ``ckpt`` on ``cfg``'s val split."""
    model, cfg, _ = load_detector(ckpt, cfg=cfg, device=device)
    _, val_set = build_datasets(cfg, train=False)
    return evaluate(model, val_set, cfg, device, progress=progress, verbose=verbose)


def evaluate_run(path: str | Path, overrides: Sequence[str] = (), config: str | Path | None = None,
                 device: str | None = None, verbose: bool = True) -> dict[str, float]:
    """`lors detect eval`: COCOeval metrics of a run directory or ckpt_* folder on the val split
    of its stored config plus ``overrides`` (or of ``config``, a preset name or YAML path)."""
    from lors.engine.distributed import init_distributed
    from lors.models.adamixer import load_detector_config
    ckpt, cfg, _ = run_config(path, overrides)
    if config:
        cfg = load_detector_config(config, overrides)
    _, _, dev = init_distributed(device)
    return evaluate_checkpoint(ckpt, cfg, dev, verbose=verbose)
