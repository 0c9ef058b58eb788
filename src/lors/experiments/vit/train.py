"""Training a small ViT on Fashion-MNIST: `train(cfg)` builds the model, the batches and the loss
and hands them to the engine's loop (`lors.engine.loop.fit`): locked run directory, atomic
checkpoints, exact resume (each epoch's order is a permutation drawn from (seed, epoch)), logs,
the NaN guard, torchrun DDP. The val metric is top-1 accuracy on the test split, in percent.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lors.config import to_dict
from lors.data.fashion import load_fashion_mnist
from lors.engine import distributed
from lors.engine.loop import RETRY_HINT, RunSettings, adamw, evaluating, fit
from lors.engine.sampler import EpochSampler
from lors.engine.schedule import Schedule
from lors.models.vit import VitConfig, build_vit

RESUME_FREE = ("train.output_dir", "train.log_every", "train.checkpoint_every", "train.eval_every",
               "data.test_images")
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's train pixels


def normalise(images: torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 28, 28) float, standardised."""
    return ((images.float() / 255.0 - MEAN) / STD)[:, None]


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
             batch: int = 500) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy on the test images."""
    correct, loss = 0, 0.0
    with evaluating(model):
        for i in range(0, len(images), batch):
            x, y = normalise(images[i:i + batch]).to(device), labels[i:i + batch].to(device)
            logits = model(x)
            correct += int((logits.argmax(-1) == y).sum())
            loss += F.cross_entropy(logits, y, reduction="sum").item()
    return {"val_acc": 100.0 * correct / len(images), "val_loss": loss / len(images)}


def check_data(cfg: VitConfig, images: torch.Tensor, labels: torch.Tensor) -> None:
    """A ValueError naming the config key when the images or labels do not fit the model."""
    m = cfg.model
    if labels.numel() and int(labels.max()) >= m.num_classes:
        raise ValueError(f"the labels go up to {int(labels.max())}, but config key 'model.num_classes' is "
                         f"{m.num_classes}: set model.num_classes={int(labels.max()) + 1} (Fashion-MNIST has 10)")
    if m.in_chans != 1:
        raise ValueError(f"Fashion-MNIST images are grey (1 channel), but config key 'model.in_chans' is "
                         f"{m.in_chans}: set model.in_chans=1")
    if tuple(images.shape[1:]) != (m.img_size, m.img_size):
        raise ValueError(f"the images are {images.shape[1]} x {images.shape[2]}, but config key 'model.img_size' "
                         f"is {m.img_size}: set model.img_size={images.shape[1]}")


def train(cfg: VitConfig, run_dir: str | Path | None = None, resume: bool = True, stop_after: int | None = None,
          device: str | None = None, progress: bool = True, evaluate_at_end: bool = True,
          extend: bool = False) -> dict:
    """Train ``cfg``'s ViT; returns the engine's summary plus test accuracy at the end. ``extend``
    lets a larger ``train.steps`` continue a finished shorter run."""
    cfg.validate()
    t = cfg.train
    rank, world, dev, per_process = distributed.setup(device, t.batch_size)
    images, labels = load_fashion_mnist("train", cfg.data.root)
    images, labels = images[:cfg.data.train_images], labels[:cfg.data.train_images]
    test_x, test_y = load_fashion_mnist("test", cfg.data.root)
    test_x, test_y = test_x[:cfg.data.test_images], test_y[:cfg.data.test_images]
    check_data(cfg, images, torch.cat([labels, test_y]))  # before the run directory is touched
    torch.manual_seed(t.seed)
    model = build_vit(cfg).to(dev)
    optimizer = adamw(model, t.lr, t.weight_decay)
    sampler = EpochSampler(len(images), per_process, t.seed, rank, world)

    def epoch_batches(epoch: int, start: int):
        sampler.set_epoch(epoch, start)
        order = torch.tensor(list(sampler), dtype=torch.long)
        return ((images[idx], labels[idx]) for idx in order.split(per_process) if len(idx) == per_process)

    def loss_fn(model, batch):
        x, y = normalise(batch[0]).to(dev), batch[1].to(dev)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"train_acc": float((logits.argmax(-1) == y).float().mean()) * 100}

    settings = RunSettings(
        run_dir=run_dir or t.output_dir, config=to_dict(cfg), defaults=to_dict(type(cfg)()), resume_free=RESUME_FREE, length_key="train.steps",
        log_terms=("train_acc",), checkpoint_every=t.checkpoint_every, log_every=t.log_every, eval_every=t.eval_every,
        clip_grad=t.clip_grad, amp=t.amp, resume=resume, extend=extend, stop_after=stop_after, progress=progress,
        fail_hint=RETRY_HINT)
    schedule = Schedule(lr=t.lr, total_steps=t.steps, warmup_steps=t.warmup_steps, decay="cosine")
    final = partial(evaluate, model, test_x, test_y, dev) if evaluate_at_end else None
    return fit(model, loss_fn, epoch_batches, sampler.steps, optimizer, schedule, settings, rank, world,
               evaluate=final)
