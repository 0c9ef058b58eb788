"""One fine-tuning run of a pretrained text encoder for classification: full, PEFT LoRA or
Serial LoRA.

All three methods share the data, the seed, the number of steps, the batch order and the
classifier head (mean-pooled tokens -> Linear); only what is trainable differs:
  full         every encoder weight;
  lora         PEFT's own LoRA on query, key, value and the attention output projection;
  serial-lora  lors.adapters.serial_lora, one shared pair per attention block.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from lors.adapters import serial_lora
from lors.data.text import TextSplit
from lors.engine.memory import PeakMemory
from lors.engine.loop import adamw
from lors.engine.schedule import Schedule
from lors.models.pretrained import load_minilm

METHODS = ("full", "lora", "serial-lora")
LORA_TARGETS = ["query", "key", "value", "attention.output.dense"]  # q, k, v, o of a BERT layer
PRESET = "minilm_fortunes"


@dataclass
class FinetuneConfig:
    """One training run. lr=None picks 5e-5 for full fine-tuning and 1e-3 for the adapters."""

    method: str = "serial-lora"
    rank: int = 8
    alpha: float = 16.0
    lr: float | None = None
    head_lr: float = 1e-3
    lora_plus_ratio: float = 1.0  # > 1: LoRA+, B matrices learn this many times faster
    adapt_out: bool = False  # serial-lora only: a second pair on the attention output projection
    steps: int = 150
    batch_size: int = 16
    max_len: int = 64
    warmup: float = 0.1  # fraction of steps with a linear warm-up, then linear decay to 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = 5e-5 if self.method == "full" else 1e-3
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method '{self.method}': use one of {METHODS}")
        check_training_fields(self, ("rank", "steps", "batch_size", "max_len"))


COUNTS = ("steps", "batch_size", "max_len")           # >= 1, in a run and in a sweep
RATES = ("alpha", "lr", "head_lr", "lora_plus_ratio")  # > 0 (a sweep may leave alpha and lr null)


def check_training_fields(cfg, counts=COUNTS) -> None:
    """The checks a run (``FinetuneConfig``) and a sweep (``FinetuneSweep``) share: ``counts``
    at least 1, the rates positive (None: the default), the warm-up a fraction."""
    for name in counts:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} {getattr(cfg, name)} must be at least 1")
    for name in RATES:
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise ValueError(f"{name} {value} must be positive" + (" (or null for the default)"
                                                                   if name in ("alpha", "lr") else ""))
    warmup = getattr(cfg, "warmup", 0.0)
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup {warmup} is a fraction of the steps: use 0 <= warmup < 1, e.g. 0.1")


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


@torch.no_grad()
def evaluate(model: TextClassifier, data: dict[str, torch.Tensor], device: torch.device,
             batch_size: int = 64) -> float:
    """Accuracy in percent; the model's train/eval mode is left as it was."""
    was_training = model.training
    model.eval()
    correct = 0
    by_length = data["attention_mask"].sum(1).argsort()  # less padding; the order does not change accuracy
    for idx in by_length.split(batch_size):
        b = _batch(data, idx, device)
        correct += int((model(b["input_ids"], b["attention_mask"]).argmax(-1) == b["labels"]).sum())
    model.train(was_training)
    return 100.0 * correct / len(data["labels"])


def finetune(cfg: FinetuneConfig, train: TextSplit, test: TextSplit, device: str = "cpu",
             progress: bool = True, load: Callable[[], tuple[nn.Module, object]] = load_minilm) -> dict:
    """Train one classifier and return its numbers. `load` returns (encoder, tokenizer).

    Returns a dict: the config fields plus trainable_params (encoder + head), adapter_params
    (encoder only), accuracy (%), train_time_s, peak_mem_mib (growth above the loaded model),
    final_loss, device.
    """
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    encoder, tokenizer = load()
    model = build_classifier(cfg, encoder, len(train.classes)).to(dev)
    train_data, test_data = tokenize(tokenizer, train, cfg.max_len), tokenize(tokenizer, test, cfg.max_len)
    opt = adamw(model, cfg.lr, 0.0, groups=param_groups(model, cfg), fused=False)
    schedule = lr_schedule(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    lengths = train_data["attention_mask"].sum(1)
    batches: list[torch.Tensor] = []
    losses = []
    model.train()
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        for step in tqdm(range(cfg.steps), desc=f"{cfg.method} r={cfg.rank} seed={cfg.seed}",
                         disable=not progress, leave=False):
            if not batches:  # a new epoch; the same batches for every method with this seed
                batches = length_grouped_batches(lengths, cfg.batch_size, gen)
            b = _batch(train_data, batches.pop(), dev)
            loss = F.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            schedule.scale_groups(opt, step)  # every group from its own rate: the head and LoRA+'s B keep theirs
            opt.step()
            losses.append(loss.item())
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        train_time = time.perf_counter() - t0
    head = sum(p.numel() for p in model.head.parameters())
    trainable = serial_lora.trainable_parameters(model)
    return {**asdict(cfg), "trainable_params": trainable, "adapter_params": trainable - head,
            "accuracy": evaluate(model, test_data, dev), "train_time_s": train_time,
            "peak_mem_mib": mem.growth_mib, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "device": str(dev), "serial_lora_via": ("peft" if serial_lora_peft() else "inject")
            if cfg.method == "serial-lora" else None}
