"""Training of the detector on COCO-format data: `train(cfg)` builds the detector's objects
and hands them to the engine's loop (`lors.engine.loop.fit`).

The paper's recipe: AdamW, a linear warm-up then step decay (`schedule`), gradient clipping,
every decoder stage supervised (`SetCriterion`). Single-process or under torchrun; logs,
checkpoints, exact resume and the NaN guard are the engine's (see `lors.engine.loop`).

Two things a run may also record, neither of which changes its weights: COCO AP on val every
``train.eval_every_epochs`` epochs (the engine's periodic evaluation, rows of ``val.csv``), and
with ``train.log_private_norms`` the norms of the LORS terms per stage (`lors_norms`) as extra
columns of ``log.csv`` and TensorBoard scalars.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch.utils.data import DataLoader

from lors.config import to_dict
from lors.engine import distributed
from lors.engine.checkpoint import find_checkpoint, read_state
from lors.engine.loop import RETRY_HINT, NonFiniteLossError, RunSettings, adamw, fit
from lors.engine.sampler import EpochSampler, SeededItems
from lors.engine.schedule import Schedule
from lors.data.coco import collate_fn
from lors.experiments.detection.data import build_datasets, to_device
from lors.experiments.detection.evaluate import evaluate
from lors.models.adamixer import DetectorConfig, build_criterion, build_detector
from lors.models.adamixer.mixing import lors_norms, lors_parameter_roles

__all__ = ["train", "schedule", "build_optimizer", "detection_loss", "with_norms", "NonFiniteLossError", "EpochSampler", "RESUME_FREE"]

# config keys that may change between a run and its resumption: they do not change the weights
# (train.epochs may grow, with ``extend``)
RESUME_FREE = ("train.output_dir", "train.log_every", "train.checkpoint_every", "train.eval_every_epochs",
               "train.log_private_norms",  # its log.csv columns are checked apart (_check_norm_columns)
               "data.num_workers", "data.val_images", "data.val_annotations", "test")
LOSS_TERMS = ("loss_cls", "loss_l1", "loss_giou")


def schedule(cfg: DetectorConfig, steps_per_epoch: int) -> Schedule:
    """Linear warm-up from ``warmup_ratio``, then the rate times ``lr_gamma`` at each epoch of
    ``lr_steps``."""
    t = cfg.train
    return Schedule(lr=t.lr, total_steps=t.epochs * steps_per_epoch, warmup_steps=t.warmup_iters,
                    warmup_start=t.warmup_ratio, decay="step", gamma=t.lr_gamma,
                    milestones=tuple(e * steps_per_epoch for e in t.lr_steps))


def build_optimizer(cfg: DetectorConfig, model: torch.nn.Module) -> torch.optim.AdamW:
    """The paper's AdamW over the trainable parameters, every tensor decayed (`lors.engine.loop.adamw`).
    With ``train.shared_lr_scale``, ``train.private_lr_scale`` or ``train.private_weight_decay``
    set, LORS's shared and private tensors (`lors_parameter_roles`) get groups of their own."""
    t = cfg.train
    if not t.lors_groups():
        return adamw(model, t.lr, t.weight_decay, decay="all")
    roles = lors_parameter_roles(model.decoder.mixing)
    if not roles["private"]:
        raise ValueError("train.shared_lr_scale, train.private_lr_scale and train.private_weight_decay set the "
                         "rates of LORS's tensors, and this config has none (lors.adaptive and lors.static are "
                         "off): leave them at 1.0, 1.0 and null, or use a LORS config")
    own = {id(p) for ps in roles.values() for p in ps}
    decay = t.weight_decay if t.private_weight_decay is None else t.private_weight_decay
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in own], "lr": t.lr},
              {"params": [p for p in roles["shared"] if p.requires_grad], "lr": t.lr * t.shared_lr_scale},
              {"params": [p for p in roles["private"] if p.requires_grad], "lr": t.lr * t.private_lr_scale,
               "weight_decay": decay}]
    return adamw(model, t.lr, t.weight_decay, groups=[g for g in groups if g["params"]])


def detection_loss(criterion, dev: torch.device):
    """The training loss of a collated batch: ``loss_fn(model, batch) -> (total, terms)``, the
    terms (LOSS_TERMS) each the mean over the supervised stages, as the loop logs them."""
    def loss_fn(model, batch):
        images, sizes, targets = to_device(*batch, dev)
        outputs = model(images, sizes)
        losses = criterion(outputs, targets)
        n = len(outputs["stages"])
        terms = {k: sum(v.item() for key, v in losses.items() if key.startswith(k + "_")) / n for k in LOSS_TERMS}
        return criterion.total(losses), terms
    return loss_fn


def with_norms(loss_fn, mixing: torch.nn.Module, every: int):
    """``loss_fn`` over (global step, batch) pairs whose terms also hold `lors_norms(mixing)`
    of the weights the step starts from, on each step whose log row is a multiple of ``every``
    (``train.log_every``, when TensorBoard gets them too) and NaN on the others (measuring costs
    a few milliseconds). The norms read the weights without gradient: the loss, its gradients
    and the weights are the same as without them. Returns the wrapped loss and the names."""
    names = list(lors_norms(mixing))

    def loss_with_norms(model, item):
        step, batch = item
        loss, terms = loss_fn(model, batch)
        norms = lors_norms(mixing) if (step + 1) % every == 0 else dict.fromkeys(names, math.nan)
        return loss, {**terms, **norms}
    return loss_with_norms, names


def _check_norm_columns(run_dir, log_norms: bool) -> None:
    """A resumed run keeps the log.csv columns it started with: refuse to resume a run whose
    ``train.log_private_norms`` differs (runs from before the key existed had it off)."""
    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        return
    try:
        started = bool(read_state(ckpt).get("config", {}).get("train", {}).get("log_private_norms", False))
    except ValueError:  # an unreadable checkpoint: the engine reports it and tries an earlier one
        return
    if started != log_norms:
        raise ValueError(f"{run_dir} holds a run started with train.log_private_norms={str(started).lower()}, "
                         "and its log.csv keeps the columns it started with: resume it with "
                         f"train.log_private_norms={str(started).lower()}, or pass --no-resume to start afresh")


def train(cfg: DetectorConfig, run_dir=None, resume: bool = True, stop_after: int | None = None,
          device: str | None = None, progress: bool = True, evaluate_at_end: bool = True,
          extend: bool = False) -> dict:
    """Train ``cfg``'s detector; returns a summary (steps, seconds per step, peak memory, AP...).

    Args:
        run_dir: where checkpoints and logs go (default ``cfg.train.output_dir``). It is locked
            while training: a second trainer into it is refused.
        resume: continue from ``run_dir``'s last checkpoint if there is one (refused if ``cfg``
            differs from the run's config where the weights depend on it). Otherwise, or if
            there is none, a fresh start sets the earlier run's files aside and deletes them
            once the new run has saved its first checkpoint.
        stop_after: end after this global step (checkpointing there), as an interruption would.
        device: "cpu", "cuda:0", ... (default: the GPU of this process if any, else CPU).
        evaluate_at_end: score the val split with COCOeval once the schedule is done (and
            every ``train.eval_every_epochs`` epochs, if set, which needs it).
        extend: allow resuming a run with more ``train.epochs`` than it was started with.
    """
    cfg.validate()  # a config built in Python has not been through the loader's checks
    t = cfg.train
    if t.eval_every_epochs and not evaluate_at_end:
        raise ValueError(f"train.eval_every_epochs={t.eval_every_epochs} evaluates on val during training, but "
                         "evaluation is off (--no-eval): drop --no-eval or set train.eval_every_epochs=0")
    run_dir = run_dir or t.output_dir
    if resume:
        _check_norm_columns(run_dir, t.log_private_norms)
    rank, world, dev, per_process = distributed.setup(device, t.batch_size)
    train_set, val_set = build_datasets(cfg, val=evaluate_at_end and rank == 0)
    torch.manual_seed(t.seed)
    model = build_detector(cfg).to(dev)
    loss_fn, norm_names = detection_loss(build_criterion(cfg), dev), []
    if t.log_private_norms:
        loss_fn, norm_names = with_norms(loss_fn, model.decoder.mixing, t.log_every)
    optimizer = build_optimizer(cfg, model)
    items = SeededItems(train_set, t.seed)
    sampler = EpochSampler(len(train_set), per_process, t.seed, rank, world)

    def epoch_batches(epoch: int, start: int):
        sampler.set_epoch(epoch, start)
        items.epoch = epoch
        loader = DataLoader(items, batch_size=per_process, sampler=sampler,
                            collate_fn=partial(collate_fn, stride=cfg.data.size_divisor),
                            num_workers=cfg.data.num_workers, drop_last=True)
        return enumerate(loader, epoch * sampler.steps + start) if t.log_private_norms else loader

    settings = RunSettings(
        run_dir=run_dir, config=to_dict(cfg), defaults=to_dict(type(cfg)()), resume_free=RESUME_FREE,
        length_key="train.epochs", log_terms=(*LOSS_TERMS, *norm_names), checkpoint_every=t.checkpoint_every,
        log_every=t.log_every, eval_every=t.eval_every_epochs * sampler.steps, clip_grad=t.clip_grad, amp=t.amp,
        resume=resume, extend=extend, stop_after=stop_after, progress=progress,
        state={"class_names": train_set.class_names, "label_to_cat_id": train_set.label_to_cat_id},
        fail_hint=RETRY_HINT + "; check the data for broken boxes")

    def evaluate_val() -> dict[str, float]:
        # the RNG is put back afterwards (the loader draws a seed from it): evaluating changes no later step
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            return evaluate(model, val_set, cfg, dev, progress=progress)

    return fit(model, loss_fn, epoch_batches, sampler.steps, optimizer, schedule(cfg, sampler.steps),
               settings, rank, world, evaluate=evaluate_val if val_set is not None else None)
