"""Adaptive LORS (LORS^A): query-generated weights with a shared generator and private terms.

Paper section 3.2, eq. 9-12::

    W_i(q) = reshape(Linear(q)) + sum_k B_ik E_ik(q) A_ik,    E_ik(q) = reshape(Linear(q)) (r x r)

A leading ``heads`` dimension holds independent weights (AdaMixer's sampling groups): with
``shape=(G, d, h)`` every head has its own slice of the generator and its own factors.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from lors.core.static import DEFAULT_INIT, INITS, check_ranks, kaiming_, kaiming_official_, per_layer


def _per_head(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """(..., G, n, K*r) @ (G, K*r, h) -> (..., G, n, h), without copying ``a`` per query."""
    return torch.einsum("...gnk,gkh->...gnh", x, a)


class AdaptiveLors(nn.Module):
    """Generates one (d, h) weight per query (and head) for each of N stacked layers.

    Args:
        num_layers: N.
        query_dim: d_q, the width of the query q.
        shape: ``(d, h)`` or ``(G, d, h)`` for G independent weights per query.
        rank: r, an int or one per layer.
        groups: K, the number of (B, E, A) triples per layer, an int or one per layer.
        bias: give the generator and the E-generators a bias.
        shared: keep the shared term; ``False`` drops it, so W_i(q) is the private part alone
            (the paper's Table 5 ablation) and there is no ``generator``.
        init: ``"paper"`` (section 4.1: Kaiming generator, B and A, read as nn.Linear's
            default, ±1/sqrt(last dimension); zero E-generators) or ``"official"`` (the
            authors' code, li-jl16/LORS: zero generator weight with nn.Linear's default bias,
            zero E-generators, B and A at ``kaiming_uniform_``'s default for the authors'
            shapes (G K, d, r) and (G K, r, h), so ±sqrt(6 / (d r)) for B and
            ±sqrt(6 / (r h)) for A). Either way a fresh module's private part is zero, so it
            equals its shared part. B and A stay non-zero in both: with E zero, a zero B would
            leave B and E without gradient for ever. Without the shared term
            (``shared=False``) the E-generators' biases start uniform in
            ±1/sqrt(d_q) instead of zero, as the official generator's bias does: a weight
            that starts at exactly zero, fed into another generated weight (AdaMixer's
            channel then spatial mixing), would be a saddle that no gradient leaves.
            ``"paper"`` is the default.

    Parameters: ``generator`` Linear(d_q, G*d*h) shared; per layer ``A[i]`` (G, K_i, r_i, h),
    ``B[i]`` (G, K_i, d, r_i) and ``E[i]`` Linear(d_q, G*K_i*r_i*r_i), private.
    """

    def __init__(self, num_layers: int, query_dim: int, shape: Sequence[int],
                 rank: int | Sequence[int] = 16, groups: int | Sequence[int] = 1,
                 bias: bool = True, init: str = DEFAULT_INIT, shared: bool = True, device=None,
                 dtype=None, name: str = "AdaptiveLors"):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"{name}: shape must be (d, h) or (heads, d, h), got {shape}")
        if init not in INITS:
            raise ValueError(f"{name}: init must be one of {INITS}, got {init!r}")
        if num_layers < 1:
            raise ValueError(f"{name}: num_layers must be >= 1, got {num_layers}")
        self.shape, self.heads = shape, (shape[0] if len(shape) == 3 else 1)
        self.d, self.h = shape[-2], shape[-1]
        self.num_layers, self.query_dim, self.init = num_layers, query_dim, init
        self.ranks = per_layer(rank, num_layers, f"{name}: rank")
        self.groups = per_layer(groups, num_layers, f"{name}: groups")
        check_ranks(self.ranks, self.groups, self.d, self.h, name)
        kw = dict(device=device, dtype=dtype)
        G, d, h = self.heads, self.d, self.h
        self.has_bias = bias
        self.generator = nn.Linear(query_dim, G * d * h, bias=bias, **kw) if shared else None  # eq. 10
        self.A = nn.ParameterList(
            nn.Parameter(torch.empty(G, k, r, h, **kw)) for r, k in zip(self.ranks, self.groups))
        self.B = nn.ParameterList(
            nn.Parameter(torch.empty(G, k, d, r, **kw)) for r, k in zip(self.ranks, self.groups))
        self.E = nn.ModuleList(  # eq. 12
            nn.Linear(query_dim, G * k * r * r, bias=bias, **kw) for r, k in zip(self.ranks, self.groups))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.generator is None:
            pass
        elif self.init == "paper":
            self.generator.reset_parameters()  # nn.Linear's Kaiming-uniform
        else:
            nn.init.zeros_(self.generator.weight)
            if self.generator.bias is not None:
                bound = 1.0 / math.sqrt(self.query_dim)
                nn.init.uniform_(self.generator.bias, -bound, bound)
        for a, b, e, r in zip(self.A, self.B, self.E, self.ranks):
            if self.init == "paper":
                kaiming_(a), kaiming_(b)
            else:  # fan-in of the authors' (G K, r, h) and (G K, d, r) factors
                kaiming_official_(a, r * self.h), kaiming_official_(b, self.d * r)
            nn.init.zeros_(e.weight)
            if e.bias is None:
                continue
            if self.generator is None:  # private part alone: start it non-zero (see the docstring)
                bound = 1.0 / math.sqrt(self.query_dim)
                nn.init.uniform_(e.bias, -bound, bound)
            else:
                nn.init.zeros_(e.bias)

    def _parts(self, q: torch.Tensor, i: int):
        """Shared weight (..., G, d, h) or None, B E (..., G, d, K*r) and A (G, K*r, h) for layer i."""
        if q.shape[-1] != self.query_dim:
            raise ValueError(f"query has width {q.shape[-1]}, expected {self.query_dim}")
        lead, G, K, r = q.shape[:-1], self.heads, self.groups[i], self.ranks[i]
        shared = None
        if self.generator is not None:
            shared = self.generator(q).view(*lead, G, self.d, self.h)     # eq. 10
        e = self.E[i](q).view(*lead, G, K, r, r)                          # eq. 12
        be = torch.einsum("gkdr,...gkrs->...gdks", self.B[i], e)           # (..., G, d, K, r)
        return shared, be.reshape(*lead, G, self.d, K * r), self.A[i].reshape(G, K * r, self.h)

    def weight(self, q: torch.Tensor, i: int) -> torch.Tensor:
        """Layer i's generated weight W_i(q) (eq. 9). q: (..., d_q) -> (..., [G,] d, h)."""
        shared, be, a = self._parts(q, i)
        w = _per_head(be, a)  # eq. 11: the sum over k is folded into one matmul
        w = w if shared is None else shared + w
        return w if len(self.shape) == 3 else w.squeeze(-3)

    def delta(self, q: torch.Tensor, i: int) -> torch.Tensor:
        """Layer i's private part sum_k B E(q) A, shape (..., [G,] d, h)."""
        _, be, a = self._parts(q, i)
        w = _per_head(be, a)
        return w if len(self.shape) == 3 else w.squeeze(-3)

    def mix(self, x: torch.Tensor, q: torch.Tensor, i: int) -> torch.Tensor:
        """x @ W_i(q). x: (..., [G,] P, d), q: (..., d_q) -> (..., [G,] P, h).

        Picks the cheaper of two equal computations: materialising W_i(q) (d*K*r*h extra
        multiply-adds per weight) or applying the factors to x, ``x W + (x (B E)) A``
        (P*K*r*(d+h) extra), so it never builds the K separate d x h products of the
        paper's pseudo-code.
        """
        if len(self.shape) == 2:
            x = x.unsqueeze(-3)
        if x.shape[-1] != self.d or x.shape[-3] != self.heads:
            raise ValueError(f"input of shape {tuple(x.shape)} does not fit weights of shape "
                             f"{self.shape}: expected (..., {self.heads}, P, {self.d})")
        shared, be, a = self._parts(q, i)
        P, kr, d, h = x.shape[-2], a.shape[-2], self.d, self.h
        if P * kr * (d + h) < d * kr * h + d * h:
            y = _per_head(x @ be, a)  # (..., G, P, h)
            y = y if shared is None else x @ shared + y
        else:
            w = _per_head(be, a)
            y = x @ (w if shared is None else shared + w)
        return y if len(self.shape) == 3 else y.squeeze(-3)

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, query_dim={self.query_dim}, shape={self.shape}, "
                f"rank={self.ranks}, groups={self.groups}, init={self.init!r}")

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared generator's parameters (none without one); the E generators are the layers' own."""
        return [] if self.generator is None else list(self.generator.parameters())

    def config(self) -> dict:
        return dict(num_layers=self.num_layers, query_dim=self.query_dim, shape=list(self.shape),
                    rank=self.ranks, groups=self.groups, bias=self.has_bias, init=self.init,
                    shared=self.generator is not None)
