"""Training a GPT on a byte-level corpus: `train(cfg)` builds the model, the batches and the
loss and hands them to the engine's loop (`lors.engine.loop.fit`), which gives it the
detector's guarantees: locked run directory, atomic checkpoints, exact resume, CSV and
TensorBoard logs, the NaN guard and torchrun DDP.

A step's batch is ``train.batch_size`` windows of ``model.block_size + 1`` bytes at offsets
drawn from a generator seeded by (seed, step, process), so a resumed run sees the batches the
uninterrupted one would have.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lors.config import to_dict
from lors.core import count_parameters
from lors.data.corpus import Tokens, codec, digest, load_corpus, tokenize
from lors.engine import distributed
from lors.engine.checkpoint import find_checkpoint, load_checkpoint, read_state
from lors.engine.loop import RETRY_HINT, RunSettings, adamw, evaluating, fit
from lors.engine.schedule import Schedule
from lors.experiments.families import run_config
from lors.models.gpt import LMConfig, build_gpt, embedding_parameters

RESUME_FREE = ("train.output_dir", "train.log_every", "train.checkpoint_every", "train.eval_every",
               "train.eval_batches")
LN2 = math.log(2.0)


def windows(data: torch.Tensor, starts: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets, both (len(starts), block) int64, from (N,) uint8 ``data``."""
    idx = starts[:, None] + torch.arange(block + 1)[None]  # (B, block + 1)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def step_batch(data: torch.Tensor, cfg: LMConfig, step: int, rank: int = 0, per_process: int | None = None):
    """The batch of global step ``step`` for process ``rank``: a function of (seed, step, rank)."""
    g = torch.Generator().manual_seed((cfg.train.seed * 1000003 + step) * 1009 + rank)
    n = per_process or cfg.train.batch_size
    starts = torch.randint(len(data) - cfg.model.block_size - 1, (n,), generator=g)
    return windows(data, starts, cfg.model.block_size)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in nats."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def load_tokens(cfg: LMConfig, tokenizer_json: str | None = None) -> Tokens:
    """The corpus of ``cfg.data`` as token ids (bytes, or a BPE: ``tokenizer_json`` or trained)."""
    corpus = load_corpus(cfg.data.corpus, cfg.data.val_fraction, cfg.model.block_size)
    tokens = tokenize(corpus, cfg.data.tokenizer, cfg.model.vocab_size, tokenizer_json)
    for name, ids in (("train", tokens.train), ("val", tokens.val)):
        if len(ids) < cfg.model.block_size + 2:
            raise ValueError(f"the {name} split has {len(ids)} tokens, fewer than one context window of "
                             f"{cfg.model.block_size} + 1: use a larger corpus or a smaller model.block_size")
    return tokens


@torch.no_grad()
def evaluate(model: nn.Module, tokens: Tokens, cfg: LMConfig, device: torch.device) -> dict[str, float]:
    """Val loss over ``train.eval_batches`` fixed batches (the same for every model and run):
    bits per byte (the loss per token over the bytes per token) and perplexity per token."""
    g = torch.Generator().manual_seed(20240601)
    block, total = cfg.model.block_size, 0.0
    with evaluating(model):
        for _ in range(cfg.train.eval_batches):
            starts = torch.randint(len(tokens.val) - block - 1, (cfg.train.batch_size,), generator=g)
            x, y = windows(tokens.val, starts, block)
            total += lm_loss(model, x.to(device), y.to(device)).item()
    loss = total / cfg.train.eval_batches
    return {"val_loss": loss, "val_bpb": loss / LN2 / tokens.bytes_per_token, "val_ppl": math.exp(loss)}


def schedule(cfg: LMConfig) -> Schedule:
    t = cfg.train
    return Schedule(lr=t.lr, total_steps=t.steps, warmup_steps=t.warmup_steps, decay="cosine")


def train(cfg: LMConfig, run_dir: str | Path | None = None, resume: bool = True, stop_after: int | None = None,
          device: str | None = None, progress: bool = True, evaluate_at_end: bool = True,
          extend: bool = False, parallel: str = "ddp") -> dict:
    """Train ``cfg``'s GPT; returns the engine's summary plus val bits-per-byte at the end and
    ``parameters`` (`parameter_counts`).
    Under torchrun, ``parallel`` is "ddp" (a replica per process) or "fsdp" (FSDP2: each block
    and then the root sharded; see docs/core.md)."""
    cfg.validate()
    t = cfg.train
    rank, world, dev, per_process = distributed.setup(device, t.batch_size)
    previous = find_checkpoint(run_dir or t.output_dir) if resume else None  # a resumed run keeps its BPE
    try:
        stored = read_state(previous) if previous else {}
    except ValueError:
        stored = {}
    tokens = load_tokens(cfg, stored.get("tokenizer"))
    corpus_sha = digest(tokens)
    if stored.get("corpus_sha256", corpus_sha) != corpus_sha:
        raise ValueError(f"the corpus {cfg.data.corpus or 'fortunes'} is not the one the run in {previous.parent} "
                         "was trained on (its content changed): restore that corpus to resume, pass "
                         "--no-resume to train afresh on this one, or use another --run-dir")
    torch.manual_seed(t.seed)
    model = build_gpt(cfg).to(dev)
    optimizer = adamw(model, t.lr, t.weight_decay, betas=(0.9, 0.95))

    def epoch_batches(epoch: int, start: int) -> Iterator:
        return (step_batch(tokens.train, cfg, s, rank, per_process) for s in range(start, t.steps))

    def loss_fn(model, batch):
        x, y = (b.to(dev) for b in batch)
        loss = lm_loss(model, x, y)
        return loss, {"bpb": loss.item() / LN2 / tokens.train_bytes_per_token}

    settings = RunSettings(
        run_dir=run_dir or t.output_dir, config=to_dict(cfg), defaults=to_dict(type(cfg)()), resume_free=RESUME_FREE, length_key="train.steps",
        log_terms=("bpb",), checkpoint_every=t.checkpoint_every, log_every=t.log_every, eval_every=t.eval_every,
        clip_grad=t.clip_grad,
        amp=t.amp, resume=resume, extend=extend, stop_after=stop_after, progress=progress,
        state={"tokenizer": tokens.tokenizer_json, "corpus_sha256": corpus_sha}, parallel=parallel,
        fail_hint=RETRY_HINT)
    final = partial(evaluate, model, tokens, cfg, dev) if evaluate_at_end else None
    return {**fit(model, loss_fn, epoch_batches, t.steps, optimizer, schedule(cfg), settings, rank, world,
                  evaluate=final), "parameters": parameter_counts(cfg)}


def parameter_counts(cfg: LMConfig) -> dict[str, int]:
    """``total`` and ``non_embedding`` parameters of ``cfg``'s GPT, each shared tensor once
    (`lors.count_parameters`; built on the meta device). The token embedding, which the output
    layer shares, and learned positions are the embedding."""
    model = build_gpt(cfg, device="meta")
    total = count_parameters(model).total
    return {"total": total, "non_embedding": total - embedding_parameters(model)}


def load_lm(path: str | Path, overrides: Sequence[str] = (), device: torch.device | str = "cpu"):
    """The trained GPT of a run directory or ckpt_* folder (eval mode), its config and its
    tokenizer's JSON (None for bytes)."""
    ckpt, cfg, state = run_config(path, "lm", LMConfig, overrides)
    model = build_gpt(cfg).to(device)
    load_checkpoint(ckpt, model)
    return model.eval(), cfg, state.get("tokenizer")


def evaluate_run(path: str | Path, overrides: Sequence[str] = (), device: str | None = None) -> dict[str, float]:
    """`lors lm eval`: val bits per byte and perplexity of a trained run."""
    _, _, dev = distributed.init_distributed(device)
    model, cfg, tokenizer_json = load_lm(path, overrides, dev)
    return evaluate(model, load_tokens(cfg, tokenizer_json), cfg, dev)


def sample(path: str | Path, prompt: str, max_new_tokens: int = 200, top_k: int | None = None,
           seed: int = 0, merged: bool = False) -> str:
    """`lors lm sample`: text generated from ``prompt`` (greedy, or top-k with ``seed``); with
    ``merged``, from the model with its LORS layers merged into plain Linears."""
    from lors.core import merge
    model, _, tokenizer_json = load_lm(path)
    if merged:
        merge(model)
    text = codec(tokenizer_json)
    idx = text.encode(prompt or "\n")[None]
    out = model.generate(idx, max_new_tokens, top_k=top_k, generator=torch.Generator().manual_seed(seed))
    return text.decode(out[0, idx.shape[1]:])
