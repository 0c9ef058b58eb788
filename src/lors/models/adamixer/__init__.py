"""AdaMixer (Gao et al., CVPR 2022) with switchable LORS, in plain PyTorch.

    cfg = load_detector_config("adamixer_lors_r50_1x", ["decoder.num_queries=300"])
    model = build_detector(cfg)                  # AdaMixer
    criterion = build_criterion(cfg)             # SetCriterion (focal + L1 + GIoU, every stage)
    postprocess = PostProcess(cfg.test.max_detections)

    outputs = model(images, image_sizes)         # images (B, 3, H, W), image_sizes (B, 2) (h, w)
    losses = criterion(outputs, targets)         # targets: dicts with boxes (xyxy), labels, size
    loss = criterion.total(losses)
    detections = postprocess(outputs, image_sizes, orig_sizes)   # list of {boxes, labels, scores}

    merge_detector(model)                        # LORS folded into plain AdaMixer layers, same outputs
    plain_cfg = merged_config(cfg)               # ... whose config builds that plain detector

Files: ``backbone`` (ResNet C2..C5), ``neck`` (channel mapping), ``boxes`` (formats, GIoU,
IoF), ``sampling`` (3D adaptive sampling), ``mixing`` (adaptive mixing, plain or LORS),
``stage`` (one decoder stage), ``detector`` (queries, decoder, ``build_detector``),
``matcher``, ``criterion``, ``postprocess``, ``config`` (dataclasses), ``report``
(``lors params detect``).
"""
from lors.models.adamixer.config import DetectorConfig, load_detector_config, merged_config
from lors.models.adamixer.criterion import SetCriterion, build_criterion
from lors.models.adamixer.detector import AdaMixer, build_detector, merge_detector
from lors.models.adamixer.matcher import HungarianMatcher
from lors.models.adamixer.postprocess import PostProcess

__all__ = ["AdaMixer", "DetectorConfig", "HungarianMatcher", "PostProcess", "SetCriterion",
           "build_criterion", "build_detector", "load_detector_config", "merge_detector", "merged_config"]
