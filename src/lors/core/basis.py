"""Basis sharing: N stacked Linears that read (or write) through one shared low-rank basis.

``W_i = C_i P`` (``side="in"``: P (k, in) shared, every layer reads the same k directions of
its input, C_i (out, k) private) or ``W_i = P C_i`` (``side="out"``: P (out, k) shared, C_i
(k, in) private). With one layer per basis this is a per-layer truncated SVD. It is the form
``convert_layers(form="basis")`` fills from pretrained weights; ``LorsLinear`` uses it like a
``StaticLors`` (each layer's weight, bias and forward by index), so ``merge``, ``lors.save`` and
``count_parameters`` treat it the same way: the basis is stored and counted once.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lors.core.stack import LayerStack

SIDES = ("in", "out")


class SharedBasis(LayerStack, kind="basis"):
    """The weights of N stacked Linears as one shared basis and per-layer coefficients.

    Args:
        num_layers: N, the layers that share the basis.
        in_features, out_features: shape of each layer's Linear.
        rank: k, the width of the basis, 0 <= k <= in_features (``side="in"``) or
            out_features (``side="out"``).
        side: ``"in"`` (a shared input basis, as Basis Sharing does) or ``"out"``.
        bias: give each layer its own bias.

    Parameters: ``basis`` (k, in) or (out, k), shared; ``coeffs[i]`` (out, k) or (k, in) and
    ``bias`` (N, out) private.
    """

    def __init__(self, num_layers: int, in_features: int, out_features: int, rank: int,
                 side: str = "in", bias: bool = True, device=None, dtype=None,
                 name: str = "SharedBasis"):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"{name}: num_layers must be >= 1, got {num_layers}")
        if side not in SIDES:
            raise ValueError(f"{name}: side must be one of {SIDES}, got {side!r}")
        limit = in_features if side == "in" else out_features
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= limit:
            raise ValueError(f"{name}: rank {rank!r} is out of range for a basis on the {side}put side "
                             f"of a ({out_features}, {in_features}) weight; use 0 <= rank <= {limit}")
        self.num_layers, self.in_features, self.out_features = num_layers, in_features, out_features
        self.rank, self.side = rank, side
        kw = dict(device=device, dtype=dtype)
        shape = (rank, in_features) if side == "in" else (out_features, rank)
        coeff = (out_features, rank) if side == "in" else (rank, in_features)
        self.basis = nn.Parameter(torch.empty(shape, **kw))
        self.coeffs = nn.ParameterList(nn.Parameter(torch.empty(coeff, **kw)) for _ in range(num_layers))
        self.bias = nn.Parameter(torch.empty(num_layers, out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default for each factor (±1/sqrt(fan-in)) and bias; conversion
        overwrites them all."""
        for t in [self.basis, *self.coeffs]:
            bound = 1.0 / math.sqrt(max(1, t.shape[-1]))
            nn.init.uniform_(t, -bound, bound)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def weight(self, i: int) -> torch.Tensor:
        """W_i, shape (out, in)."""
        return self.coeffs[i] @ self.basis if self.side == "in" else self.basis @ self.coeffs[i]

    def layer_bias(self, i: int) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[i]

    def forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Apply layer i through the rank-k bottleneck. x: (..., in) -> (..., out)."""
        first, second = (self.basis, self.coeffs[i]) if self.side == "in" else (self.coeffs[i], self.basis)
        return F.linear(F.linear(x, first), second, self.layer_bias(i))  # (..., k) -> (..., out)

    def layer_repr(self, i: int) -> str:
        return f"basis={self.side}put side, rank={self.rank}"

    def select(self, layers) -> "SharedBasis":
        """A SharedBasis of the given layers: the basis and their coefficients and biases."""
        layers = list(layers)
        b = self.basis
        new = SharedBasis(len(layers), self.in_features, self.out_features, self.rank, side=self.side,
                          bias=self.bias is not None, device=b.device, dtype=b.dtype)
        with torch.no_grad():
            new.basis.copy_(b)
            for j, i in enumerate(layers):
                new.coeffs[j].copy_(self.coeffs[i])
            if self.bias is not None:
                new.bias.copy_(self.bias[layers])
        return new

    def shared_parameters(self) -> list[nn.Parameter]:
        """The basis."""
        return [self.basis]

    def config(self) -> dict:
        """Constructor arguments, for checkpoints."""
        return dict(num_layers=self.num_layers, in_features=self.in_features,
                    out_features=self.out_features, rank=self.rank, side=self.side,
                    bias=self.bias is not None)
