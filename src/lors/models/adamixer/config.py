"""Configuration of AdaMixer (+ LORS) detection: model, loss, training and data.

Defaults are the paper's 1x setting with ResNet-50 and plain AdaMixer (and ``lors.init`` the
core's ``DEFAULT_INIT``); each YAML preset in ``lors/configs/detect/`` states what differs from them
or from the preset it names as its ``base``. Load one with
``load_detector_config("adamixer_lors_r50_1x", ["decoder.num_queries=300"])``.

Each section's ``validate`` checks the ranges of its keys and `DetectorConfig.validate` the rules
between sections; the loader calls it after the overrides, so a bad value is refused with one
line naming the key, the value and the valid range before anything is built or trained.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from lors.config import Sections, at_least, check_rule, load_config, positive, require, within
from lors.core.static import DEFAULT_INIT
from lors.models.sharing import LorsLayers

RESNET_DEPTHS = (18, 34, 50, 101, 152)  # torchvision's ResNets


@dataclass
class BackboneConfig:
    depth: int = 50                       # torchvision ResNet depth: 18, 34, 50, 101, 152
    weights: str | None = None            # None: random init; a local file; or a torchvision weights name
    frozen_stages: int = 1                # stem + layer1 frozen, as AdaMixer
    norm_eval: bool = True                # batch norms keep their running statistics
    num_levels: int = 4                   # feature maps C2..C(1+num_levels); 4 = C2..C5

    def validate(self) -> None:
        require(self.depth in RESNET_DEPTHS, "backbone.depth", self.depth, f"one of {list(RESNET_DEPTHS)}")
        require(self.weights is None or bool(self.weights.strip()), "backbone.weights", self.weights,
                "null (random init), a local file or a torchvision weights name")
        check_rule(1 <= self.num_levels <= 4, "backbone.num_levels",
                   f"is {self.num_levels}, but num_levels must be in 1..4 (C2 up to C2..C5)")
        at_least("backbone.frozen_stages", self.frozen_stages, -1, "-1 freezes nothing, 0 the stem only")
        check_rule(self.frozen_stages <= self.num_levels, "backbone.frozen_stages",
                   f": frozen_stages {self.frozen_stages} exceeds num_levels {self.num_levels} (only "
                   f"{self.num_levels} residual stages are built): use -1..{self.num_levels}")


@dataclass
class NeckConfig:
    dim: int = 256                        # feature width C after the 1x1 convs
    gn_groups: int = 32                   # GroupNorm groups

    def validate(self) -> None:
        at_least("neck.dim", self.dim, 1)
        at_least("neck.gn_groups", self.gn_groups, 1)
        require(self.dim % self.gn_groups == 0, "neck.gn_groups", self.gn_groups,
                f"a divisor of neck.dim={self.dim} (GroupNorm splits the channels evenly)")


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

    def validate(self) -> None:
        for name in ("num_classes", "num_queries", "num_stages", "query_dim", "num_heads", "ffn_dim",
                     "num_groups", "in_points", "out_points"):
            at_least(f"decoder.{name}", getattr(self, name), 1)
        require(self.query_dim % self.num_heads == 0, "decoder.num_heads", self.num_heads,
                f"a divisor of decoder.query_dim={self.query_dim} (each head gets query_dim / num_heads "
                f"channels)")
        within("decoder.dropout", self.dropout, 0, 1, "[)")
        within("decoder.prior_prob", self.prior_prob, 0, 1, "()", "a probability")


@dataclass
class AdaptiveLorsConfig(LorsLayers):
    """LORS^A on the channel and spatial mixing generators of all stages (paper Tables 4-6);
    ``rank`` (r) and ``groups`` (K), one value or one per stage, come from `LorsLayers`."""
    enabled: bool = False
    rank: int | list[int] = 16            # r, one value or one per stage
    groups: int | list[int] = field(default_factory=lambda: [1, 1, 2, 2, 3, 3])  # K per stage
    use_shared: bool = True               # W^shared(q) term (Table 5)
    use_private: bool = True              # sum_k B E(q) A term (Table 5)

    def validate(self, num_stages: int) -> None:
        # one int >= 1, or (when used) one per decoder stage
        self.check_per_layer("lors.adaptive", num_stages, "decoder.num_stages", unit="stage", lengths=self.enabled)
        check_rule(not self.enabled or self.use_shared or self.use_private,
                   ["lors.adaptive.use_shared", "lors.adaptive.use_private"],
                   "are both false, which leaves LORS^A no weight: set one of them to true")


@dataclass
class StaticLorsConfig(LorsLayers):
    """LORS^T on the mixing output projection of all stages (paper Tables 4 and 7); ``rank``
    (default 8) and ``groups`` (default 1), one value or one per stage, come from `LorsLayers`."""
    enabled: bool = False

    def validate(self, num_stages: int) -> None:
        # one int >= 1, or (when used) one per decoder stage
        self.check_per_layer("lors.static", num_stages, "decoder.num_stages", unit="stage", lengths=self.enabled)


@dataclass
class LorsConfig:
    """The detector's ``lors:`` section. Unlike the transformers' (`lors.models.sharing.LorsSection`,
    one `LorsLayers`), it nests two `LorsLayers`, each with its own ``rank`` and ``groups``:
    ``adaptive`` (LORS^A) and ``static`` (LORS^T); ``init`` is shared by both."""
    adaptive: AdaptiveLorsConfig = field(default_factory=AdaptiveLorsConfig)
    static: StaticLorsConfig = field(default_factory=StaticLorsConfig)
    # "paper": section 4.1 (Kaiming generator), the core's default; "official": the authors'
    # code (zero shared-generator weight, as AdaMixer zeroes its generators), which every
    # preset states. See docs/detection.md.
    init: Literal["official", "paper"] = DEFAULT_INIT

    def validate(self, num_stages: int) -> None:
        self.adaptive.validate(num_stages)
        self.static.validate(num_stages)


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

    def validate(self) -> None:
        within("loss.focal_alpha", self.focal_alpha, 0, 1, "[]", "the weight of positives")
        at_least("loss.focal_gamma", self.focal_gamma, 0)
        for kind in ("", "match_"):
            names = [f"{kind}{term}_weight" for term in ("cls", "l1", "giou")]
            for name in names:
                at_least(f"loss.{name}", getattr(self, name), 0, "0 turns the term off")
            check_rule(any(getattr(self, name) > 0 for name in names), [f"loss.{n}" for n in names],
                       f"are all 0, which leaves the {'matching cost' if kind else 'loss'} empty: make one > 0")


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
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # "auto": bf16 on GPU, fp32 on CPU
    output_dir: str = "runs/detect"
    checkpoint_every: int = 1000          # iterations
    log_every: int = 20
    eval_every_epochs: int = 0            # COCOeval on val every this many epochs too (val.csv); 0: at the end only
    log_private_norms: bool = False       # log.csv: Frobenius norms of LORS's shared and private terms per stage
    shared_lr_scale: float = 1.0          # lr factor of LORS's shared tensors (generators, shared weight)
    private_lr_scale: float = 1.0         # lr factor of LORS's private factors (A, B, E)
    private_weight_decay: float | None = None  # weight decay of the private factors; None: train.weight_decay

    def validate(self) -> None:
        at_least("train.batch_size", self.batch_size, 1, "images per step over all processes")
        positive("train.lr", self.lr)
        at_least("train.weight_decay", self.weight_decay, 0)
        at_least("train.clip_grad", self.clip_grad, 0, "0 disables clipping")
        at_least("train.epochs", self.epochs, 1)
        check_rule(all(1 <= e <= self.epochs for e in self.lr_steps), "train.lr_steps",
                   f"is {self.lr_steps} but train.epochs={self.epochs} and a step after the schedule never "
                   f"happens: give epochs in [1, {self.epochs}] (or train.lr_steps=[]) when you change train.epochs")
        within("train.lr_gamma", self.lr_gamma, 0, 1, "(]", "the lr factor at each of train.lr_steps")
        at_least("train.warmup_iters", self.warmup_iters, 0, "0: no warm-up")
        within("train.warmup_ratio", self.warmup_ratio, 0, 1, "[]", "the lr factor at step 0 of the warm-up")
        at_least("train.seed", self.seed, 0)
        require(bool(self.output_dir.strip()), "train.output_dir", self.output_dir, "a folder path")
        at_least("train.checkpoint_every", self.checkpoint_every, 1, "iterations between checkpoints")
        at_least("train.log_every", self.log_every, 1, "iterations between log flushes")
        at_least("train.eval_every_epochs", self.eval_every_epochs, 0, "0 evaluates at the end only")
        positive("train.shared_lr_scale", self.shared_lr_scale)
        positive("train.private_lr_scale", self.private_lr_scale)
        if self.private_weight_decay is not None:
            at_least("train.private_weight_decay", self.private_weight_decay, 0)

    def lors_groups(self) -> bool:
        """Whether LORS's shared and private tensors get their own parameter groups."""
        return (self.shared_lr_scale, self.private_lr_scale, self.private_weight_decay) != (1.0, 1.0, None)


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

    def validate(self) -> None:
        for name in ("train_images", "train_annotations", "val_images", "val_annotations"):
            require(bool(getattr(self, name).strip()), f"data.{name}", getattr(self, name), "a path")
        at_least("data.min_size", self.min_size, 1, "pixels of the shorter side")
        at_least("data.max_size", self.max_size, 1, "pixels of the longer side at most")
        within("data.flip_prob", self.flip_prob, 0, 1, "[]", "a probability")
        at_least("data.size_divisor", self.size_divisor, 1, "batches are padded to a multiple of it")
        at_least("data.num_workers", self.num_workers, 0, "0 loads in the main process")


@dataclass
class TestConfig:
    max_detections: int = 100             # top-k over (query, class) scores per image

    def validate(self) -> None:
        at_least("test.max_detections", self.max_detections, 1)


class DetectorConfig(Sections, lors_layers="decoder.num_stages"):
    backbone: BackboneConfig
    neck: NeckConfig
    decoder: DecoderConfig
    lors: LorsConfig
    loss: LossConfig
    train: TrainConfig
    data: DataConfig
    test: TestConfig

    def validate(self) -> None:
        """ValueError naming the first key out of its range (each section's, in field order, then
        the rules between sections); the loader calls this."""
        super().validate()
        a, t = self.lors.adaptive, self.lors.static
        check_rule(not self.train.log_private_norms or (a.enabled and a.use_private) or t.enabled,
                   "train.log_private_norms", "is true but this detector has no LORS private term to measure "
                   "(lors.adaptive with use_private, or lors.static): enable LORS or set "
                   "train.log_private_norms=false")
        require(self.neck.dim % self.decoder.num_groups == 0, "decoder.num_groups", self.decoder.num_groups,
                f"a divisor of neck.dim={self.neck.dim} (each sampling group mixes neck.dim / num_groups "
                f"channels)")


def load_detector_config(name_or_path: str | Path | None = None, overrides: Sequence[str] = ()) -> DetectorConfig:
    """A preset name (``lors/configs/detect/NAME.yaml``), a YAML path, or ``None`` for the defaults,
    with ``key=value`` overrides."""
    return load_config(DetectorConfig, name_or_path, overrides, kind="detect")


def merged_config(cfg: DetectorConfig) -> DetectorConfig:
    """The config of ``cfg``'s detector after ``merge_detector``: the same detector with LORS
    off (plain AdaMixer generators and output projections of the same layout)."""
    import copy
    merged = copy.deepcopy(cfg)
    merged.lors.adaptive.enabled = False
    merged.lors.static.enabled = False
    return merged
