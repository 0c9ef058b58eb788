"""Turn any stack of identical layers into LORS form, and merge it back for deployment.

``share_layers`` replaces a target ``nn.Linear`` in each of N layers by a ``LorsLinear``
that reads its weight from one ``StaticLors``. Every ``LorsLinear`` registers that
``StaticLors`` as its child ``lors``, so deleting, slicing (``layers[1:]``) or copying
(``copy.deepcopy(layers[2])``) layers cannot lose the shared tensors: any layer that is left
still holds them. Each shared tensor is nevertheless seen once:

- ``parameters()``, ``modules()`` and ``count_parameters`` skip a tensor or module met twice;
- ``state_dict()`` writes the ``StaticLors`` under the first layer that reaches it
  (``<layers>.0.<target>.lors.*`` for a whole stack), and ``load_state_dict`` takes it from
  there for every layer, so checkpoints store it once.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from lors.core.static import DEFAULT_INIT, StaticLors, per_layer

STACK_TYPES = (nn.ModuleList, nn.Sequential)

# Per-call bookkeeping for state_dict()/load_state_dict(), weakly keyed by the StaticLors so
# that nothing is stored on the modules (they pickle and deepcopy as before).
_WRITTEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # StaticLors -> destination
_LOADING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # StaticLors -> _LoadCall


@dataclass
class _LoadCall:
    """One ``load_state_dict`` call, told apart from others by its ``missing_keys`` list."""
    missing_keys: list
    loaded: bool = False                         # a layer found the shared tensors in the dict
    pending: list = field(default_factory=list)  # keys of layers met before that one


def _first_write(lors: StaticLors, destination: dict) -> bool:
    """True the first time ``lors`` is written into this ``destination``."""
    seen = _WRITTEN.get(lors)
    if seen is not None and seen() is destination:
        return False
    try:
        _WRITTEN[lors] = weakref.ref(destination)  # torch's destination, an OrderedDict
    except TypeError:  # a plain dict passed by hand cannot be weakly referenced
        _WRITTEN[lors] = lambda: destination
    return True


class LorsLinear(nn.Module):
    """Layer ``index`` of a ``StaticLors`` (or a ``SharedBasis``), used in place of an ``nn.Linear``.

    ``weight`` and ``bias`` are read-only properties holding W_i and b_i, so code that reads
    ``linear.weight`` directly (``nn.MultiheadAttention``'s output projection) still works.
    The ``StaticLors`` is registered as ``lors`` in every layer; see the module docstring for
    how state dicts still hold it once.
    """

    def __init__(self, lors: StaticLors, index: int):
        super().__init__()
        if not 0 <= index < lors.num_layers:
            raise ValueError(f"index {index} is out of range for a stack of {lors.num_layers}")
        self.index, self.in_features, self.out_features = index, lors.in_features, lors.out_features
        self.lors = lors

    @property
    def weight(self) -> torch.Tensor:
        return self.lors.weight(self.index)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.lors.layer_bias(self.index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        return self.lors(x, self.index)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """``nn.Module.state_dict``, except that only the first layer a call reaches writes
        the shared ``lors`` tensors; the others write nothing."""
        if destination is not None and not _first_write(self.lors, destination):
            return destination
        return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A state dict holds the shared tensors under one layer only (see state_dict). The
        # layer that finds them loads them; the others read them back from the StaticLors, or,
        # when met before that layer, have their missing keys cleared once it is found.
        own = prefix + "lors."
        call = _LOADING.get(self.lors)
        if call is None or call.missing_keys is not missing_keys:
            call = _LOADING[self.lors] = _LoadCall(missing_keys)
        if any(k.startswith(own) for k in state_dict):
            call.loaded, pending = True, set(call.pending)
            missing_keys[:] = [k for k in missing_keys if k not in pending]
            call.pending.clear()
        elif call.loaded:
            state_dict.update({own + k: v for k, v in self.lors.state_dict(keep_vars=True).items()})
        else:
            call.pending += [own + k for k in self.lors.state_dict()]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

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
        lors, i = self.lors, self.index
        target = getattr(lors, "target", None)
        shape = (f"layer {i} of {lors.num_layers}" + (f" of target '{target}'" if target else "")
                 + f", in_features={self.in_features}, out_features={self.out_features}, ")
        if hasattr(lors, "side"):  # a SharedBasis
            return shape + f"basis={lors.side}put side, rank={lors.rank}"
        return shape + f"rank={lors.ranks[i]}, groups={lors.groups[i]}"

    def __repr__(self) -> str:  # one line: the shared StaticLors would print under every layer
        return f"{type(self).__name__}({self.extra_repr()})"


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


def _check_per_layer(value, num_layers: int, what: str) -> list[int]:
    """rank or groups: an int, or a list of one int per layer."""
    if isinstance(value, (bool, str)) or not isinstance(value, (int, Sequence)):
        hint = ""
        if isinstance(value, float) and math.isfinite(value):
            hint = f"; use {what}={max(1, round(value))}"
        raise ValueError(f"{what} must be an int or a list of {num_layers} ints (one per layer), "
                         f"got {value!r}{hint}")
    return per_layer(value, num_layers, what)


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
    _, layers = find_layers(module)
    layers = list(layers)
    check_identical(layers)
    rank = _check_per_layer(rank, len(layers), "rank")
    groups = _check_per_layer(groups, len(layers), "groups")
    targets = pick_targets(layers[0], targets)
    stacks = {}
    for t in targets:  # build every StaticLors (which checks rank, groups, init) first
        ref = layers[0].get_submodule(t)
        stacks[t] = StaticLors(len(layers), ref.in_features, ref.out_features, rank=rank,
                               groups=groups, bias=ref.bias is not None, shared_bias=shared_bias,
                               init=init, device=ref.weight.device, dtype=ref.weight.dtype,
                               name=f"target '{t}'")
        stacks[t].target = t
    for t, lors in stacks.items():
        attach(layers, t, lors, range(len(layers)))
    return stacks


def attach(layers: Sequence[nn.Module], target: str, stack: nn.Module, members: Sequence[int]) -> None:
    """Put ``LorsLinear(stack, j)`` at ``target`` of ``layers[members[j]]`` for every j: how a
    StaticLors or SharedBasis that serves some layers of a stack is wired in."""
    parent, _, leaf = target.rpartition(".")
    for j, i in enumerate(members):
        setattr(layers[i].get_submodule(parent) if parent else layers[i], leaf, LorsLinear(stack, j))


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
