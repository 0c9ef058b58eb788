"""The training loop of every experiment, and the run around it.

`train_one_epoch` is the loop: a function of built objects (model, loss, batches, optimiser,
schedule) that steps until the batches or the step budget end. `fit` is what every trainer
needs around it, so each experiment only builds its objects:

- the run directory is locked, and a fresh start sets an earlier run aside until the new
  one has saved its first checkpoint (`lors.engine.rundir`);
- ``resume``: the newest readable checkpoint is loaded (model, optimiser, RNG) after checking
  that the requested config may continue it; the batches of a step are a function of (seed,
  epoch, step) (`lors.engine.sampler`) and the rate one of the step (`lors.engine.schedule`),
  so a resumed run reproduces the uninterrupted one;
- DDP or FSDP2 (``parallel="fsdp"``: each layer of the stack, then the root) under torchrun,
  checkpoints gathered into the single-process format either way; autocast (bf16 / fp16 with a gradient scaler), gradient clipping;
- a NaN or infinite loss stops the run with the last checkpoint intact;
- ``log.csv`` (one row per step, flushed every ``log_every``) and TensorBoard scalars;
- atomic checkpoints every ``checkpoint_every`` steps and at the end; Ctrl-C names the
  checkpoint a rerun resumes from.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from lors.engine import distributed
from lors.engine.checkpoint import checkpoints, find_checkpoint, load_checkpoint, read_state, save_checkpoint
from lors.engine.memory import PeakMemory
from lors.engine.rundir import RunLock, config_differences, describe, drop_set_aside, set_aside
from lors.engine.schedule import Schedule

# loss_fn(model, batch) -> (total loss to minimise, {name: float} logged beside it)
LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, float]]"]


# what to do after a NaN loss: a resumed run keeps its settings, so a lower rate means a new run
RETRY_HINT = ("Rerun with a lower train.lr (and train.clip_grad on) and --no-resume, or into another "
              "--run-dir: a resumed run keeps the settings it started with")
SCALER = "grad_scaler"  # state.json entry: the fp16 gradient scaler's state (loss scale, growth tracker)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint is left as it was."""


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``amp`` ("auto", "bf16", "fp16", "fp32") -> the autocast dtype, None for float32.
    "auto": bf16 on GPU, float32 on CPU (where bf16 is slow without bf16 units)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        warnings.warn("bf16 autocast on a CPU without bfloat16 instructions (this one has "
                      f"{torch.backends.cpu.get_cpu_capability()}): each matmul is emulated and a step is several "
                      "times slower than float32; set amp to fp32 on this CPU", stacklevel=2)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp]


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (oneDNN's check: AVX-512 or newer); on an
    AVX2-only processor a bfloat16 matmul is emulated, several times slower than a float32 one."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``with evaluating(model):`` runs its block in eval mode and then gives ``model`` back the
    mode it had (also when the block raises): the one save-and-restore of train/eval mode around
    an evaluation. The mode is restored as ``model.train(was_training)`` restores it, through
    each module's own ``train`` (so a backbone that keeps frozen batch norms in eval mode keeps
    them there)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


DECAY_RULES = ("weights", "all")


def adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
          decay: str = "weights", groups: Sequence[dict] | None = None, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters: the one builder of every training here.

    ``decay`` says which tensors get ``weight_decay``: "weights" (the transformers' rule) decays
    weights only, so biases (also a LORS stack's per-layer bias rows, which are 2-D) and other
    1-D tensors (norms) get none; "all" decays every tensor (the detector and its backbone, as
    the AdaMixer authors' optimiser config). ``groups``: parameter groups given by the caller
    instead (each with its own ``lr``; fine-tuning's head and LoRA+ rates, the detector's LORS
    tensors), ``weight_decay`` for those without one of their own. ``fused``: the fused kernel on CPU and CUDA (one pass over all tensors);
    False keeps torch's per-tensor default, with which fine-tuning's and backbone pretraining's
    published figures were made."""
    if decay not in DECAY_RULES:
        raise ValueError(f"decay must be one of {DECAY_RULES}, got {decay!r}")
    if groups is None:
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if decay == "all":
            groups = [{"params": [p for _, p in trainable], "weight_decay": weight_decay}]
        else:
            skip = [p.dim() < 2 or name.endswith("bias") for name, p in trainable]
            groups = [{"params": [p for (_, p), s in zip(trainable, skip) if not s], "weight_decay": weight_decay},
                      {"params": [p for (_, p), s in zip(trainable, skip) if s], "weight_decay": 0.0}]
    device = next(model.parameters()).device
    return torch.optim.AdamW(list(groups), lr=lr, betas=betas, weight_decay=weight_decay,
                             fused=device.type in ("cpu", "cuda") if fused else None)


def train_one_epoch(model: nn.Module, loss_fn: LossFn, batches: Iterable, optimizer: torch.optim.Optimizer,
                    schedule: Schedule, step: int, last: int, *, dtype: torch.dtype | None = None,
                    scaler: torch.amp.GradScaler | None = None, clip_grad: float = 0.0,
                    on_step: Callable[[int, float, dict, float, float], None] | None = None) -> int:
    """Train on ``batches`` from global step ``step`` until they end or step ``last`` is done;
    returns the global step reached. ``on_step(step, loss, terms, lr, seconds)`` follows each
    step (logging, checkpoints). Raises NonFiniteLossError before a bad step is taken."""
    device = next(model.parameters()).device
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    for batch in batches:
        tic = time.perf_counter()
        lr = schedule.scale_groups(optimizer, step)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, terms = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        if on_step is not None:
            on_step(step, loss.item(), terms, lr, time.perf_counter() - tic)
        if step >= last:
            break
    return step


@dataclass
class RunSettings:
    """How `fit` runs and records a training run (none of it changes the weights but ``amp``
    and ``clip_grad``, which belong to the experiment's config)."""

    run_dir: Path
    config: Mapping[str, Any]  # the experiment's config as a dict: stored, and compared on resume
    resume_free: Sequence[str] = ()  # dotted config keys that may differ when resuming
    length_key: str = "train.epochs"  # the config key of the schedule's length (--extend grows it)
    log_terms: Sequence[str] = ()  # the names of the loss terms that loss_fn returns, in order
    checkpoint_every: int = 1000
    log_every: int = 20
    eval_every: int = 0  # with fit's ``evaluate``: also every this many steps, to val.csv (0: at the end only)
    eval_steps: Sequence[int] = ()  # with fit's ``evaluate``: also after each of these steps, to val.csv
    clip_grad: float = 0.0
    amp: str = "auto"
    state: dict = field(default_factory=dict)  # stored with every checkpoint (class names, ...)
    resume: bool = True
    extend: bool = False
    stop_after: int | None = None
    progress: bool = True
    fail_hint: str = "lower the learning rate or check the data, then resume"
    dir_flag: str = "--run-dir"  # the command's flag for the run's folder, for the messages
    can_extend: bool = True      # whether the command has --extend
    key_names: Mapping[str, str] = field(default_factory=dict)  # config key -> the flag that sets it
    defaults: Mapping[str, Any] = field(default_factory=dict)  # the config type's defaults: a key that a run
    # saved before the key existed lacks compares as its default (`config_differences`)
    parallel: str = "ddp"  # under torchrun: "ddp" (a replica per process) or "fsdp" (FSDP2, sharded)


def _dotted(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def check_resumable(stored: Mapping[str, Any], requested: Mapping[str, Any], ckpt: Path,
                    free: Sequence[str] = (), extend: bool = False, length_key: str = "train.epochs",
                    dir_flag: str = "--run-dir", can_extend: bool = True,
                    key_names: Mapping[str, str] | None = None, defaults: Mapping[str, Any] | None = None) -> None:
    """Refuse to resume the run of checkpoint ``ckpt`` (config ``stored``) with the
    ``requested`` config if a setting that shapes the weights differs (keys in ``free`` may),
    or if the schedule's length (``length_key``) changes unasked. The messages name the
    command's own flags (``dir_flag``, ``--extend`` where ``can_extend``, ``key_names``). Keys
    that ``stored`` lacks (added since the run was saved) compare as their ``defaults``."""
    run_dir = ckpt.parent
    requested = json.loads(json.dumps(requested))
    diffs = config_differences(stored, requested, (*free, length_key), defaults)
    if diffs:
        raise ValueError(f"{run_dir} holds a run with other settings ({describe(diffs, key_names)}): rerun "
                         "with the run's settings to resume it, pass --no-resume to replace it, or train "
                         f"into another {dir_flag}")
    before, now = _dotted(stored, length_key), _dotted(requested, length_key)
    if before != now and not (extend and before is not None and now > before):
        shown = (key_names or {}).get(length_key, length_key)
        if before is not None and now > before:
            hint = f"pass --extend to continue it to {now}, " if can_extend else ""
        else:
            hint = f"a run cannot be shortened: use {shown}={before}, "
        raise ValueError(f"{run_dir} holds a run of {shown}={before}, not {now}: {hint}"
                         f"--no-resume to replace it, or another {dir_flag}")


def resume_from(run_dir: Path, settings: RunSettings, model: nn.Module,
                optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> int:
    """Load the newest readable checkpoint of ``run_dir`` (model, optimiser, RNG and, for fp16,
    the gradient scaler's loss scale) after checking that ``settings.config`` may continue it;
    returns its step, 0 if there is none.

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
        check_resumable(state.get("config", {}), settings.config, ckpt, settings.resume_free,
                        settings.extend, settings.length_key, settings.dir_flag, settings.can_extend,
                        settings.key_names, settings.defaults)
        try:
            state = load_checkpoint(ckpt, model, optimizer, restore_rng=True)
            if scaler is not None and scaler.is_enabled() and state.get(SCALER):
                scaler.load_state_dict(state[SCALER])
            return state["step"]
        except (ValueError, OSError, RuntimeError) as err:
            print(f"warning: checkpoint {ckpt} is unreadable ({err}); trying an earlier one", flush=True)
    if order:
        raise ValueError(f"{run_dir} holds checkpoints but none is readable: pass --no-resume to start "
                         f"over (the old files are kept in {run_dir}/.previous_run until the new run "
                         "saves its first checkpoint)")
    return 0


class RunLog:
    """``log.csv`` (step, epoch, lr, loss, the loss terms, seconds) and TensorBoard scalars of
    the main process. A resumed run drops rows after its checkpoint and appends."""

    def __init__(self, run_dir: Path, terms: Sequence[str], step: int, log_every: int):
        self.path, self.log_every = run_dir / "log.csv", log_every
        self.val_path = run_dir / "val.csv"
        _trim_log(self.path, step)
        _trim_log(self.val_path, step)
        if step == 0:
            self.val_path.unlink(missing_ok=True)
        self.file = self.path.open("a" if step else "w", newline="")  # a fresh start replaces the log
        self.csv = csv.writer(self.file)
        if step == 0:
            self.csv.writerow(["step", "epoch", "lr", "loss", *terms, "seconds"])
        self.tb = _tensorboard(run_dir)

    def step(self, step: int, epoch: int, lr: float, loss: float, terms: Mapping[str, float],
             seconds: float) -> None:
        self.csv.writerow([step, epoch, f"{lr:.6g}", f"{loss:.6f}", *(f"{v:.6f}" for v in terms.values()),
                           f"{seconds:.4f}"])
        if step % self.log_every == 0:
            self.file.flush()  # a user (or a sweep's progress bar) can follow the run
            self.scalars("train", {"loss": loss, "lr": lr, **terms}, step)

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def val(self, step: int, metrics: Mapping[str, float]) -> None:
        """A row of ``val.csv`` (step, then the metrics) and val/ scalars in TensorBoard; a step
        evaluated again (a finished run rerun) replaces its row."""
        _trim_log(self.val_path, step - 1)
        new = not self.val_path.exists()
        with self.val_path.open("a", newline="") as f:
            if new:
                csv.writer(f).writerow(["step", *metrics])
            csv.writer(f).writerow([step, *(f"{v:.6g}" for v in metrics.values())])
        self.scalars("val", metrics, step)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _trim_log(path: Path, step: int) -> None:
    """Drop log rows after ``step`` (written after the checkpoint a resumed run starts from)."""
    if not path.exists():
        return
    with path.open() as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if int(r[0]) <= step]
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(kept)


def read_val(path: Path, missing_ok: bool = True) -> list[dict[str, float]]:
    """The evaluations in a run's ``val.csv`` (``RunLog.val``'s rows) at ``path``, by step, as
    ``{"step": int, metric: float, ...}``: one per step, the last row of a step winning (a
    finished run rerun, before `RunLog.val` replaced such rows, appended its final one again).
    A missing file gives no rows, or FileNotFoundError unless ``missing_ok``."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    with path.open(newline="") as f:
        by_step = {int(r["step"]): {k: float(v) for k, v in r.items() if k != "step"} for r in csv.DictReader(f)}
    return [{"step": step, **metrics} for step, metrics in sorted(by_step.items())]


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; the CSV log is always written
        return None
    return SummaryWriter(str(run_dir / "tb"))


def fit(model: nn.Module, loss_fn: LossFn, epoch_batches: Callable[[int, int], Iterable],
        steps_per_epoch: int, optimizer: torch.optim.Optimizer, schedule: Schedule,
        settings: RunSettings, rank: int = 0, world: int = 1,
        evaluate: Callable[[], dict[str, float]] | None = None) -> dict:
    """Train ``model`` to ``schedule.total_steps`` (or ``settings.stop_after``) in
    ``settings.run_dir``; returns a summary (steps, total_steps, run_dir, seconds_per_step,
    peak_memory_mb).

    ``epoch_batches(epoch, start_step)`` gives this process's batches of an epoch from its
    ``start_step``-th on; ``loss_fn(model, batch)`` moves a batch to the model's device and
    returns (loss, terms). ``evaluate()``, if given, runs in the main process once the whole
    schedule is trained; its metrics go to the summary's ``metrics`` and to TensorBoard.
    Call `fit` in every process of a torchrun job.
    """
    run_dir = Path(settings.run_dir)
    try:
        with RunLock(run_dir) if rank == 0 else contextlib.nullcontext():
            return _fit(model, loss_fn, epoch_batches, steps_per_epoch, optimizer, schedule, settings,
                        rank, world, run_dir, evaluate)
    except KeyboardInterrupt:
        if rank == 0:
            ckpt = find_checkpoint(run_dir)
            print(f"\ninterrupted: {ckpt} is intact, rerun the same command to resume from it" if ckpt
                  else f"\ninterrupted before the first checkpoint of {run_dir}", file=sys.stderr, flush=True)
        raise


def _fit(model, loss_fn, epoch_batches, steps_per_epoch, optimizer, schedule, s: RunSettings,
         rank, world, run_dir: Path, evaluate) -> dict:
    main = rank == 0
    if s.parallel not in distributed.PARALLELS:  # before any checkpoint is read
        raise ValueError(f"parallel must be one of {distributed.PARALLELS}, got {s.parallel!r}")
    dev = next(model.parameters()).device
    bases = [group["lr"] for group in optimizer.param_groups]  # the rates the optimiser was built with
    dtype = autocast_dtype(s.amp, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    step = resume_from(run_dir, s, model, optimizer, scaler) if s.resume else 0
    for group, base in zip(optimizer.param_groups, bases):  # the schedule scales these, even after a resume
        group["base_lr"] = base
    distributed.barrier()
    sharded = world > 1 and s.parallel == "fsdp"
    if sharded:  # every process runs each forward (evaluation too) and gathers each checkpoint
        distributed.shard(model, optimizer)
        ddp = model
    else:
        ddp = DistributedDataParallel(model) if world > 1 else model
    total = schedule.total_steps
    last = min(total, s.stop_after) if s.stop_after is not None else total
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
        (run_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(s.config)), sort_keys=False))
    log = RunLog(run_dir, s.log_terms, step, s.log_every) if main else None
    bar = tqdm(total=last, initial=step, desc="train", disable=not (s.progress and main), dynamic_ncols=True)
    step_times: list[float] = []
    epoch = step // steps_per_epoch

    def on_step(now: int, loss: float, terms: dict, lr: float, seconds: float) -> None:
        nonlocal set_aside_dir
        step_times.append(seconds)
        if main:
            log.step(now, epoch, lr, loss, terms, seconds)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        if (main or sharded) and evaluate is not None and now < total \
                and (s.eval_every and now % s.eval_every == 0 or now in s.eval_steps):
            metrics = evaluate()  # the final evaluation comes after the loop
            if main:
                log.val(now, metrics)
        if now % s.checkpoint_every == 0 or now == last:
            full = distributed.full_state(model, optimizer) if sharded else None
            if main:
                log.flush()
                extra = {SCALER: scaler.state_dict()} if scaler.is_enabled() else {}
                save_checkpoint(run_dir, now, model, optimizer, {**s.state, "config": dict(s.config),
                                                                  "epoch": epoch, **extra}, full)
                if set_aside_dir is not None:
                    drop_set_aside(run_dir)
                    set_aside_dir = None
            distributed.barrier()

    ddp.train()
    try:  # the log and TensorBoard files are closed however the run ends
        with PeakMemory(dev) as memory:
            while step < last:
                epoch, offset = divmod(step, steps_per_epoch)
                try:
                    step = train_one_epoch(ddp, loss_fn, epoch_batches(epoch, offset), optimizer, schedule,
                                           step, last, dtype=dtype, scaler=scaler, clip_grad=s.clip_grad,
                                           on_step=on_step)
                except NonFiniteLossError as err:
                    raise NonFiniteLossError(f"{err} (epoch {epoch}); the last checkpoint in {run_dir} is "
                                             f"intact. {s.fail_hint}") from None
        bar.close()
        summary = {"steps": step, "total_steps": total, "run_dir": str(run_dir),
                   "seconds_per_step": statistics.median(step_times[1:] or step_times) if step_times else math.nan,
                   "peak_memory_mb": memory.peak_mib}
        if (main or sharded) and evaluate is not None and step == total:
            summary["metrics"] = evaluate()
            if main:
                log.val(step, summary["metrics"])
    finally:
        bar.close()
        if main:
            log.close()
    distributed.barrier()
    return summary
