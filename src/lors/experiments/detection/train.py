"""Training and evaluation of the detector on COCO-format data.

``train(cfg)`` runs the paper's recipe (AdamW, linear warm-up, step decay, gradient clipping,
every stage supervised), single-process or under torchrun, logging to CSV and TensorBoard and
checkpointing atomically. A run resumes exactly: the learning rate is a function of the step,
the sampler's order a function of (seed, epoch), each image's random augmentation a function
of (seed, epoch, index), and the RNG state is stored in every checkpoint.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from lors.config import load_config, save_config, to_dict
from lors.data.coco import CocoDetection, collate_fn, count_crowded_images
from lors.data.transforms import make_coco_transforms
from lors.engine import distributed
from lors.engine.checkpoint import checkpoints, find_checkpoint, load_checkpoint, read_state, save_checkpoint
from lors.engine.rundir import RunLock, config_differences, describe, drop_set_aside, set_aside
from lors.experiments.detection.evaluate import coco_evaluate
from lors.models.adamixer import DetectorConfig, PostProcess, build_criterion, build_detector


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint is left as it was."""


class EpochSampler(Sampler[int]):
    """This process's share of a permutation drawn from (seed, epoch), from ``start`` on.

    Every process takes every ``world``-th index of the same permutation (trimmed to a
    multiple of ``world * batch``, so all processes run the same number of steps).
    """

    def __init__(self, size: int, batch: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.batch, self.seed, self.rank, self.world = size, batch, seed, rank, world
        self.epoch, self.start = 0, 0
        self.steps = size // (batch * world)
        if size == 0:
            raise ValueError("the training set has no images: check data.train_annotations and "
                             "data.train_images")
        if self.steps == 0:
            raise ValueError(f"the data set has {size} images, fewer than one global batch of "
                             f"{batch * world}: lower train.batch_size")

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        order = torch.randperm(self.size, generator=g)[: self.steps * self.batch * self.world]
        mine = order[self.rank:: self.world]
        return iter(mine[self.start * self.batch:].tolist())

    def __len__(self) -> int:
        return (self.steps - self.start) * self.batch


class SeededItems(Dataset):
    """Wraps a data set so item ``i`` of epoch ``e`` is augmented with RNG seed (seed, e, i),
    whichever process or worker loads it, without touching the caller's RNG."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1000003 + self.epoch) * 1000003 + index)
            return self.dataset[index]


def learning_rate(step: int, cfg: DetectorConfig, steps_per_epoch: int) -> float:
    """Linear warm-up, then the learning rate times ``lr_gamma`` at each epoch in ``lr_steps``."""
    t = cfg.train
    lr = t.lr * t.lr_gamma ** sum(step >= e * steps_per_epoch for e in t.lr_steps)
    if step < t.warmup_iters:
        lr *= t.warmup_ratio + (1 - t.warmup_ratio) * step / t.warmup_iters
    return lr


def autocast_dtype(cfg: DetectorConfig, device: torch.device) -> torch.dtype | None:
    """bf16 on GPU by default; float32 (None) on CPU, where bf16 is slow without bf16 units."""
    amp = cfg.train.amp
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp]


def build_datasets(cfg: DetectorConfig, train: bool = True, val: bool = True):
    """(train, val) CocoDetection data sets of ``cfg.data``; checks the class count."""
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


def to_device(images, sizes, targets, device):
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return images.to(device, non_blocking=True), sizes.to(device), targets


@torch.no_grad()
def evaluate(model: nn.Module, dataset: CocoDetection, cfg: DetectorConfig, device: torch.device,
             batch_size: int = 2, progress: bool = True, verbose: bool = True) -> dict[str, float]:
    """COCOeval AP, AP50, AP75, APs, APm, APl of ``model`` on ``dataset``."""
    model.eval()
    post = PostProcess(cfg.test.max_detections)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=partial(collate_fn, stride=cfg.data.size_divisor),
                        num_workers=cfg.data.num_workers)
    predictions, dtype = [], autocast_dtype(cfg, device)
    for images, sizes, targets in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        images, sizes, targets = to_device(images, sizes, targets, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outputs = model(images, sizes)
        orig = torch.stack([t["orig_size"] for t in targets])
        for t, det in zip(targets, post(outputs, sizes, orig)):
            predictions.append({"image_id": t["image_id"], **{k: v.float().cpu() for k, v in det.items()}})
    return coco_evaluate(dataset.coco, predictions, dataset.label_to_cat_id, verbose=verbose)


def run_config(path: str | Path, overrides=()) -> tuple[Path, DetectorConfig, dict]:
    """The checkpoint folder of ``path`` (a run directory or a ckpt_* folder), the
    DetectorConfig stored with it (plus ``overrides``) and its state.json."""
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise ValueError(f"{path} holds no checkpoint (no state.json or last.json): pass a run "
                         "directory written by `lors detect train` or one of its ckpt_* folders")
    state = read_state(ckpt)
    return ckpt, load_config(DetectorConfig, state["config"], overrides), state


def evaluate_checkpoint(ckpt: str | Path, cfg: DetectorConfig, device: torch.device,
                        progress: bool = True, verbose: bool = True) -> dict[str, float]:
    """COCOeval metrics of the model in checkpoint folder ``ckpt`` on ``cfg``'s val split."""
    model = build_detector(cfg).to(device)
    load_checkpoint(ckpt, model)
    _, val_set = build_datasets(cfg, train=False)
    return evaluate(model, val_set, cfg, device, progress=progress, verbose=verbose)


def _trim_log(path: Path, step: int) -> None:
    """Drop log rows after ``step`` (written after the checkpoint a resumed run starts from)."""
    if not path.exists():
        return
    with path.open() as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if int(r[0]) <= step]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(kept)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; the CSV log is always written
        return None
    return SummaryWriter(str(run_dir / "tb"))


# config keys that may change between a run and its resumption: they do not change the weights
# (train.epochs may grow, with ``extend``)
RESUME_FREE = ("train.output_dir", "train.log_every", "train.checkpoint_every", "train.epochs",
               "data.num_workers", "data.val_images", "data.val_annotations", "test")


def check_resumable(stored: dict, cfg: DetectorConfig, ckpt: Path, extend: bool = False) -> None:
    """Refuse to resume the run of checkpoint ``ckpt`` (config ``stored``) with ``cfg`` if a
    setting that shapes the weights differs, or if the schedule changes unasked."""
    run_dir = ckpt.parent
    requested = json.loads(json.dumps(to_dict(cfg)))
    diffs = config_differences(stored, requested, RESUME_FREE)
    if diffs:
        raise ValueError(f"{run_dir} holds a run with other settings ({describe(diffs)}): rerun with "
                         "the run's settings to resume it, pass --no-resume to replace it, or train "
                         "into another --run-dir")
    before, now = stored.get("train", {}).get("epochs"), cfg.train.epochs
    if before != now and not (extend and before is not None and now > before):
        hint = (f"pass --extend to continue it to {now} epochs" if before is not None and now > before
                else f"a run cannot be shortened: use train.epochs={before}")
        raise ValueError(f"{run_dir} holds a run of train.epochs={before}, not {now}: {hint}, "
                         "--no-resume to replace it, or another --run-dir")


def resume_from(run_dir: Path, cfg: DetectorConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                extend: bool = False) -> int:
    """Load the newest readable checkpoint of ``run_dir`` (model, optimizer, RNG) after
    checking that ``cfg`` may continue it; returns its step, 0 if the directory holds none.

    An unreadable newest checkpoint (a truncated file) is reported and the previous one used.
    """
    newest = find_checkpoint(run_dir)
    order = ([newest] if newest else []) + [c for c in checkpoints(run_dir) if c != newest]
    for ckpt in order:
        try:
            state = read_state(ckpt)
        except ValueError as err:
            print(f"warning: {err}; trying an earlier checkpoint", flush=True)
            continue
        check_resumable(state.get("config", {}), cfg, ckpt, extend)
        try:
            return load_checkpoint(ckpt, model, optimizer, restore_rng=True)["step"]
        except (ValueError, OSError, RuntimeError) as err:
            print(f"warning: checkpoint {ckpt} is unreadable ({err}); trying an earlier one", flush=True)
    if order:
        raise ValueError(f"{run_dir} holds checkpoints but none is readable: pass --no-resume to start "
                         f"over (the old files are kept in {run_dir}/.previous_run until the new run "
                         "saves its first checkpoint)")
    return 0


def train(cfg: DetectorConfig, run_dir: str | Path | None = None, resume: bool = True,
          stop_after: int | None = None, device: str | None = None, progress: bool = True,
          evaluate_at_end: bool = True, extend: bool = False) -> dict:
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
        extend: allow resuming a run with more ``train.epochs`` than it was started with.
    """
    cfg.validate()  # a config built in Python has not been through the loader's checks
    rank, world, dev = distributed.init_distributed(device)
    run_dir = Path(run_dir or cfg.train.output_dir)
    try:
        with RunLock(run_dir) if rank == 0 else contextlib.nullcontext():
            return _train(cfg, run_dir, rank, world, dev, resume, stop_after, progress, evaluate_at_end, extend)
    except KeyboardInterrupt:
        if rank == 0:
            ckpt = find_checkpoint(run_dir)
            print(f"\ninterrupted: {ckpt} is intact, rerun the same command to resume from it" if ckpt
                  else f"\ninterrupted before the first checkpoint of {run_dir}", file=sys.stderr, flush=True)
        raise


def _train(cfg: DetectorConfig, run_dir: Path, rank: int, world: int, dev: torch.device, resume: bool,
           stop_after: int | None, progress: bool, evaluate_at_end: bool, extend: bool) -> dict:
    t = cfg.train
    main = rank == 0
    if t.batch_size % world:
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by the {world} "
                         "processes: make it a multiple of the process count")
    per_process = t.batch_size // world
    train_set, val_set = build_datasets(cfg, val=evaluate_at_end and main)
    torch.manual_seed(t.seed)
    model = build_detector(cfg).to(dev)
    criterion = build_criterion(cfg)
    # the fused kernel updates all tensors in one pass (CPU and GPU); the default loops per tensor
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr,
                                  weight_decay=t.weight_decay, fused=dev.type in ("cpu", "cuda"))
    step = resume_from(run_dir, cfg, model, optimizer, extend) if resume else 0
    distributed.barrier()
    ddp = DistributedDataParallel(model) if world > 1 else model
    items = SeededItems(train_set, t.seed)
    sampler = EpochSampler(len(train_set), per_process, t.seed, rank, world)
    total = t.epochs * sampler.steps
    last = min(total, stop_after) if stop_after is not None else total
    set_aside_dir = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if step == 0:  # a fresh start must not resume the old run after a crash, nor delete it yet
            set_aside_dir = set_aside(run_dir)
            if set_aside_dir is not None:
                print(f"fresh start in {run_dir}: the earlier run's files are kept in {set_aside_dir} "
                      "until this run saves its first checkpoint", flush=True)
        elif step >= last:
            print(f"{run_dir} is already trained to step {step}: nothing to train; --no-resume "
                  "trains it again", flush=True)
        save_config(cfg, run_dir / "config.yaml")
        _trim_log(run_dir / "log.csv", step)
    # a fresh start (step 0) replaces any earlier log; a resumed run appends to the trimmed one
    log_file = (run_dir / "log.csv").open("a" if step else "w", newline="") if main else None
    log = csv.writer(log_file) if main else None
    if main and step == 0:
        log.writerow(["step", "epoch", "lr", "loss", "loss_cls", "loss_l1", "loss_giou", "seconds"])
    writer = _tensorboard(run_dir) if main else None
    dtype = autocast_dtype(cfg, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    state = {"config": to_dict(cfg), "class_names": train_set.class_names,
             "label_to_cat_id": train_set.label_to_cat_id}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    bar = tqdm(total=last, initial=step, desc="train", disable=not (progress and main), dynamic_ncols=True)
    step_times = []
    ddp.train()
    while step < last:
        epoch, offset = divmod(step, sampler.steps)
        sampler.set_epoch(epoch, offset)
        items.epoch = epoch
        loader = DataLoader(items, batch_size=per_process, sampler=sampler,
                            collate_fn=partial(collate_fn, stride=cfg.data.size_divisor),
                            num_workers=cfg.data.num_workers, drop_last=True)
        for images, sizes, targets in loader:
            tic = time.perf_counter()
            images, sizes, targets = to_device(images, sizes, targets, dev)
            lr = learning_rate(step, cfg, sampler.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                outputs = ddp(images, sizes)
                losses = criterion(outputs, targets)
                loss = criterion.total(losses)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at step {step} (epoch {epoch}); the last checkpoint in "
                    f"{run_dir} is intact. Lower train.lr, keep train.clip_grad on, or check the "
                    "data for broken boxes, then resume")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t.clip_grad > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            step_times.append(time.perf_counter() - tic)
            if main:
                n = len(outputs["stages"])
                terms = {k: sum(v.item() for key, v in losses.items() if key.startswith(k + "_")) / n
                         for k in ("loss_cls", "loss_l1", "loss_giou")}
                log.writerow([step, epoch, f"{lr:.6g}", f"{loss.item():.6f}",
                              *(f"{v:.6f}" for v in terms.values()), f"{step_times[-1]:.4f}"])
                if step % t.log_every == 0:
                    log_file.flush()  # a user (or `compare`'s progress bar) can follow the run
                if writer is not None and step % t.log_every == 0:
                    writer.add_scalar("train/loss", loss.item(), step)
                    writer.add_scalar("train/lr", lr, step)
                    for k, v in terms.items():
                        writer.add_scalar(f"train/{k}", v, step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
            if step % t.checkpoint_every == 0 or step == last:
                if main:
                    log_file.flush()
                    save_checkpoint(run_dir, step, model, optimizer, {**state, "epoch": epoch})
                    if set_aside_dir is not None:
                        drop_set_aside(run_dir)
                        set_aside_dir = None
                distributed.barrier()
            if step >= last:
                break
    bar.close()
    summary = {"steps": step, "total_steps": total, "run_dir": str(run_dir),
               "seconds_per_step": statistics.median(step_times[1:] or step_times) if step_times else math.nan,
               "peak_memory_mb": peak_memory_mb(dev)}
    if main:
        log_file.close()
        if evaluate_at_end and step == total:
            summary["metrics"] = evaluate(model, val_set, cfg, dev, progress=progress)
            if writer is not None:
                for k, v in summary["metrics"].items():
                    writer.add_scalar(f"val/{k}", v, step)
        if writer is not None:
            writer.close()
    distributed.barrier()
    return summary


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or this process's peak resident memory on CPU.

    On Linux the CPU figure is ``VmHWM`` of /proc/self/status: unlike ``ru_maxrss``, which a
    child started by fork + exec inherits from its parent, it belongs to this program alone.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS

