"""Turn any stack of identical layers into LORS form, and merge it back for deployment.

``share_layers`` replaces a target ``nn.Linear`` in each of N layers by a ``LorsLinear``
that reads its weight from one ``StaticLors``. The ``StaticLors`` is registered once, in
layer 0's ``LorsLinear`` (state-dict key ``<layers>.0.<target>.lors.*``); the other layers
hold a plain reference, so ``parameters()``, ``state_dict()`` and checkpoints see every
shared tensor exactly once.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from lors.core.static import StaticLors

STACK_TYPES = (nn.ModuleList, nn.Sequential)


class LorsLinear(nn.Module):
    """Layer ``index`` of a ``StaticLors``, used in place of an ``nn.Linear``.

    ``weight`` and ``bias`` are read-only properties holding W_i and b_i, so code that reads
    ``linear.weight`` directly (``nn.MultiheadAttention``'s output projection) still works.
    """

    def __init__(self, lors: StaticLors, index: int):
        super().__init__()
        if not 0 <= index < lors.num_layers:
            raise ValueError(f"index {index} is out of range for a stack of {lors.num_layers}")
        self.index, self.in_features, self.out_features = index, lors.in_features, lors.out_features
        if index == 0:
            self.lors = lors                 # registered: the one owner of the shared tensors
        else:
            self.__dict__["lors"] = lors     # a plain reference, invisible to state_dict

    @property
    def weight(self) -> torch.Tensor:
        return self.lors.weight(self.index)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.lors.layer_bias(self.index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        return self.lors(x, self.index)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the merged weight W_i and bias b_i."""
        w, b = self.weight.detach(), self.bias
        linear = nn.Linear(self.in_features, self.out_features, bias=b is not None,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if b is not None:
                linear.bias.copy_(b)
        return linear

    def extra_repr(self) -> str:
        return f"layer {self.index} of {self.lors.num_layers}, in_features={self.in_features}, " \
               f"out_features={self.out_features}"


def find_layers(module: nn.Module) -> tuple[str, nn.Module]:
    """The stack inside ``module``: itself if it is an ``nn.ModuleList``/``nn.Sequential``,
    else its largest descendant list of at least two children of one class.

    Returns (path relative to ``module``, the list).
    """
    if isinstance(module, STACK_TYPES):
        if len(module) < 2:
            raise ValueError(f"a stack needs at least 2 layers, this {type(module).__name__} "
                             f"has {len(module)}")
        return "", module
    best, best_size = None, -1
    for path, child in module.named_modules():
        kids = list(child.children())
        if not isinstance(child, STACK_TYPES) or len(kids) < 2:
            continue
        if len({type(k) for k in kids}) != 1:
            continue
        size = sum(p.numel() for p in child.parameters())
        if size > best_size:
            best, best_size = (path, child), size
    if best is None:
        raise ValueError(f"no stack of identical layers found in {type(module).__name__}: pass "
                         "the nn.ModuleList (or nn.Sequential) that holds the layers")
    return best


def _signature(module: nn.Module, prefix: str = "") -> list[tuple[str, str, tuple]]:
    """(name, class, parameter shapes) of every submodule; a LorsLinear counts as a leaf."""
    if isinstance(module, LorsLinear):
        return [(prefix, "LorsLinear", (("weight", (module.out_features, module.in_features)),))]
    own = tuple((p, tuple(t.shape)) for p, t in module.named_parameters(recurse=False))
    sig = [(prefix, type(module).__name__, own)]
    for name, child in module.named_children():
        sig += _signature(child, f"{prefix}.{name}" if prefix else name)
    return sig


def check_identical(layers: Sequence[nn.Module]) -> None:
    """Raise a ValueError naming the first difference between layer 0 and another layer."""
    ref = _signature(layers[0])
    for i, layer in enumerate(layers[1:], start=1):
        sig = _signature(layer)
        for (n0, t0, p0), (n1, t1, p1) in zip(ref, sig):
            if (n0, t0) != (n1, t1):
                raise ValueError(f"layer {i} of {len(layers)} has {t1} '{n1}' where layer 0 has "
                                 f"{t0} '{n0}': share_layers needs identical layers")
            if p0 != p1:
                raise ValueError(f"layer {i} of {len(layers)} has {t1} '{n1}' with parameters "
                                 f"{_shapes(p1)}; layer 0 has {_shapes(p0)}: share_layers needs "
                                 "identical layers")
        if len(sig) != len(ref):
            raise ValueError(f"layer {i} of {len(layers)} has {len(sig)} submodules, layer 0 has "
                             f"{len(ref)}: share_layers needs identical layers")


def _shapes(params: tuple) -> str:
    return ", ".join(f"{n} {s}" for n, s in params) or "none"


def linear_names(layer: nn.Module) -> list[str]:
    return [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]


def share_layers(module: nn.Module, targets: str | Iterable[str] | None = None,
                 rank: int | Sequence[int] = 8, groups: int | Sequence[int] = 1,
                 init: str = "paper", shared_bias: bool = False) -> dict[str, StaticLors]:
    """Make the Linears of a stack of identical layers share weights, LORS^T style.

    Args:
        module: an ``nn.ModuleList``/``nn.Sequential`` of identical layers, or a module that
            holds one (the largest such list is used; see ``find_layers``).
        targets: Linear names relative to one layer (``"mlp.fc1"``, ``"attn.qkv"``), or None
            for every ``nn.Linear`` in the layer.
        rank, groups: r and K, an int or one per layer.
        init: ``"paper"`` or ``"official"``, see ``StaticLors``.
        shared_bias: one bias for all layers instead of one per layer (the default).

    The stack is built fresh for training from scratch: the original Linears' values are
    discarded, their dtype and device kept. Returns ``{target: StaticLors}``.
    """
    _, layers = find_layers(module)
    layers = list(layers)
    check_identical(layers)
    available = linear_names(layers[0])
    if targets is None:
        targets = available
        if not targets:
            raise ValueError(f"{type(layers[0]).__name__} has no nn.Linear to share")
    elif isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    for t in targets:
        try:
            found = layers[0].get_submodule(t)
        except AttributeError:
            raise ValueError(f"target '{t}' matches nothing in {type(layers[0]).__name__}; "
                             f"its Linears are {available}") from None
        if isinstance(found, LorsLinear):
            raise ValueError(f"target '{t}' is already shared; merge it first to share it again")
        if not isinstance(found, nn.Linear):
            raise ValueError(f"target '{t}' is a {type(found).__name__}, not an nn.Linear; "
                             f"the Linears are {available}")
    stacks = {}
    for t in targets:
        ref = layers[0].get_submodule(t)
        lors = StaticLors(len(layers), ref.in_features, ref.out_features, rank=rank,
                          groups=groups, bias=ref.bias is not None, shared_bias=shared_bias,
                          init=init, device=ref.weight.device, dtype=ref.weight.dtype,
                          name=f"target '{t}'")
        lors.target = t
        parent, _, leaf = t.rpartition(".")
        for i, layer in enumerate(layers):
            setattr(layer.get_submodule(parent) if parent else layer, leaf, LorsLinear(lors, i))
        stacks[t] = lors
    return stacks


def merge(module: nn.Module) -> nn.Module:
    """Replace every ``LorsLinear`` in ``module`` by a plain ``nn.Linear`` with its merged
    weight, in place; outputs are unchanged. Returns ``module``."""
    if isinstance(module, LorsLinear):
        raise ValueError("merge a module that holds LorsLinears, or call .to_linear() on it")
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, LorsLinear)]
    for name, lin in found:
        parent, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, lin.to_linear())
    return module

