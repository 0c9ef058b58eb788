"""The detector's data: COCO-format train and val sets as a DetectorConfig describes them."""
from __future__ import annotations

import torch

from lors.data.coco import CocoDetection, count_crowded_images
from lors.data.transforms import make_coco_transforms
from lors.models.adamixer import DetectorConfig


def build_datasets(cfg: DetectorConfig, train: bool = True, val: bool = True):
    """(train, val) CocoDetection data sets of ``cfg.data`` (None where not wanted); checks the
    class count and that every image file exists, before anything trains."""
    d = cfg.data
    out = []
    for wanted, images, ann, is_train in ((train, d.train_images, d.train_annotations, True),
                                          (val, d.val_images, d.val_annotations, False)):
        if not wanted:
            out.append(None)
            continue
        tf = make_coco_transforms(is_train, (d.min_size,), d.max_size, d.flip_prob)
        ds = CocoDetection(images, ann, transforms=tf, verify_files=True)  # missing files: now, not mid-run
        if ds.num_classes != cfg.decoder.num_classes:
            raise ValueError(f"{ann} has {ds.num_classes} categories but decoder.num_classes is "
                             f"{cfg.decoder.num_classes}: set decoder.num_classes={ds.num_classes}")
        if is_train:
            count_crowded_images(ds, cfg.decoder.num_queries)  # warns once if boxes can never be matched
        out.append(ds)
    return tuple(out)


def to_device(images: torch.Tensor, sizes: torch.Tensor, targets: list[dict], device: torch.device):
    """A collated batch (see `lors.data.coco.collate_fn`) on ``device``."""
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images.to(device, non_blocking=True), sizes.to(device), targets
