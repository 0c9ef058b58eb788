"""Turn any stack of identical layers into LORS form, and merge it back for deployment.

``share_layers`` replaces a target ``nn.Linear`` in each of N layers by a ``LorsLinear``
that reads its weight from one ``StaticLors``. The ``StaticLors`` is registered once, in the
stack that holds the layers (``<layers>.lors.<target>.0``, see ``lors.core.stack``); each
``LorsLinear`` refers to it without registering it. ``parameters()``, ``state_dict()``,
``load_state_dict()`` and ``copy.deepcopy`` are then plain torch and see each shared tensor
once.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from lors.core.stack import STACK_TYPES, LayerStack, check_owner, owner, refer, release, shared_stacks
from lors.core.static import DEFAULT_INIT, StaticLors, per_layer


class LorsLinear(nn.Module):
    """Layer ``index`` of a stack module (``StaticLors``, ``SharedBasis``), in place of an
    ``nn.Linear``.

    ``weight`` and ``bias`` are read-only properties holding W_i and b_i, so code that reads
    ``linear.weight`` directly (``nn.MultiheadAttention``'s output projection) still works.
    The stack module (``.lors``) is owned by the stack of layers; this layer only refers to it,
    so it holds no parameters of its own.
    """

    def __init__(self, lors: LayerStack, index: int):
        super().__init__()
        if not 0 <= index < lors.num_layers:
            raise ValueError(f"index {index} is out of range for a stack of {lors.num_layers}")
        self.index, self.in_features, self.out_features = index, lors.in_features, lors.out_features
        refer(self, "_lors", lors)  # the stack owns it

    @property
    def lors(self) -> LayerStack:
        return self._lors

    @property
    def weight(self) -> torch.Tensor:
        return self._lors.weight(self.index)

    @property
    def bias(self) -> torch.Tensor | None:
        return self._lors.layer_bias(self.index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        return self._lors(x, self.index)

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
        lors, i = self._lors, self.index
        where = f" of target '{lors.target}'" if lors.target else ""
        return (f"layer {i} of {lors.num_layers}{where}, in_features={self.in_features}, "
                f"out_features={self.out_features}, {lors.layer_repr(i)}")


def find_layers(module: nn.Module) -> tuple[str, nn.Module]:
    """The stack inside ``module``: itself if it is an ``nn.ModuleList``/``nn.Sequential``,
    else its largest descendant list of at least two children of one class.

    Returns (path relative to ``module``, the list).
    """
    if isinstance(module, (list, tuple)):
        raise ValueError(f"got a Python {type(module).__name__} of {len(module)} layers, which does not "
                         "register them as submodules: pass nn.ModuleList(layers) and keep using it")
    if not isinstance(module, nn.Module):
        raise ValueError(f"got a {type(module).__name__}, not an nn.Module: pass the nn.ModuleList "
                         "(or nn.Sequential) that holds the layers, or a model that holds one")
    if isinstance(module, STACK_TYPES):
        if len(module) < 2:
            raise ValueError(f"a stack needs at least 2 layers, this {type(module).__name__} "
                             f"has {len(module)}")
        return "", module
    best, best_size = None, -1
    for path, child in module.named_modules():
        if not isinstance(child, STACK_TYPES) or len(child) < 2:
            continue
        kinds = {type(k) for k in child}  # a shared stack's iteration leaves out its 'lors' entry
        if len(kinds) != 1 or issubclass(next(iter(kinds)), LayerStack):  # not the stack modules
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


def check_identical(layers: Sequence[nn.Module], caller: str = "share_layers") -> None:
    """Raise a ValueError naming the first difference between layer 0 and another layer
    (``caller``, the function that needs them identical, ends the message)."""
    ref = _signature(layers[0])
    for i, layer in enumerate(layers[1:], start=1):
        sig = _signature(layer)
        for (n0, t0, p0), (n1, t1, p1) in zip(ref, sig):
            if (n0, t0) != (n1, t1):
                raise ValueError(f"layer {i} of {len(layers)} has {t1} '{n1}' where layer 0 has "
                                 f"{t0} '{n0}': {caller} needs identical layers")
            if p0 != p1:
                raise ValueError(f"layer {i} of {len(layers)} has {t1} '{n1}' with parameters "
                                 f"{_shapes(p1)}; layer 0 has {_shapes(p0)}: {caller} needs "
                                 "identical layers")
        if len(sig) != len(ref):
            raise ValueError(f"layer {i} of {len(layers)} has {len(sig)} submodules, layer 0 has "
                             f"{len(ref)}: {caller} needs identical layers")


def _shapes(params: tuple) -> str:
    return ", ".join(f"{n} {s}" for n, s in params) or "none"


def linear_names(layer: nn.Module) -> list[str]:
    return [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]


CONV1D_HINT = ("GPT-2's transposed Linear: replace each Conv1D by an nn.Linear holding weight.T "
               "first (the weights of GPT-2-family models)")


def pick_targets(layer: nn.Module, targets: str | Iterable[str] | None, verb: str = "share") -> list[str]:
    """Check ``targets`` against ``layer`` (a ValueError names a bad one); None: every Linear.
    ``verb`` ("share", "convert") is what the caller does with them, for the messages."""
    available, kind = linear_names(layer), type(layer).__name__
    if targets is None:
        if available:
            return available
        shared = [n for n, m in layer.named_modules() if isinstance(m, LorsLinear)]
        conv1d = [n for n, m in layer.named_modules() if type(m).__name__ == "Conv1D"]
        if shared:
            raise ValueError(f"every Linear of {kind} is already shared ({', '.join(shared)}): "
                             f"call lors.merge on the stack first to {verb} it again")
        if conv1d:
            raise ValueError(f"{kind} holds Conv1D layers ({', '.join(conv1d)}) and no nn.Linear: "
                             f"{CONV1D_HINT}")
        raise ValueError(f"{kind} has no nn.Linear to {verb}: pass a stack of layers that hold "
                         "nn.Linear modules")
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("targets is empty: name at least one Linear, or pass None for all")
    for t in targets:
        try:
            found = layer.get_submodule(t)
        except AttributeError:
            raise ValueError(f"target '{t}' matches nothing in {kind}; its Linears are "
                             f"{available}") from None
        if isinstance(found, LorsLinear):
            raise ValueError(f"target '{t}' is already shared; merge it first to {verb} it again")
        if not isinstance(found, nn.Linear):
            hint = f" ({CONV1D_HINT})" if type(found).__name__ == "Conv1D" else ""
            raise ValueError(f"target '{t}' is a {type(found).__name__}, not an nn.Linear{hint}; "
                             f"the Linears are {available}")
    return targets


def share_layers(module: nn.Module, targets: str | Iterable[str] | None = None,
                 rank: int | Sequence[int] = 8, groups: int | Sequence[int] = 1,
                 init: str = DEFAULT_INIT, shared_bias: bool = False) -> dict[str, StaticLors]:
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
    discarded, their dtype and device kept. Every argument is checked before the stack is
    changed; a bad one is a ValueError. Returns ``{target: StaticLors}``.
    """
    _, stack = find_layers(module)
    layers = list(stack)
    check_identical(layers)
    rank = per_layer(rank, len(layers), "rank")
    groups = per_layer(groups, len(layers), "groups")
    targets = pick_targets(layers[0], targets)
    check_owner(stack)
    stacks = {}
    for t in targets:  # build every StaticLors (which checks rank, groups, init) first
        ref = layers[0].get_submodule(t)
        stacks[t] = StaticLors(len(layers), ref.in_features, ref.out_features, rank=rank,
                               groups=groups, bias=ref.bias is not None, shared_bias=shared_bias,
                               init=init, device=ref.weight.device, dtype=ref.weight.dtype,
                               name=f"target '{t}'")
    for t, lors in stacks.items():
        attach(stack, t, lors, range(len(layers)))
    return stacks


def attach(stack: nn.Module, target: str, module: LayerStack, members: Sequence[int]) -> None:
    """Register ``module`` once in ``stack`` (under ``lors.<target>``) and put
    ``LorsLinear(module, j)`` at ``target`` of ``stack[members[j]]`` for every j: how a
    StaticLors or SharedBasis that serves some layers of a stack is wired in."""
    module.target, module.members = target, list(members)
    owner(stack, create=True).add(target, module)
    parent, _, leaf = target.rpartition(".")
    for j, i in enumerate(module.members):
        layer = stack[i]
        setattr(layer.get_submodule(parent) if parent else layer, leaf, LorsLinear(module, j))


def merge(module: nn.Module) -> nn.Module:
    """Replace every ``LorsLinear`` in ``module`` by a plain ``nn.Linear`` with its merged
    weight, in place; outputs are unchanged. A stack whose shared modules no longer serve any
    of its layers releases them (and is a plain nn.ModuleList/nn.Sequential again).
    Returns ``module``."""
    if isinstance(module, LorsLinear):
        raise ValueError("merge a module that holds LorsLinears, or call .to_linear() on it")
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, LorsLinear)]
    for name, lin in found:
        parent, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, lin.to_linear())
    for _, stack in shared_stacks(module):
        used = {id(m.lors) for layer in stack for m in layer.modules() if isinstance(m, LorsLinear)}
        release(stack, used)
    return module
