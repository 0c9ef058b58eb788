"""Uptraining ("healing") a converted causal LM or encoder: the engine's `fit`, so a run
checkpoints, resumes exactly and keeps its logs like every other training run.

Loss per batch (``loss``), for a causal LM: "distill", KL(teacher ‖ student) over next-token
distributions plus ``lm_weight`` times the student's own next-token loss; or "lm", the
next-token loss alone, with no teacher (none is kept or run). For an encoder (MiniLM), which
predicts no tokens: "embed" (`embed_loss`), the teacher's sentence embeddings and token hidden
states distilled into the student; it is the only loss for encoders and refused for causal LMs
(`check_loss`). What trains (``params``): "converted", the converted layers'
tensors (shared bases or weights and per-layer factors), embeddings, norms and the head staying
as they were; or "all", every tensor but the token embeddings (and a head tied to them, the same
tensor), which a layer-dropped model (nothing converted) needs. ``amp``: "fp32", or "bf16"
autocast (on CPU too; the held-out measure is taken in float32 either way).

Healing curves: with ``schedule="constant"`` the rate after warm-up does not depend on the run's
length, so the model after N steps is exactly what an N-step run gives, and a finished run
continues exactly to more steps; ``eval_at_tokens`` reads the held-out measure (a causal LM's
perplexity, an encoder's cosine to the original) at those token counts of the one run (fit's
``eval_steps``, rows of ``val.csv``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lors.core.basis import SharedBasis
from lors.core.static import StaticLors
from lors.engine.loop import RunSettings, adamw, evaluating, fit, read_val
from lors.engine.schedule import Schedule
from lors.experiments.convert.evaluate import mean_pool


CAUSAL_LOSSES = ("distill", "lm")  # next-token predictions: a causal LM's
ENCODER_LOSSES = ("embed",)        # sentence embeddings and hidden states: an encoder's
LOSSES = CAUSAL_LOSSES + ENCODER_LOSSES
TERMS = {"distill": ("kl", "lm"), "lm": ("lm",), "embed": ("embed", "hidden")}  # log.csv's columns per loss
PARAMS = ("converted", "all")
AMPS = ("fp32", "bf16")  # autocast_dtype's names; fp16 would need a loss scaler for no gain on CPU
SCHEDULES = ("cosine", "constant", "linear")  # `Schedule`'s decays after the warm-up ("step" needs milestones)
# settings that do not change the weights: a run may resume or continue with others
RESUME_FREE = ("eval_at_tokens", "checkpoint_every", "log_every")


@dataclass
class UptrainSettings:
    """Healing by ``loss`` (one of ``LOSSES``; None: the model kind's default, "distill" for a
    causal LM and "embed" for an encoder, which `lors.experiments.convert.run.convert_model` sets
    once the model is loaded) of the tensors ``params`` (one of ``PARAMS``) under
    ``amp`` (one of ``AMPS``; see the module docstring): ``steps`` of ``batch_size`` windows drawn from the first ``text_tokens``
    tokens of the calibration text (all of it if shorter), AdamW at ``lr`` after ``warmup_steps`` of linear warm-up,
    then ``schedule`` (one of ``SCHEDULES``: "cosine" to 0 at the last step, "constant", or
    "linear" to 0). ``eval_at_tokens``: token counts (multiples of one step's batch_size x
    seq_len tokens) at which the held-out measure is read, besides the end. ``hidden_weight``:
    the weight of the token hidden states' term of the "embed" loss (`embed_loss`)."""

    steps: int = 100
    batch_size: int = 4
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    lm_weight: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    schedule: str = "cosine"
    text_tokens: int = 131072
    eval_at_tokens: list[int] = field(default_factory=list)
    loss: str | None = "distill"  # the default a run saved before the key existed had
    params: str = "converted"
    amp: str = "fp32"
    hidden_weight: float = 1.0

    def validate(self) -> "UptrainSettings":
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.checkpoint_every < 1:
            raise ValueError("uptraining needs steps >= 1, batch_size >= 1, lr > 0 and checkpoint_every >= 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown uptraining schedule {self.schedule!r}: use one of {SCHEDULES} "
                             "(--uptrain-schedule)")
        for value, choices, flag in ((self.loss, (None, *LOSSES), "--uptrain-loss"),
                                     (self.params, PARAMS, "--uptrain-params"), (self.amp, AMPS, "--uptrain-amp")):
            if value not in choices:
                raise ValueError(f"unknown {flag} {value!r}: use one of {tuple(c for c in choices if c)}")
        if not self.hidden_weight >= 0:  # NaN too
            raise ValueError(f"--uptrain-hidden-weight {self.hidden_weight} must be >= 0 (0: the sentence "
                             "embeddings' cosine alone)")
        if self.text_tokens < 1 or any(t < 1 for t in self.eval_at_tokens):
            raise ValueError(f"--uptrain-tokens ({self.text_tokens}) and every --eval-at-tokens count "
                             f"({self.eval_at_tokens}) must be >= 1")
        return self

    def eval_steps(self, seq_len: int) -> list[int]:
        """The steps after which ``eval_at_tokens`` tokens are trained (``batch_size`` windows of
        ``seq_len`` tokens a step); a ValueError naming the flags for a count that falls between
        two steps or after the last."""
        per_step = self.batch_size * seq_len
        steps = []
        for tokens in self.eval_at_tokens:
            if tokens % per_step:
                raise ValueError(f"--eval-at-tokens {tokens} falls between two steps of {per_step} tokens "
                                 f"(--uptrain-batch {self.batch_size} x --seq-len {seq_len}): use multiples "
                                 f"of {per_step}")
            if tokens // per_step > self.steps:
                raise ValueError(f"--eval-at-tokens {tokens} is after the run's last step ({self.steps} steps of "
                                 f"{per_step} tokens, {self.steps * per_step} tokens): raise --uptrain-steps to "
                                 f"{tokens // per_step} or drop the count")
            steps.append(tokens // per_step)
        return sorted(set(steps))


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


def trainable_parameters(model: nn.Module, which: str) -> list[nn.Parameter]:
    """The tensors that uptraining trains: ``which`` "converted" (`converted_parameters`) or
    "all" (every parameter but the input token embeddings; a head tied to them is that tensor)."""
    if which == "converted":
        params = converted_parameters(model)
        if not params:
            raise ValueError("the model holds no converted layers, so --uptrain-params converted would train "
                             "nothing (a layer-dropped model has none): pass --uptrain-params all, or convert it first")
        return params
    if which != "all":
        raise ValueError(f"unknown --uptrain-params {which!r}: use one of {PARAMS}")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    skip = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    return [p for p in model.parameters() if id(p) not in skip]  # model.parameters() lists a tied tensor once


def step_batch(windows: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The windows of ``step``: drawn from (seed, step) alone, so a resumed run sees the same."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return windows[torch.randint(len(windows), (batch_size,), generator=g)]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """A causal LM's next-token logits (B, T-1, V) in float32; a named error for an encoder."""
    out = model(input_ids=ids, use_cache=False)
    if getattr(out, "logits", None) is None:
        raise ValueError(f"a {type(model).__name__} predicts no next tokens, which the next-token losses "
                         "(--uptrain-loss distill, lm) train: use --uptrain-loss embed for an encoder")
    return out.logits[:, :-1].float()


def _hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """An encoder's last hidden states (B, T, C) in float32 on unpadded windows; a named error for
    a model without them (a causal LM's output holds logits)."""
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    if getattr(out, "last_hidden_state", None) is None:
        raise ValueError(f"a {type(model).__name__} gives no last_hidden_state, which --uptrain-loss embed "
                         "distils: use --uptrain-loss distill or lm for a causal LM")
    return out.last_hidden_state.float()


def lm_loss(student: nn.Module, ids: torch.Tensor):
    """(loss, terms): the student's mean next-token cross-entropy on token ids (B, T); no teacher."""
    logits = _logits(student, ids)                                              # (B, T-1, V)
    lm = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].reshape(-1))
    return lm, {"lm": lm.item()}


def distill_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, lm_weight: float):
    """(loss, terms) for one batch of token ids (B, T): KL to the teacher + ``lm_weight`` x next-token loss."""
    with torch.no_grad():
        target = F.log_softmax(_logits(teacher, ids), dim=-1)
    logits = _logits(student, ids)                                              # (B, T-1, V)
    log_p = F.log_softmax(logits, dim=-1)
    kl = F.kl_div(log_p.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
    lm = F.nll_loss(log_p.flatten(0, 1), ids[:, 1:].reshape(-1))
    return kl + lm_weight * lm, {"kl": kl.item(), "lm": lm.item()}


def embed_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, hidden_weight: float):
    """(loss, terms) of an encoder for one batch of token windows (B, T), each read whole (no
    padding; `lors.experiments.convert.run.heal_windows` puts [CLS] and [SEP] around it):

        embed  = 1 - mean cosine(mean_pool(student), mean_pool(teacher))   sentence embeddings
        hidden = sum |h_student - h_teacher|^2 / sum |h_teacher|^2           token hidden states
        loss   = embed + hidden_weight x hidden

    Why these: MiniLM is used through its sentence embedding, the attention-mask-aware mean of
    the last hidden states, L2-normalised (`evaluate.sentence_embeddings`), and the held-out
    measure is that embedding's cosine to the original's, so ``embed`` is the measure itself on
    the training windows (the normalisation is the cosine's). It gives one direction per window
    to match, C numbers out of T x C; ``hidden`` (the token-level distillation of TinyBERT and
    MiniLM's own training, and the MSE of Reimers & Gurevych's embedding distillation) asks every
    token's state to match as well, which keeps what the pooling averages away (token-level
    uses, other poolings) and gives a denser signal per window. It is relative to the teacher's
    squared norm, so it is 0 for a perfect student and 1 for one that outputs zeros whatever
    the model's scale, and ``hidden_weight`` 1 weighs the two alike; 0 heals on the cosine alone.
    """
    with torch.no_grad():
        target = _hidden(teacher, ids)                                          # (B, T, C)
    h = _hidden(student, ids)
    mask = torch.ones(ids.shape, device=h.device)                              # the windows have no padding
    embed = 1 - F.cosine_similarity(mean_pool(h, mask), mean_pool(target, mask), dim=-1).mean()
    hidden = (h - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)
    return embed + hidden_weight * hidden, {"embed": embed.item(), "hidden": hidden.item()}


def check_loss(loss: str, causal: bool, source: str) -> None:
    """Refuse a loss that the model's kind cannot train, naming the flag and the fix."""
    if causal and loss in ENCODER_LOSSES:
        raise ValueError(f"{source} is a causal LM: --uptrain-loss {loss} distils an encoder's sentence "
                         "embeddings; use --uptrain-loss distill (the default for causal LMs) or lm")
    if not causal and loss in CAUSAL_LOSSES:
        raise ValueError(f"{source} is an encoder, which predicts no next tokens: --uptrain-loss {loss} trains "
                         "next-token predictions; use --uptrain-loss embed (the default for encoders: the "
                         "original's sentence embeddings and hidden states)")


# the config keys of an uptraining run as the `lors convert` flags that set them, for its messages
FLAGS = {"uptrain.steps": "--uptrain-steps", "uptrain.lr": "--uptrain-lr", "uptrain.batch_size": "--uptrain-batch",
         "uptrain.schedule": "--uptrain-schedule", "uptrain.text_tokens": "--uptrain-tokens",
         "uptrain.eval_at_tokens": "--eval-at-tokens", "uptrain.loss": "--uptrain-loss",
         "uptrain.params": "--uptrain-params", "uptrain.amp": "--uptrain-amp",
         "uptrain.hidden_weight": "--uptrain-hidden-weight",
         **{f"convert.{k}": f"--{k.replace('_', '-')}" for k in ("budget", "rank", "form", "side", "groups",
                                                                "writer_groups", "allocation", "damping", "targets",
                                                                "calibration", "calib_tokens", "seq_len")}}


def loss_function(settings: UptrainSettings, teacher: nn.Module | None) -> Callable:
    """``loss_fn(model, ids) -> (loss, terms)`` of ``settings.loss`` (a named error for "distill"
    or "embed" without a teacher)."""
    if settings.loss is None:
        raise ValueError("no uptraining loss chosen: pass --uptrain-loss (convert_model picks the model "
                         "kind's default once it is loaded)")
    if settings.loss == "lm":
        return lm_loss
    if teacher is None:
        raise ValueError("embedding distillation needs the original encoder as teacher: pass it"
                         if settings.loss == "embed" else
                         "distillation needs the original model as teacher: pass it, or use --uptrain-loss lm")
    teacher.eval().requires_grad_(False)
    if settings.loss == "embed":
        return lambda m, ids: embed_loss(m, teacher, ids, settings.hidden_weight)
    return lambda m, ids: distill_loss(m, teacher, ids, settings.lm_weight)


def uptrain(student: nn.Module, teacher: nn.Module | None, windows: torch.Tensor, settings: UptrainSettings,
            run_dir: str | Path, config: dict, resume: bool = True, progress: bool = True,
            evaluate: Callable[[], dict[str, float]] | None = None) -> dict:
    """Heal the converted ``student`` (in place) on token ``windows`` (N, T): distil ``teacher``
    into it (a causal LM's next-token distributions with "distill", an encoder's embeddings and
    hidden states with "embed"), or with ``settings.loss == "lm"`` train on next-token loss alone
    (``teacher`` unused, may be None); the tensors of ``settings.params`` train, under ``settings.amp``.

    The student trains in train mode, its dropout on (none in SmolLM2, 0.1 in MiniLM), drawn from
    torch's generator seeded by ``settings.seed`` (the caller's generator is left as it was).

    ``config`` (the conversion's settings) is stored with every checkpoint and must match on
    resume, with the uptraining settings but ``RESUME_FREE``; a "constant" run may resume with
    more steps (it continues exactly). ``evaluate()`` (in eval mode; metrics by name, e.g.
    ``{"perplexity": ...}`` or ``{"cosine": ...}``) runs after each step of ``settings.eval_steps(T)`` and at the end,
    one row of ``run_dir/val.csv`` each. Returns `fit`'s summary plus ``curve``: the val.csv
    rows as dicts with the step and the tokens trained.
    """
    settings.validate()
    eval_steps = settings.eval_steps(windows.shape[1])
    if eval_steps and evaluate is None:
        raise ValueError("--eval-at-tokens needs held-out text to measure: pass --eval-tokens T as well")
    loss_fn = loss_function(settings, teacher)
    keep = {id(p) for p in trainable_parameters(student, settings.params)}
    for p in student.parameters():
        p.requires_grad_(id(p) in keep)
    student.train()
    optimizer = adamw(student, settings.lr, settings.weight_decay)  # the trainable ones: settings.params
    schedule = Schedule(lr=settings.lr, total_steps=settings.steps, warmup_steps=settings.warmup_steps,
                        decay=settings.schedule)

    def epoch_batches(epoch: int, start: int):
        return (step_batch(windows, s, settings.batch_size, settings.seed) for s in range(start, settings.steps))

    terms = TERMS[settings.loss]
    run = RunSettings(run_dir=Path(run_dir), config={"convert": config, "uptrain": asdict(settings)},
                      defaults={"uptrain": asdict(UptrainSettings())},
                      resume_free=tuple(f"uptrain.{k}" for k in RESUME_FREE),
                      length_key="uptrain.steps", log_terms=terms, checkpoint_every=settings.checkpoint_every,
                      log_every=settings.log_every, eval_steps=eval_steps, clip_grad=1.0, amp=settings.amp,
                      resume=resume, extend=settings.schedule == "constant", progress=progress,
                      fail_hint="rerun with a lower --uptrain-lr and --no-resume (a resumed run keeps its settings)",
                      dir_flag="--out", can_extend=False, key_names=FLAGS)

    def in_eval_mode() -> dict[str, float]:
        with evaluating(student):  # fit trains it in train mode, so it goes back to that
            return evaluate()
    dev = next(student.parameters()).device
    try:  # the model's own dropout (MiniLM's 0.1) draws from torch's generator: seeded for a fresh run, and a
        # resumed one restores it from its checkpoint, so a run is a function of its settings; the caller's kept
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            torch.manual_seed(settings.seed)
            summary = fit(student, loss_fn, epoch_batches, settings.steps, optimizer, schedule, run,
                          evaluate=None if evaluate is None else in_eval_mode)
    finally:
        student.eval()
    return summary | {"curve": read_curve(Path(run_dir) / "val.csv", settings.batch_size * windows.shape[1])}


def read_curve(path: Path, tokens_per_step: int) -> list[dict]:
    """The rows of a run's ``val.csv`` as ``{"step", "tokens", metric: value}``, one per step
    (`lors.engine.loop.read_val`; none if absent)."""
    return [{"step": r["step"], "tokens": r["step"] * tokens_per_step, **{k: v for k, v in r.items() if k != "step"}}
            for r in read_val(path)]
