"""What a conversion is measured with: token windows of real text, held-out perplexity of a causal
LM, sentence-embedding similarity of an encoder to its original, the calibration run, and the
layer-dropping baseline.

Text: see `lors.experiments.convert.texts` (the fortunes by default, Python's help topics, or a
file), whose calibration and evaluation parts never share an entry.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lors.core.convert import InputMoments, convert_targets, input_moments
from lors.core.share import find_layers


def token_windows(tokenizer, text: str, tokens: int, seq_len: int) -> torch.Tensor:
    """The first ``tokens`` tokens of ``text`` as (tokens // seq_len, seq_len) ids, fewer windows
    (maybe none) if the text is shorter (`texts.text_windows` turns that into a named error)."""
    if tokens < seq_len:
        raise ValueError(f"{tokens} tokens hold no window of {seq_len}: ask for at least {seq_len}")
    chars = tokens * 8  # enough characters for English text, cut below
    ids = tokenizer(text[:chars], return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < tokens:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    count = min(tokens, ids.numel()) // seq_len
    return ids[: count * seq_len].view(count, seq_len)


def batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token loss) of a causal LM over every predicted token of ``windows``."""
    total, count = 0.0, 0
    for ids in batches(windows, batch_size):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum")
        total, count = total + float(loss), count + ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``hidden`` (B, T, C) over the tokens that ``mask`` (B, T; 1 for a token, 0 for
    padding) keeps: (B, C). MiniLM's sentence embedding before its L2 normalisation."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


# the longest sentence `sentence_embeddings` reads (tokens, [CLS] and [SEP] included): MiniLM's
# training length, and what `lors convert compare --model minilm` measures with
SENTENCE_TOKENS = 128


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32,
                        max_length: int = SENTENCE_TOKENS) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states (the sentence-transformers recipe of MiniLM),
    (len(texts), hidden)."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        h = model(**enc).last_hidden_state                                  # (B, T, C)
        out.append(F.normalize(mean_pool(h, enc["attention_mask"]), dim=-1))
    return torch.cat(out)


def embedding_cosine(model: nn.Module, tokenizer, texts: Sequence[str], reference: torch.Tensor) -> float:
    """The mean cosine similarity of ``model``'s `sentence_embeddings` of ``texts`` to
    ``reference`` (the original's, the same call): 1.0 for a model that embeds every text as the
    original does. What `lors convert compare --model minilm` and an encoder's
    ``lors convert --eval-tokens`` report."""
    return float((sentence_embeddings(model, tokenizer, texts) * reference).sum(-1).mean())


def sentences_for_tokens(tokenizer, entries: Sequence[str], tokens: int,
                         max_length: int = SENTENCE_TOKENS) -> tuple[list[str], int]:
    """The fewest first ``entries`` that hold at least ``tokens`` tokens as `sentence_embeddings`
    reads them (special tokens included, each cut at ``max_length``), and their token count; all
    of them, and fewer tokens, if the entries hold fewer (the caller names that as an error)."""
    chosen, count = [], 0
    for i in range(0, len(entries), 256):  # tokenised in chunks: a few hundred entries are usually enough
        chunk = list(entries[i:i + 256])
        for text, ids in zip(chunk, tokenizer(chunk, truncation=True, max_length=max_length)["input_ids"]):
            if count >= tokens:
                return chosen, count
            chosen.append(text)
            count += len(ids)
    return chosen, count


def record_moments(model: nn.Module, targets: Sequence[str] | None, inputs: Sequence[dict]) -> InputMoments:
    """The input moments of ``targets`` (None: every Linear of a layer) in every layer of
    ``model``'s stack, over forward passes on ``inputs`` (keyword arguments of each call)."""
    _, stack = find_layers(model)
    layers = list(stack)
    names = convert_targets(layers[0], targets)  # the same check convert_layers makes
    return input_moments(layers, names, lambda: [model(**kw) for kw in inputs])


@torch.no_grad()
def layer_similarity(model: nn.Module, inputs: Sequence[dict]) -> list[float]:
    """Mean cosine similarity between each layer's input and output hidden states (1.0: the
    layer changes nothing) over ``inputs``; what the layer-dropping baseline drops by."""
    _, stack = find_layers(model)
    sims = [[] for _ in stack]
    hooks = []
    for i, layer in enumerate(stack):
        def hook(_m, args, kwargs, output, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            sims[i].append(F.cosine_similarity(x.float(), y.float(), dim=-1).mean())
        hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        for kw in inputs:
            model(**kw)
    finally:
        for h in hooks:
            h.remove()
    return [float(torch.stack(s).mean()) for s in sims]


def layers_to_drop(similarity: Sequence[float], budget: float) -> list[int]:
    """The layers that layer dropping removes to keep at most ``budget`` of the blocks: the
    ceil((1 - budget) x L) whose input and output are most alike (``similarity``, one value per
    layer from `layer_similarity`), in order. `lors convert --form drop` and the compare row
    "drop" both choose by this."""
    n = len(similarity)
    count = math.ceil((1 - budget) * n - 1e-9)
    if count >= n:
        raise ValueError(f"--budget {budget} keeps none of the {n} layers: layer dropping needs --budget of at "
                         f"least 1/{n} (one layer kept)")
    return sorted(sorted(range(n), key=lambda i: -similarity[i])[:count])


def drop_layers(model: nn.Module, drop: Sequence[int]) -> nn.Module:
    """Remove the layers ``drop`` from ``model``'s stack, in place (HF configs are told the new
    depth, and each kept layer's ``layer_idx`` its new place, as a reloaded model has it).
    Returns ``model``."""
    path, stack = find_layers(model)
    keep = [layer for i, layer in enumerate(stack) if i not in set(drop)]
    for j, layer in enumerate(keep):  # HF attention indexes its KV cache by layer_idx
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = j
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, type(stack)(keep))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(keep)
        if getattr(config, "layer_types", None) is not None:  # per-layer attention kinds
            config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in set(drop)]
    return model
