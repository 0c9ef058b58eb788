"""Configuration of AdaMixer (+ LORS) detection: model, loss, training and data.

Defaults are the paper's 1x setting with ResNet-50 and plain AdaMixer; the YAML presets in
``configs/detect/`` override what differs. Load one with
``load_detector_config("adamixer_lors_r50_1x", ["decoder.num_queries=300"])``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from lors.config import load_config


@dataclass
class BackboneConfig:
    depth: int = 50                       # torchvision ResNet depth: 18, 34, 50, 101, 152
    weights: str | None = None            # None: random init; a local file; or a torchvision weights name
    frozen_stages: int = 1                # stem + layer1 frozen, as AdaMixer
    norm_eval: bool = True                # batch norms keep their running statistics
    num_levels: int = 4                   # feature maps C2..C(1+num_levels); 4 = C2..C5


@dataclass
class NeckConfig:
    dim: int = 256                        # feature width C after the 1x1 convs
    gn_groups: int = 32                   # GroupNorm groups


@dataclass
class DecoderConfig:
    num_classes: int = 80
    num_queries: int = 100
    num_stages: int = 6
    query_dim: int = 256                  # d
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.0
    num_groups: int = 4                   # G, sampling groups (LORS uses 2)
    in_points: int = 32                   # P_in per group (LORS uses 64)
    out_points: int = 128                 # P_out
    prior_prob: float = 0.01              # initial classifier foreground probability


@dataclass
class AdaptiveLorsConfig:
    """LORS^A on the channel and spatial mixing generators of all stages (paper Tables 4-6)."""
    enabled: bool = False
    rank: int | list[int] = 16            # r, one value or one per stage
    groups: int | list[int] = field(default_factory=lambda: [1, 1, 2, 2, 3, 3])  # K per stage
    use_shared: bool = True               # W^shared(q) term (Table 5)
    use_private: bool = True              # sum_k B E(q) A term (Table 5)


@dataclass
class StaticLorsConfig:
    """LORS^T on the mixing output projection of all stages (paper Tables 4 and 7)."""
    enabled: bool = False
    rank: int | list[int] = 8
    groups: int | list[int] = 1


@dataclass
class LorsConfig:
    adaptive: AdaptiveLorsConfig = field(default_factory=AdaptiveLorsConfig)
    static: StaticLorsConfig = field(default_factory=StaticLorsConfig)
    # "official": the authors' code (zero shared-generator weight, as AdaMixer zeroes its
    # generators); "paper": section 4.1 (Kaiming generator). See docs/detection.md.
    init: Literal["official", "paper"] = "official"


@dataclass
class LossConfig:
    """Loss terms and the Hungarian matching costs (AdaMixer uses the same weights for both)."""
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    cls_weight: float = 2.0
    l1_weight: float = 5.0                # on boxes normalised by the image size
    giou_weight: float = 2.0
    match_cls_weight: float = 2.0
    match_l1_weight: float = 5.0
    match_giou_weight: float = 2.0


@dataclass
class TrainConfig:
    """The paper's 1x schedule: AdamW, 12 epochs, lr x0.1 at epochs 8 and 11."""
    batch_size: int = 16                  # total over all processes
    lr: float = 2.5e-5
    weight_decay: float = 1e-4
    clip_grad: float = 1.0                # max gradient L2 norm; 0 disables clipping
    epochs: int = 12
    lr_steps: list[int] = field(default_factory=lambda: [8, 11])
    lr_gamma: float = 0.1
    warmup_iters: int = 500               # linear warm-up, as mmdetection's schedule
    warmup_ratio: float = 0.001
    seed: int = 0
    amp: str = "auto"                     # "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp16", "fp32"
    output_dir: str = "runs/detect"
    checkpoint_every: int = 1000          # iterations
    log_every: int = 20


@dataclass
class DataConfig:
    """COCO-format data: a json and an image folder per split; the 1x transforms."""
    train_images: str = "data/coco/train2017"
    train_annotations: str = "data/coco/annotations/instances_train2017.json"
    val_images: str = "data/coco/val2017"
    val_annotations: str = "data/coco/annotations/instances_val2017.json"
    min_size: int = 800                   # shorter side
    max_size: int = 1333                  # longer side at most
    flip_prob: float = 0.5
    size_divisor: int = 32                # batches are zero-padded to a multiple of this
    num_workers: int = 2


@dataclass
class TestConfig:
    max_detections: int = 100             # top-k over (query, class) scores per image


@dataclass
class DetectorConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    lors: LorsConfig = field(default_factory=LorsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    test: TestConfig = field(default_factory=TestConfig)


def load_detector_config(name_or_path: str | Path | None = None, overrides: Sequence[str] = ()) -> DetectorConfig:
    """A preset name (``configs/detect/NAME.yaml``), a YAML path, or ``None`` for the defaults,
    with ``key=value`` overrides."""
    return load_config(DetectorConfig, name_or_path, overrides, kind="detect")
