"""Who owns a shared tensor: the stack of layers, once; the layers only refer to it.

A *layer stack* module (``StaticLors``, ``SharedBasis``) holds the weights of several stacked
Linears. ``share_layers`` and ``convert_layers`` register each one once, in the
``nn.ModuleList``/``nn.Sequential`` that holds the layers, under a hidden entry ``lors``::

    layers                          SharedModuleList: len, iteration and indexing see the layers
      0 ... N-1                     the layers; each LorsLinear refers to its stack module
      lors.<target>.<group>         every stack module of that target, once

so a state-dict key reads ``layers.lors.self_attn.q_proj.0.shared_weight``. ``parameters()``,
``state_dict()``, ``load_state_dict()``, ``copy.deepcopy`` of the model and FSDP's
``fully_shard`` are plain torch: the shared tensors belong to the stack, as a tied embedding
belongs to the model that holds both its users.

Layers moved out of the stack keep working (their LorsLinears still refer to the stack
modules) but no longer own them: ``stack[1:]``, ``copy.deepcopy(stack[2])`` and a layer of
``del``'s result hold no shared tensor in ``parameters()``. ``substack`` extracts some layers
as a stack of their own.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Iterator, Sequence

import torch
from torch import nn

OWNER = "lors"  # the stack's entry that owns its shared modules
STACK_TYPES = (nn.ModuleList, nn.Sequential)


def refer(module: nn.Module, name: str, target: nn.Module) -> None:
    """Let ``module.<name>`` be ``target`` without registering it as a submodule: ``target`` is
    owned once elsewhere (by the stack, or an attention block) and ``module`` only uses it, so
    ``parameters()``, ``state_dict()`` and FSDP see it under its owner alone. ``copy.deepcopy``
    of a model copies both into one new ``target``."""
    object.__setattr__(module, name, target)


class LayerStack(nn.Module):
    """The weights of ``num_layers`` stacked Linears, applied by layer index: what a
    ``LorsLinear`` reads, what counting and serialization see.

    Subclasses name their ``kind`` (the class statement's ``kind=...``: the name saved layouts
    give it, `LayerStack.of_kind` finds the class again), set ``num_layers``, ``in_features``,
    ``out_features`` and implement ``weight``, ``layer_bias``, ``forward``, ``config``,
    ``layer_repr``, ``select`` and ``shared_parameters``. ``target`` and ``members`` say where
    the module is wired in (``attach`` sets them): layer j of the module is
    ``<stack>[members[j]].<target>``.
    """

    kind: str
    num_layers: int
    in_features: int
    out_features: int
    target: str | None = None
    members: list[int] | None = None
    _kinds: dict[str, type["LayerStack"]] = {}

    def __init_subclass__(cls, kind: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if kind is not None:
            if kind in LayerStack._kinds:
                raise TypeError(f"LayerStack kind {kind!r} is taken by {LayerStack._kinds[kind].__name__}")
            cls.kind = kind
            LayerStack._kinds[kind] = cls

    @staticmethod
    def kinds() -> tuple[str, ...]:
        """The registered kinds ("static", "basis")."""
        return tuple(LayerStack._kinds)

    @staticmethod
    def of_kind(kind: str) -> type["LayerStack"]:
        """The class of ``kind`` ("static", "basis"); ValueError naming the known ones."""
        try:
            return LayerStack._kinds[kind]
        except KeyError:
            raise ValueError(f"unknown LORS stack kind {kind!r}: known kinds are "
                             f"{', '.join(LayerStack.kinds())}") from None

    def shared_parameters(self) -> list[nn.Parameter]:
        """The tensors every layer reads (counted as shared); the others are the layers' own."""
        raise NotImplementedError

    def weight(self, i: int) -> torch.Tensor:
        """W_i, shape (out, in)."""
        raise NotImplementedError

    def layer_bias(self, i: int) -> torch.Tensor | None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Apply layer i. x: (..., in) -> (..., out)."""
        raise NotImplementedError

    def config(self) -> dict:
        """Constructor arguments, for checkpoints."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        """The constructor arguments (`config`), as ``print(model)`` shows them."""
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    def layer_repr(self, i: int) -> str:
        """What ``LorsLinear``'s repr says of layer i (its rank, groups or basis)."""
        raise NotImplementedError

    def select(self, layers: Sequence[int]) -> "LayerStack":
        """A new module holding copies of the shared tensors and of the given layers' own."""
        raise NotImplementedError


class _Owner(nn.Module):
    """The stack's ``lors`` entry: ``<target path>.<group>`` -> a LayerStack module."""

    def groups(self) -> dict[str, nn.ModuleList]:
        """{target: its ModuleList of stack modules}, in the order they were added."""
        return {name: m for name, m in self.named_modules() if isinstance(m, nn.ModuleList)}

    def add(self, target: str, module: LayerStack) -> None:
        node, parts = self, target.split(".")
        for i, part in enumerate(parts):
            if part not in node._modules:  # the last name holds the list, the others are folders
                node.add_module(part, nn.ModuleList() if i == len(parts) - 1 else nn.Module())
            node = node._modules[part]
        node.append(module)

    def forward(self, *args, **kwargs):
        raise RuntimeError("the 'lors' entry of a shared stack owns its shared weights; it is not a layer")


class _SharedStackMixin:
    """Indexing, length and iteration of an nn.ModuleList/nn.Sequential that see only the
    layers, not the ``lors`` entry that owns the shared modules."""

    def _layer_keys(self) -> list[str]:
        return [k for k in self._modules if k != OWNER]

    def __len__(self) -> int:
        return len(self._modules) - (OWNER in self._modules)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter([m for k, m in self._modules.items() if k != OWNER])

    def _key(self, idx) -> str:
        keys = self._layer_keys()
        if not -len(keys) <= idx < len(keys):
            raise IndexError(f"index {idx} is out of range")
        return keys[idx]

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # the layers only: a plain container of the base class
            return self._base(*list(self)[idx]) if self._base is nn.Sequential \
                else self._base(list(self)[idx])
        return self._modules[self._key(idx)]

    def __setitem__(self, idx, module) -> None:
        setattr(self, self._key(idx), module)

    def __delitem__(self, idx) -> None:
        keys = self._layer_keys()
        for k in (keys[idx] if isinstance(idx, slice) else [self._key(idx)]):
            delattr(self, k)
        self._renumber(list(self))

    def insert(self, index: int, module: nn.Module) -> None:
        layers = list(self)
        layers.insert(index, module)
        self._renumber(layers)

    def _renumber(self, layers: list[nn.Module]) -> None:
        owner = self._modules.get(OWNER)
        self._modules = OrderedDict((str(i), m) for i, m in enumerate(layers))
        if owner is not None:
            self._modules[OWNER] = owner

    def __dir__(self):
        return [k for k in super().__dir__() if k != OWNER]

    def __repr__(self) -> str:
        owner = self._modules.get(OWNER)
        head = self._base.__repr__(self)  # the base repr lists the layers
        if owner is None:
            return head
        n = sum(len(g) for g in owner.groups().values())
        return head[:-1] + f"  (lors): {n} shared stack module(s) of {sorted(owner.groups())}\n)"


class SharedModuleList(_SharedStackMixin, nn.ModuleList):
    """An nn.ModuleList of layers that also owns their shared modules (see the module docstring)."""
    _base = nn.ModuleList


class SharedSequential(_SharedStackMixin, nn.Sequential):
    """An nn.Sequential of layers that also owns their shared modules; ``forward`` runs the layers."""
    _base = nn.Sequential


_SHARED_CLASS = {nn.ModuleList: SharedModuleList, nn.Sequential: SharedSequential}


def check_owner(stack: nn.Module) -> None:
    """A ValueError unless ``stack`` owns shared modules or can be made to (a plain
    nn.ModuleList or nn.Sequential without a child named ``lors``)."""
    if isinstance(stack._modules.get(OWNER), _Owner):
        return
    if type(stack) not in _SHARED_CLASS:
        raise ValueError(f"the layers sit in a {type(stack).__name__}; a shared stack must be a plain "
                         "nn.ModuleList or nn.Sequential (it will own the shared weights): hold the "
                         "layers in one")
    if OWNER in stack._modules:
        raise ValueError(f"the stack has a child named '{OWNER}' that is not a layer; rename it "
                         "first (a shared stack keeps its shared weights there)")


def owner(stack: nn.Module, create: bool = False) -> _Owner | None:
    """The module that owns ``stack``'s shared modules (None if it has none). With ``create``,
    make ``stack`` (an nn.ModuleList or nn.Sequential) a shared stack first."""
    found = stack._modules.get(OWNER)
    if isinstance(found, _Owner) or not create:
        return found if isinstance(found, _Owner) else None
    check_owner(stack)
    stack.__class__ = _SHARED_CLASS[type(stack)]
    stack.add_module(OWNER, _Owner())
    return stack._modules[OWNER]


def owned(stack: nn.Module) -> dict[str, list[LayerStack]]:
    """{target: [stack modules]} that ``stack`` owns ({} for a plain stack)."""
    own = owner(stack)
    return {} if own is None else {t: list(g) for t, g in own.groups().items()}


def shared_stacks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, stack) of every shared stack in ``model``, itself included."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _SharedStackMixin)]


def release(stack: nn.Module, keep: set[int]) -> None:
    """Drop the stack modules whose id is not in ``keep``; a stack left with none is made a
    plain nn.ModuleList/nn.Sequential again."""
    own = owner(stack)
    if own is None:
        return
    for target, group in own.groups().items():
        left = [m for m in group if id(m) in keep]
        if len(left) < len(group):
            group._modules = OrderedDict((str(i), m) for i, m in enumerate(left))
    for name in [n for n, g in own.groups().items() if len(g) == 0]:
        parent, _, leaf = name.rpartition(".")
        delattr(own.get_submodule(parent) if parent else own, leaf)
    if not own.groups():
        del stack._modules[OWNER]
        stack.__class__ = stack._base


def substack(stack: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A new shared stack of copies of ``stack[i]`` for i in ``layers``, owning copies of only
    what they use: each stack module keeps its shared tensors and those layers' own (a
    ``share_layers`` stack of 6 cut to layers [0, 1] holds 2 layers' factors).

    ``stack`` is unchanged. Layers are copied with ``copy.deepcopy``; their LorsLinears refer
    to the new stack modules.
    """
    from lors.core.share import LorsLinear, attach  # share.py builds on this file

    n = len(stack)
    layers = list(layers)
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in layers) \
            or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct indices 0 <= i < {n}, got {layers!r}")
    base = getattr(stack, "_base", type(stack))
    copies = [copy.deepcopy(stack[i]) for i in layers]
    new = base(*copies) if base is nn.Sequential else base(copies)
    where = {i: j for j, i in enumerate(layers)}
    for target, group in owned(stack).items():
        for module in group:
            kept = [j for j, i in enumerate(module.members) if i in where]
            if kept:
                attach(new, target, module.select(kept), [where[module.members[j]] for j in kept])
    ours = {id(m) for group in owned(new).values() for m in group}
    for j, layer in enumerate(new):
        for name, m in layer.named_modules():
            if isinstance(m, LorsLinear) and id(m.lors) not in ours:
                raise ValueError(f"layer {layers[j]}'s Linear '{name}' reads a stack module that the "
                                 "stack does not own (layers were moved between stacks): cut the "
                                 "stack it was shared in")
    return new
