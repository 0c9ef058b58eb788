"""Static LORS (LORS^T): one shared weight for N stacked layers plus private low-rank terms.

Paper section 3.2, eq. 7-8: ``W_i = W_shared + sum_k B_ik A_ik``.

Weights follow ``nn.Linear``'s layout, ``(out_features, in_features)``, so ``B_ik`` is the
output-side factor ``(out, r)`` and ``A_ik`` the input-side factor ``(r, in)``, as in LoRA.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lors.core.stack import LayerStack

INITS = ("paper", "official")
DEFAULT_INIT = "paper"  # the one default everywhere: section 4.1, what the paper reports


def per_layer(value, count: int, what: str, unit: str = "layer", count_key: str | None = None,
              minimum: int | None = None) -> list[int]:
    """"An int or one per layer", checked once for every caller: ``value`` (an int, or a list of
    ``count`` ints) as one int per layer (or stage, ``unit``). A ValueError names ``what`` (a
    name such as ``rank``, or ``config key 'lors.rank'``) and the fix: a float (with the int to
    use), a bool or string, a list of the wrong length (against ``count_key`` where given), a
    value below ``minimum``."""
    listed = isinstance(value, (list, tuple))
    ints = (isinstance(v, int) and not isinstance(v, bool) for v in (value if listed else [value]))
    if not (listed or isinstance(value, int)) or not all(ints):
        hint = ""
        if isinstance(value, float) and math.isfinite(value) and what.isidentifier():
            hint = f"; use {what}={max(1, round(value))}"
        raise ValueError(f"{what} must be an int or a list of {count} ints (one per {unit}), got {value!r}{hint}")
    if minimum is not None:
        for i, v in enumerate(value if listed else [value]):
            if v < minimum:
                raise ValueError(f"{what[:-1]}[{i}]' must be >= {minimum}, got {v}" if listed and what.endswith("'")
                                 else f"{what}{f'[{i}]' if listed else ''} must be >= {minimum}, got {v}")
    if listed and len(value) != count:
        if count_key:
            raise ValueError(f"{what} has {len(value)} values {list(value)} but {count_key} is {count}: give "
                             f"one value per {unit} or a single int")
        raise ValueError(f"{what} must be an int or a list of {count} ints (one per {unit}), got {value!r}")
    return list(value) if listed else [value] * count


def check_ranks(ranks: list[int], groups: list[int], d: int, h: int, name: str,
                full_range: bool = False) -> None:
    """Ranks must satisfy 1 <= r < min(d, h), or 0 <= r <= min(d, h) with ``full_range``;
    groups must be >= 1."""
    for i, (r, k) in enumerate(zip(ranks, groups)):
        ok = 0 <= r <= min(d, h) if full_range else 1 <= r < min(d, h)
        if not ok:
            allowed = f"0 <= rank <= {min(d, h)}" if full_range else f"1 <= rank < {min(d, h)}"
            raise ValueError(
                f"{name}: rank {r} for layer {i} is out of range for a ({d}, {h}) weight; "
                f"use {allowed}")
        if k < 1:
            raise ValueError(f"{name}: groups {k} for layer {i} must be >= 1")


def kaiming_(tensor: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default Kaiming-uniform init, applied to each (rows, fan_in) slice:
    uniform in ±1/sqrt(last dimension)."""
    bound = 1.0 / math.sqrt(max(1, tensor.shape[-1]))  # a rank-0 factor has no entries
    return nn.init.uniform_(tensor, -bound, bound)


def kaiming_official_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """``nn.init.kaiming_uniform_`` at its defaults (a=0, gain sqrt(2)) for a tensor whose
    fan-in is ``fan_in``: uniform in ±sqrt(6 / fan_in). The authors' LORS code applies it to
    its factors; ``fan_in`` is the product of all dimensions but the first *of the tensor as
    that code shapes it*, which callers pass because the shapes here differ."""
    bound = math.sqrt(6.0 / fan_in)
    return nn.init.uniform_(tensor, -bound, bound)


class _FactoredLinear(torch.autograd.Function):
    """y = x W^T + (x A^T) B^T + bias with a leaner backward than autograd's composite: the
    gradients of W and A come from one product that reads x once, ``x^T [g, g B]``, and the
    input gradient ``g W + (g B) A`` is accumulated in place. x: (M, in).

    The weight gradients are computed as (in, out + K*r) and handed back transposed, the
    orientation a plain ``nn.Linear``'s backward uses: with few rows and a wide input, the
    other orientation, ``[g, g B]^T x``, is a slower product on CPU (1.18x against 1.06x for
    the whole LORS^T stack in ``benchmarks/bench_core.py``, case (a))."""

    @staticmethod
    def forward(ctx, x, w, a, b, bias):
        xa = x @ a.t()                                                   # (M, K*r)
        y = torch.addmm(bias, x, w.t()) if bias is not None else x @ w.t()
        y.addmm_(xa, b.t())
        ctx.save_for_backward(x, w, a, b, xa)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, a, b, xa = ctx.saved_tensors
        gb = g @ b                                                       # (M, K*r)
        grad_x = grad_w = grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ w).addmm_(gb, a)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gwa = x.t() @ torch.cat([g, gb], dim=1)                      # (in, out + K*r)
            grad_w, grad_a = gwa[:, : w.shape[0]].t(), gwa[:, w.shape[0]:].t()
        if ctx.needs_input_grad[3]:
            grad_b = g.t() @ xa
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = g.sum(0)
        return grad_x, grad_w, grad_a, grad_b, grad_bias


class StaticLors(LayerStack, kind="static"):
    """The weights of N stacked Linears: a shared part and per-layer low-rank residuals.

    Args:
        num_layers: N, the number of stacked layers.
        in_features, out_features: shape of each layer's Linear.
        rank: r, an int or one per layer.
        groups: K, the number of low-rank pairs per layer, an int or one per layer
            (the paper uses ``[1, 1, 2, 2, 3, 3]`` for its adaptive parts).
        bias: give each layer a bias (per-layer, since biases are cheap and layer-specific).
        shared_bias: with ``bias``, keep one bias for all layers instead.
        init: ``"paper"`` (section 4.1: Kaiming W_shared and B, zero A; "Kaiming" read as
            nn.Linear's default, ±1/sqrt(in) for W_shared, ±1/sqrt(r) for B; biases as
            nn.Linear's) or ``"official"`` (the authors' code, li-jl16/LORS: W_shared at
            nn.Linear's default, ±1/sqrt(in); each A at ``kaiming_uniform_``'s default for
            the authors' (r, in) shape, ±sqrt(6/in); B zero, as LoRA does; biases zero).
            Both start every layer equal to the shared weight; ``"paper"`` is the default
            because it is what the paper reports.
        full_range: allow rank 0 (the layer is the shared weight) and full rank
            min(out, in) (any weight exactly), as ``convert_layers`` does; otherwise
            1 <= rank < min(out, in).

    Parameters: ``shared_weight`` (out, in); ``A[i]`` (K_i, r_i, in) and ``B[i]``
    (K_i, out, r_i) private; ``bias`` (N, out), or (1, out) when shared.
    """

    def __init__(self, num_layers: int, in_features: int, out_features: int,
                 rank: int | Sequence[int] = 8, groups: int | Sequence[int] = 1,
                 bias: bool = True, shared_bias: bool = False, init: str = DEFAULT_INIT,
                 full_range: bool = False, device=None, dtype=None, name: str = "StaticLors"):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"{name}: num_layers must be >= 1, got {num_layers}")
        if init not in INITS:
            raise ValueError(f"{name}: init must be one of {INITS}, got {init!r}")
        self.num_layers, self.in_features, self.out_features = num_layers, in_features, out_features
        self.ranks = per_layer(rank, num_layers, f"{name}: rank")
        self.groups = per_layer(groups, num_layers, f"{name}: groups")
        check_ranks(self.ranks, self.groups, out_features, in_features, name, full_range)
        self.init, self.shared_bias, self.full_range = init, shared_bias, full_range
        kw = dict(device=device, dtype=dtype)
        self.shared_weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.A = nn.ParameterList(
            nn.Parameter(torch.empty(k, r, in_features, **kw)) for r, k in zip(self.ranks, self.groups))
        self.B = nn.ParameterList(
            nn.Parameter(torch.empty(k, out_features, r, **kw)) for r, k in zip(self.ranks, self.groups))
        rows = 1 if shared_bias else num_layers
        self.bias = nn.Parameter(torch.empty(rows, out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        kaiming_(self.shared_weight)  # the authors' bias-free nn.Linear: ±1/sqrt(in)
        for a, b in zip(self.A, self.B):
            if self.init == "paper":
                kaiming_(b), nn.init.zeros_(a)
            else:  # the authors' A is (r, in): fan-in = in
                kaiming_official_(a, self.in_features), nn.init.zeros_(b)
        if self.bias is None:
            pass
        elif self.init == "paper":
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        else:  # the authors' per-layer output bias starts at zero
            nn.init.zeros_(self.bias)

    def factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's K groups folded into one pair: B (out, K*r) and A (K*r, in)."""
        a, b = self.A[i], self.B[i]  # (K, r, in), (K, out, r)
        return b.permute(1, 0, 2).reshape(self.out_features, -1), a.reshape(-1, self.in_features)

    def delta(self, i: int) -> torch.Tensor:
        """W_i^private = sum_k B_ik A_ik (eq. 8), shape (out, in)."""
        b, a = self.factors(i)
        return b @ a

    def weight(self, i: int) -> torch.Tensor:
        """W_i = W_shared + W_i^private (eq. 7), shape (out, in)."""
        b, a = self.factors(i)
        return torch.addmm(self.shared_weight, b, a)  # the sum over k is folded into one matmul

    def layer_bias(self, i: int) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return self.bias[0 if self.shared_bias else i]

    def forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Apply layer i. x: (..., in) -> (..., out).

        Uses whichever of two equal computations needs fewer multiply-adds: with few rows,
        ``x W^T + (x A^T) B^T`` never forms the (out, in) private matrix; with many rows,
        materialising ``W_i`` once and calling one ``F.linear`` is cheaper.
        """
        b, a = self.factors(i)
        rows = x.numel() // self.in_features
        if rows * (self.in_features + self.out_features) < self.in_features * self.out_features:
            if x.device.type == "meta" or torch.is_autocast_enabled(x.device.type):
                # meta tensors (FLOP counts) and autocast's mixed dtypes: autograd's composite
                y = F.linear(x, self.shared_weight, self.layer_bias(i))
                return y + F.linear(F.linear(x, a), b)  # (..., K*r) -> (..., out)
            y = _FactoredLinear.apply(x.reshape(rows, self.in_features), self.shared_weight, a, b,
                                      self.layer_bias(i))
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, torch.addmm(self.shared_weight, b, a), self.layer_bias(i))

    def layer_repr(self, i: int) -> str:
        return f"rank={self.ranks[i]}, groups={self.groups[i]}"

    def select(self, layers) -> "StaticLors":
        """A StaticLors of the given layers: the shared weight (and shared bias) and their factors."""
        layers = list(layers)
        w = self.shared_weight
        new = StaticLors(len(layers), self.in_features, self.out_features,
                         rank=[self.ranks[i] for i in layers], groups=[self.groups[i] for i in layers],
                         bias=self.bias is not None, shared_bias=self.shared_bias, init=self.init,
                         full_range=self.full_range, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.shared_weight.copy_(w)
            for j, i in enumerate(layers):
                new.A[j].copy_(self.A[i]), new.B[j].copy_(self.B[i])
            if self.bias is not None:
                new.bias.copy_(self.bias if self.shared_bias else self.bias[layers])
        return new

    def shared_parameters(self) -> list[nn.Parameter]:
        """W_shared, and the bias when it is one for all layers (``shared_bias``)."""
        return [self.shared_weight, *([self.bias] if self.bias is not None and self.shared_bias else [])]

    def config(self) -> dict:
        """Constructor arguments, for checkpoints."""
        config = dict(num_layers=self.num_layers, in_features=self.in_features,
                      out_features=self.out_features, rank=self.ranks, groups=self.groups,
                      bias=self.bias is not None, shared_bias=self.shared_bias, init=self.init)
        if self.full_range:  # only when set: layouts saved before it existed read the same
            config["full_range"] = True
        return config
