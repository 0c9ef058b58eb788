"""One fine-tuning run of a pretrained text encoder for classification: full, PEFT LoRA or
Serial LoRA.

All three methods share the data, the seed, the number of steps, the batch order and the
classifier head (mean-pooled tokens -> Linear); only what is trainable differs:
  full         every encoder weight;
  lora         PEFT's own LoRA on query, key, value and the attention output projection;
  serial-lora  lors.adapters.serial_lora, one shared pair per attention block.

`finetune` trains with the engine's `fit` (`lors.engine.loop`) in a run folder: checkpoints
(model, optimiser, RNG) every ``checkpoint_every`` steps and at the end, ``log.csv``,
``config.yaml`` (the settings and a digest of the data, `run_config`); a NaN or infinite loss
stops the run (`NonFiniteLossError`). The batches of an epoch are a function of (seed, epoch)
(`epoch_order`) and the rate one of the step, so a run resumed from its checkpoint trains the
weights of the uninterrupted run. Once a run is finished, its result goes to ``result.json``
and its checkpoints are deleted (a full MiniLM checkpoint is about 270 MB); a later call with
the same folder and settings returns that result without training. Without a folder a run
trains in a temporary one, removed afterwards.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lors.adapters import serial_lora
from lors.data.text import TextSplit
from lors.engine.checkpoint import checkpoints, drop_checkpoints, read_state
from lors.engine.loop import NonFiniteLossError, RunSettings, adamw, evaluating, fit
from lors.engine.memory import PeakMemory
from lors.engine.rundir import config_differences, describe
from lors.engine.schedule import Schedule
from lors.models.pretrained import load_minilm

METHODS = ("full", "lora", "serial-lora")
LORA_TARGETS = ["query", "key", "value", "attention.output.dense"]  # q, k, v, o of a BERT layer
PRESET = "minilm_fortunes"
CHECKPOINT_EVERY = 50  # steps between a run's checkpoints (and one at its last step)
RESULT = "result.json"  # a finished run's config and result; its checkpoints are then deleted
RETRY = "Lower lr (or head_lr) and train again"
FAIL_HINT = (f"{RETRY}: lors finetune trains other settings in folders of their own under --runs; "
             "finetune() needs another run_dir or resume=False")


COUNTS = ("steps", "batch_size", "max_len")           # >= 1, in a run and in a sweep
RATES = ("alpha", "lr", "head_lr", "lora_plus_ratio")  # > 0 (a sweep may leave alpha and lr null)


@dataclass
class TrainingFields:
    """The training settings that a run (`FinetuneConfig`) and a sweep
    (`lors.experiments.finetune.sweep.FinetuneSweep`) share: a sweep hands them to each of its
    runs as they are (`training_fields`)."""

    lr: float | None = None
    head_lr: float = 1e-3
    lora_plus_ratio: float = 1.0  # > 1: LoRA+, B matrices learn this many times faster
    adapt_out: bool = False  # serial-lora only: a second pair on the attention output projection
    steps: int = 150
    batch_size: int = 16
    max_len: int = 64

    def check_training_fields(self, counts: Sequence[str] = ()) -> None:
        """The checks a run and a sweep share: steps, batch_size, max_len and ``counts`` at
        least 1, the rates positive (None: the default), the warm-up a fraction."""
        for name in (*COUNTS, *counts):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be at least 1")
        for name in RATES:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} {value} must be positive" + (" (or null for the default)"
                                                                       if name in ("alpha", "lr") else ""))
        warmup = getattr(self, "warmup", 0.0)
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup {warmup} is a fraction of the steps: use 0 <= warmup < 1, e.g. 0.1")


def training_fields(cfg: TrainingFields) -> dict:
    """The `TrainingFields` of ``cfg`` (a sweep) by name, for the runs it plans."""
    return {f.name: getattr(cfg, f.name) for f in fields(TrainingFields)}


@dataclass
class FinetuneConfig(TrainingFields):
    """One training run. lr=None picks 5e-5 for full fine-tuning and 1e-3 for the adapters."""

    method: str = "serial-lora"
    rank: int = 8
    alpha: float = 16.0
    warmup: float = 0.1  # fraction of steps with a linear warm-up, then linear decay to 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = 5e-5 if self.method == "full" else 1e-3
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method '{self.method}': use one of {METHODS}")
        self.check_training_fields(("rank",))


class TextClassifier(nn.Module):
    """Encoder + mean pooling over real tokens + a linear head.

    Args:
        encoder: a transformers encoder (or a PEFT wrapper of one) returning last_hidden_state.
        hidden: width of the encoder output.
        num_classes: number of labels.
    """

    def __init__(self, encoder: nn.Module, hidden: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (B, T) -> logits (B, num_classes)."""
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, C)
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, C)
        return self.head(pooled)


def build_classifier(cfg: FinetuneConfig, encoder: nn.Module, num_classes: int) -> TextClassifier:
    """Wrap `encoder` (modified in place) so that only what `cfg.method` trains requires grad."""
    model = TextClassifier(encoder, encoder.config.hidden_size, num_classes)  # same head init for every method
    if cfg.method == "lora":
        import peft
        model.encoder = peft.get_peft_model(encoder, peft.LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=LORA_TARGETS))
    elif cfg.method == "serial-lora":
        door = serial_lora_peft()
        if door is not None:  # the same machinery as PEFT's LoRA above
            import peft
            model.encoder = peft.get_peft_model(encoder, door.SerialLoraConfig(
                r=cfg.rank, alpha=cfg.alpha, adapt_out=cfg.adapt_out))
        else:
            serial_lora.inject(encoder, cfg.rank, cfg.alpha, adapt_out=cfg.adapt_out)
    return model


def serial_lora_peft():
    """`lors.adapters.peft` (Serial LoRA registered as a PEFT method) where a supported PEFT is
    installed, else None (then Serial LoRA is injected natively: the same layers and maths)."""
    try:
        from lors.adapters import peft as door
    except ImportError:
        return None
    return door


def param_groups(model: TextClassifier, cfg: FinetuneConfig) -> list[dict]:
    """Encoder parameters at cfg.lr (B at lr * lora_plus_ratio), the head at cfg.head_lr."""
    head = list(model.head.parameters())
    if cfg.lora_plus_ratio != 1.0 and cfg.method != "full":
        groups = serial_lora.lora_plus_param_groups(model.encoder, cfg.lr, cfg.lora_plus_ratio)
    else:
        groups = [{"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": cfg.lr}]
    return groups + [{"params": head, "lr": cfg.head_lr}]


def lr_schedule(cfg: FinetuneConfig) -> Schedule:
    """Linear warm-up over `cfg.warmup` of the steps, then linear decay to 0 at `cfg.steps`.

    From step `warm` on the rate is the old LambdaLR's, lr * (steps - s) / (steps - warm). The
    warm-up differs: the old one was lr * (s + 1) / warm (full rate at step warm - 1); the
    engine's starts from warmup_start (here 1 / warm, the old first factor) and reaches the full
    rate at step warm. At 150 steps that is at most 0.063 x lr below the old rate, for steps 1 to
    14 only.
    """
    warm = max(1, int(cfg.warmup * cfg.steps))
    return Schedule(cfg.lr, cfg.steps, warmup_steps=warm, warmup_start=1.0 / warm, decay="linear")


def tokenize(tokenizer, split: TextSplit, max_len: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask: (N, max_len); labels: (N,)."""
    enc = tokenizer(split.texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor(split.labels)}


def _batch(data: dict[str, torch.Tensor], idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """Rows `idx`, cut to the longest real sequence among them."""
    length = int(data["attention_mask"][idx].sum(1).max())
    return {"input_ids": data["input_ids"][idx, :length].to(device),
            "attention_mask": data["attention_mask"][idx, :length].to(device),
            "labels": data["labels"][idx].to(device)}


def length_grouped_batches(lengths: torch.Tensor, batch_size: int, gen: torch.Generator,
                           group: int = 8) -> list[torch.Tensor]:
    """One epoch of random batches of similar length (less padding, same examples per epoch).

    Shuffle, cut into groups of `group` batches, sort each group by length, split it into
    batches and shuffle the batches. lengths: (N,) -> a list of index tensors of size <= batch_size.
    """
    perm = torch.randperm(len(lengths), generator=gen)
    batches = []
    for chunk in perm.split(batch_size * group):
        chunk = chunk[lengths[chunk].argsort(descending=True, stable=True)]
        batches += list(chunk.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen)]


def epoch_order(lengths: torch.Tensor, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The batches of ``epoch`` (0-based) in training order: epochs 0 to ``epoch`` drawn in turn
    (`length_grouped_batches`) from one generator seeded with ``seed``, and the last one's list
    read from its end. A function of (seed, epoch) alone, so a resumed run gets the batches of
    the uninterrupted one; the draws and the order are those of the earlier loop, which kept one
    generator for the whole run and popped each epoch's batches off the end of its list."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epoch + 1):
        batches = length_grouped_batches(lengths, batch_size, gen)
    return batches[::-1]


@torch.no_grad()
def evaluate(model: TextClassifier, data: dict[str, torch.Tensor], device: torch.device,
             batch_size: int = 64) -> float:
    """Accuracy in percent; the model's train/eval mode is left as it was."""
    correct = 0
    by_length = data["attention_mask"].sum(1).argsort()  # less padding; the order does not change accuracy
    with evaluating(model):
        for idx in by_length.split(batch_size):
            b = _batch(data, idx, device)
            correct += int((model(b["input_ids"], b["attention_mask"]).argmax(-1) == b["labels"]).sum())
    return 100.0 * correct / len(data["labels"])


def _digest(split: TextSplit) -> str:
    return hashlib.sha256(json.dumps([split.texts, split.labels]).encode("utf-8")).hexdigest()[:16]


def run_config(cfg: FinetuneConfig, train: TextSplit, test: TextSplit) -> dict:
    """What a run stores (``config.yaml``, every checkpoint, ``result.json``) and what resuming it
    or reusing its result must match: the config and a digest of the train and test texts."""
    return {"finetune": asdict(cfg), "data": {"classes": list(train.classes), "train_sha256": _digest(train),
                                              "test_sha256": _digest(test)}}


def _defaults() -> dict:
    """What a key that a stored run lacks (added to FinetuneConfig since) compares as."""
    return {"finetune": asdict(FinetuneConfig())}


def finished_result(run_dir: str | Path, config: dict) -> dict | None:
    """The result that ``run_dir/result.json`` holds for a run of ``config``, None if there is no
    readable one. Raises ValueError if it holds a finished run of other settings (a key that it
    lacks compares as its default, as on resuming)."""
    path = Path(run_dir) / RESULT
    try:
        stored = json.loads(path.read_text())
        stored_config, result = stored["config"], stored["result"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"warning: {path} is unreadable ({err}); the run is trained again", flush=True)
        return None
    diffs = config_differences(stored_config, json.loads(json.dumps(config)), defaults=_defaults())
    if diffs:
        raise ValueError(f"{run_dir} holds a finished run with other settings ({describe(diffs)}): pass "
                         "resume=False to train this one in its place, or use another run_dir")
    return result


def _write_result(run_dir: Path, config: dict, result: dict) -> None:
    """``result.json`` (written under another name, then renamed), then the checkpoints deleted."""
    tmp = run_dir / (RESULT + ".tmp")
    tmp.write_text(json.dumps({"config": config, "result": result}, indent=1) + "\n")
    os.replace(tmp, run_dir / RESULT)
    drop_checkpoints(run_dir)


def _stored_losses(run_dir: Path) -> dict[int, list[float]]:
    """{step: the losses of steps 0 to step - 1} of each readable checkpoint in ``run_dir``."""
    found = {}
    for ckpt in checkpoints(run_dir):
        try:
            state = read_state(ckpt)
        except ValueError:
            continue  # fit skips it as well
        if "losses" in state:
            found[state["step"]] = state["losses"]
    return found


def _train_seconds(run_dir: Path) -> float:
    """The summed time of the steps in ``run_dir/log.csv``: every step of the run, resumed or not
    (the engine drops the rows after the checkpoint a resumed run starts from)."""
    with (run_dir / "log.csv").open(newline="") as f:
        return sum(float(row["seconds"]) for row in csv.DictReader(f))


def finetune(cfg: FinetuneConfig, train: TextSplit, test: TextSplit, device: str = "cpu",
             progress: bool = True, load: Callable[[], tuple[nn.Module, object]] = load_minilm,
             run_dir: str | Path | None = None, resume: bool = True, stop_after: int | None = None,
             checkpoint_every: int = CHECKPOINT_EVERY) -> dict | None:
    """Train one classifier and return its numbers. `load` returns (encoder, tokenizer).

    ``run_dir``: the run's folder (see the module docstring); None trains in a temporary folder
    that is removed afterwards, with a checkpoint at the end only. ``resume``: continue the
    unfinished run in ``run_dir`` from its newest checkpoint, or return the result of the
    finished one without loading anything (ValueError if either was made with other settings);
    False trains afresh (the earlier run's files are kept in ``run_dir/.previous_run`` until
    the new run's first checkpoint). ``stop_after``: stop after that many steps with a
    checkpoint and return None (a later call resumes); needs a ``run_dir``.

    Returns a dict: the config fields plus trainable_params (encoder + head), adapter_params
    (encoder only), accuracy (%), train_time_s (the training steps' time from log.csv, summed
    over every part of a resumed run; checkpoint writes not counted), peak_mem_mib (growth
    above the loaded model while training; of a resumed run, in its last part), final_loss (mean
    of the last 20 steps' losses), device, serial_lora_via. Raises `NonFiniteLossError` when
    the loss becomes NaN or infinite, before that step is taken.
    """
    if stop_after is not None and (run_dir is None or stop_after < 1):
        raise ValueError(f"stop_after={stop_after} needs a run_dir to resume from and at least 1 step")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every {checkpoint_every} must be at least 1")
    if run_dir is not None:
        return _finetune(cfg, train, test, device, progress, load, Path(run_dir), resume, stop_after,
                         checkpoint_every)
    with tempfile.TemporaryDirectory(prefix="lors-finetune-") as tmp:
        return _finetune(cfg, train, test, device, progress, load, Path(tmp), False, None, cfg.steps,
                         temporary=True)


def _finetune(cfg: FinetuneConfig, train: TextSplit, test: TextSplit, device: str, progress: bool,
              load: Callable[[], tuple[nn.Module, object]], run_dir: Path, resume: bool,
              stop_after: int | None, checkpoint_every: int, temporary: bool = False) -> dict | None:
    config = run_config(cfg, train, test)
    done = finished_result(run_dir, config) if resume else None
    if done is not None:
        print(f"{run_dir} holds this finished run: its result is reused (delete the folder to train it "
              "again)", flush=True)
        return done
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    encoder, tokenizer = load()
    model = build_classifier(cfg, encoder, len(train.classes)).to(dev)
    train_data, test_data = tokenize(tokenizer, train, cfg.max_len), tokenize(tokenizer, test, cfg.max_len)
    opt = adamw(model, cfg.lr, 0.0, groups=param_groups(model, cfg), fused=False)
    lengths = train_data["attention_mask"].sum(1)
    per_epoch = len(length_grouped_batches(lengths, cfg.batch_size, torch.Generator()))
    stored = _stored_losses(run_dir) if resume else {}
    losses: list[float] = []  # every step's loss, exact: stored with each checkpoint

    def restore(step: int) -> None:
        """A resumed run: the losses before ``step`` from the checkpoint that fit loaded."""
        if len(losses) != step:
            if step not in stored:
                raise ValueError(f"the checkpoint of step {step} in {run_dir} holds no losses (not written "
                                 "by finetune): pass resume=False to train afresh, or use another run_dir")
            losses[:] = stored[step]

    def epoch_batches(epoch: int, start: int):
        restore(epoch * per_epoch + start)
        return epoch_order(lengths, cfg.batch_size, cfg.seed, epoch)[start:]

    def loss_fn(model: nn.Module, idx: torch.Tensor):
        b = _batch(train_data, idx, dev)
        loss = F.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"])
        losses.append(loss.item())
        return loss, {}

    settings = RunSettings(
        run_dir=run_dir, config=config, defaults=_defaults(), length_key="finetune.steps",
        checkpoint_every=checkpoint_every,
        clip_grad=0.0, amp="fp32",  # fp32 on every device: "auto" would train in bf16 on a GPU
        state={"losses": losses}, resume=resume, stop_after=stop_after, progress=progress,
        fail_hint=FAIL_HINT, dir_flag="run_dir", can_extend=False)
    try:
        with PeakMemory(dev) as mem:
            steps = fit(model, loss_fn, epoch_batches, per_epoch, opt, lr_schedule(cfg), settings)["steps"]
    except NonFiniteLossError:
        if not temporary:
            raise  # the engine's message names the intact checkpoint in run_dir
        raise NonFiniteLossError(f"loss is {losses[-1]} at step {len(losses) - 1} of {cfg.method} rank "
                                 f"{cfg.rank} seed {cfg.seed}. {RETRY}") from None
    if steps < cfg.steps:
        return None  # stopped by stop_after, with a checkpoint to resume from
    restore(steps)  # a finished run whose result was not written yet: fit trained nothing
    head = sum(p.numel() for p in model.head.parameters())
    trainable = serial_lora.trainable_parameters(model)
    result = {**asdict(cfg), "trainable_params": trainable, "adapter_params": trainable - head,
              "accuracy": evaluate(model, test_data, dev), "train_time_s": _train_seconds(run_dir),
              "peak_mem_mib": mem.growth_mib, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
              "device": str(dev), "serial_lora_via": ("peft" if serial_lora_peft() else "inject")
              if cfg.method == "serial-lora" else None}
    _write_result(run_dir, config, result)
    return result
