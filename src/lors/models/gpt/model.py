"""A decoder-only transformer in the nanoGPT mould, with LORS or tied (ALBERT-style) layers.

Pre-LayerNorm blocks, causal ``F.scaled_dot_product_attention``, a GELU MLP, the input
embedding tied to the output projection, learned or rotary positions. ``model.sharing``:
  "none"  every block has its own weights (dense);
  "lors"  the block Linears named in ``lors.targets`` share one weight per target plus a private
          low-rank residual per layer (`lors.share_layers`, LORS^T);
  "tied"  every block uses block 0's Linear weights; norms and biases stay per layer (no private
          low-rank part: sharing without residuals).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lors.models.gpt.config import LMConfig
from lors.models.sharing import apply_sharing


def rotary(x: Tensor, positions: Tensor) -> Tensor:
    """Rotate pairs of channels of x (B, H, T, D) by position-dependent angles (RoFormer)."""
    d = x.shape[-1]
    freq = 10000.0 ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # (D/2,)
    angle = positions.float()[:, None] * freq[None]  # (T, D/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool, dropout: float, use_rotary: bool):
        super().__init__()
        self.n_head, self.dropout, self.use_rotary = n_head, dropout, use_rotary
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, C) -> (B, T, C), causal."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if self.use_rotary:
            pos = torch.arange(T, device=x.device)
            q, k = rotary(q, pos), rotary(k, pos)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int, hidden: int, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(n_embd, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, mlp_ratio: int, bias: bool, dropout: float, use_rotary: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = Attention(n_embd, n_head, bias, dropout, use_rotary)
        self.ln2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, mlp_ratio * n_embd, bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 mlp_ratio: int = 4, bias: bool = True, dropout: float = 0.0, positions: str = "learned"):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd) if positions == "learned" else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, mlp_ratio, bias, dropout, positions == "rotary")
                                    for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input and output embedding
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx: Tensor) -> Tensor:
        """idx: (B, T) int64 with T <= block_size -> logits (B, T, vocab_size)."""
        B, T = idx.shape
        if T > self.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context window "
                             f"model.block_size={self.block_size}: crop it to the last {self.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, top_k: int | None = None,
                 temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Extend idx (B, T) by ``max_new_tokens``: greedy if ``top_k`` is None, else sampled
        from the ``top_k`` most likely tokens (with ``generator``). Returns (B, T + new)."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.block_size:])[:, -1, :]  # (B, V)
            if top_k is None:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                probs = F.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def build_gpt(cfg: LMConfig, device: torch.device | str | None = None) -> GPT:
    """The GPT that ``cfg.model`` describes, with ``cfg.lors`` applied when sharing is "lors"."""
    m = cfg.model
    with torch.device(device) if device is not None else torch.device("cpu"):
        model = GPT(m.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd, m.mlp_ratio, m.bias,
                    m.dropout, m.positions)
    # LORS's shared part starts as the dense GPT's Linears do (N(0, 0.02), residual projections scaled)
    apply_sharing(model.blocks, m.sharing, cfg.lors, std=0.02, residual_std=0.02 / math.sqrt(2 * m.n_layer))
    return model


def embedding_parameters(model: GPT) -> int:
    """The token embedding (which the output layer shares) and learned positions: what every
    variant of a comparison has in full, left out of its non-embedding count."""
    return model.wte.weight.numel() + (model.wpe.weight.numel() if model.wpe is not None else 0)
