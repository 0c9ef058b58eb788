"""Uptraining a converted causal LM by distillation from the original: the engine's `fit`, so a
run checkpoints, resumes exactly and keeps its logs like every other training run.

Loss per batch: KL(teacher ‖ student) over next-token distributions, plus ``lm_weight`` times the
student's own next-token loss. Only the converted layers' tensors (shared bases or weights and
per-layer factors) train; embeddings, norms and the head stay as they were.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lors.core.basis import SharedBasis
from lors.core.static import StaticLors
from lors.engine.loop import RunSettings, adamw, fit
from lors.engine.schedule import Schedule


@dataclass
class UptrainSettings:
    """Distillation: ``steps`` of ``batch_size`` windows, AdamW at ``lr`` (warm-up, cosine)."""

    steps: int = 100
    batch_size: int = 4
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    lm_weight: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10

    def validate(self) -> "UptrainSettings":
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.checkpoint_every < 1:
            raise ValueError("uptraining needs steps >= 1, batch_size >= 1, lr > 0 and checkpoint_every >= 1")
        return self


def converted_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The tensors of every StaticLors / SharedBasis in ``model``, each once."""
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, (StaticLors, SharedBasis)):
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def step_batch(windows: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The windows of ``step``: drawn from (seed, step) alone, so a resumed run sees the same."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return windows[torch.randint(len(windows), (batch_size,), generator=g)]


def distill_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, lm_weight: float):
    """(loss, terms) for one batch of token ids (B, T)."""
    with torch.no_grad():
        target = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)
    logits = student(input_ids=ids, use_cache=False).logits[:, :-1].float()    # (B, T-1, V)
    log_p = F.log_softmax(logits, dim=-1)
    kl = F.kl_div(log_p.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
    lm = F.nll_loss(log_p.flatten(0, 1), ids[:, 1:].reshape(-1))
    return kl + lm_weight * lm, {"kl": kl.item(), "lm": lm.item()}


# the config keys of an uptraining run as the `lors convert` flags that set them, for its messages
FLAGS = {"uptrain.steps": "--uptrain-steps", "uptrain.lr": "--uptrain-lr", "uptrain.batch_size": "--uptrain-batch",
         **{f"convert.{k}": f"--{k.replace('_', '-')}" for k in ("budget", "rank", "form", "side", "groups",
                                                                "writer_groups", "allocation", "damping", "targets",
                                                                "calibration", "calib_tokens", "seq_len")}}


def uptrain(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, settings: UptrainSettings,
            run_dir: str | Path, config: dict, resume: bool = True, progress: bool = True) -> dict:
    """Distil ``teacher`` into the converted ``student`` (in place) on token ``windows`` (N, T).

    ``config`` (the conversion's settings) is stored with every checkpoint and must match on
    resume, with the uptraining settings. Returns `fit`'s summary.
    """
    settings.validate()
    params = converted_parameters(student)
    if not params:
        raise ValueError("the model holds no converted layers: convert it before uptraining")
    keep = {id(p) for p in params}
    for p in student.parameters():
        p.requires_grad_(id(p) in keep)
    teacher.eval().requires_grad_(False)
    student.train()
    optimizer = adamw(student, settings.lr, settings.weight_decay)  # the trainable ones: the converted layers
    schedule = Schedule(lr=settings.lr, total_steps=settings.steps, warmup_steps=settings.warmup_steps,
                        decay="cosine")

    def epoch_batches(epoch: int, start: int):
        return (step_batch(windows, s, settings.batch_size, settings.seed) for s in range(start, settings.steps))

    run = RunSettings(run_dir=Path(run_dir), config={"convert": config, "uptrain": asdict(settings)},
                      length_key="uptrain.steps", log_terms=("kl", "lm"), checkpoint_every=settings.checkpoint_every,
                      log_every=settings.log_every, clip_grad=1.0, amp="fp32", resume=resume, progress=progress,
                      fail_hint="rerun with a lower --uptrain-lr and --no-resume (a resumed run keeps its settings)",
                      dir_flag="--out", can_extend=False, key_names=FLAGS)
    try:
        return fit(student, lambda m, ids: distill_loss(m, teacher, ids, settings.lm_weight), epoch_batches,
                   settings.steps, optimizer, schedule, run)
    finally:
        student.eval()
