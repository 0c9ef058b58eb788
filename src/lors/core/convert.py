"""Convert a *pretrained* stack of identical layers into shared form, from its own weights.

``share_layers`` builds a LORS stack for training from scratch; ``convert_layers`` keeps what
the layers learned. Two forms, over groups of layers (all N, or groups of adjacent ones):

- ``form="lors"``: ``W_i ≈ W_g + B_i A_i``, W_g the mean of the group's weights and B_i A_i a
  truncated SVD of the residual ``W_i - W_g`` (B = U_r S_r^½, A = S_r^½ V_rᵀ), a ``StaticLors``;
- ``form="basis"``: ``W_i ≈ C_i P_g`` with a basis P_g (k, in) shared by the group (``side="in"``,
  as Basis Sharing does) or ``W_i ≈ P_g C_i`` with P_g (out, k) (``side="out"``), a
  ``SharedBasis``. One layer per group is a per-layer truncated SVD.

With ``calibration`` (input activations of each target Linear), every SVD is *activation-aware*:
it minimises the output error ``‖X_i (W_i − Ŵ_i)ᵀ‖_F`` on those inputs instead of the weight
error (as SVD-LLM and Basis Sharing do), by factoring ``W S`` where ``S Sᵀ = XᵀX / rows`` (plus
``damping`` times its mean diagonal, so S is invertible) and mapping back with S⁻¹. Full rank
reproduces every layer exactly in both forms.

Ranks are given (``rank``) or chosen to keep a fraction of the targets' parameters (``budget``):
``allocation="greedy"`` spends the budget one rank step at a time where it removes the most
relative error energy per parameter, across layers and targets; ``"uniform"`` gives every layer
(or group) of a target one rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from lors.core.basis import SIDES, SharedBasis
from lors.core.share import attach, check_identical, find_layers, pick_targets
from lors.core.stack import check_owner
from lors.core.static import StaticLors, per_layer

FORMS = ("lors", "basis")
ALLOCATIONS = ("greedy", "uniform")


@dataclass
class Conversion:
    """What ``convert_layers`` did: per target, each layer's rank and relative error.

    ``ranks[t][i]`` is layer i's residual rank (``lors``) or the width of its group's basis
    (``basis``); ``errors[t][i]`` is ``‖(W_i − Ŵ_i) Sᵢ‖ / ‖W_i Sᵢ‖`` with ``Sᵢ Sᵢᵀ`` the
    calibration input moment (the relative output error on the calibration data), or the
    relative Frobenius error without calibration. ``stacks[t]`` holds one StaticLors or
    SharedBasis per group of ``groups[t]``. Parameter counts cover the targets' weights and
    biases only.
    """

    form: str
    side: dict[str, str] | None  # per target, for the basis form
    targets: list[str]
    groups: dict[str, list[list[int]]]  # per target: its groups of layer indices
    ranks: dict[str, list[int]]
    errors: dict[str, list[float]]
    params_before: int
    params_after: int
    activation_aware: bool
    budget: float | None = None
    stacks: dict[str, list[nn.Module]] = field(default_factory=dict, repr=False)

    @property
    def kept(self) -> float:
        """params_after / params_before."""
        return self.params_after / self.params_before

    def summary(self) -> dict:
        """JSON-ready: everything but the modules."""
        return dict(form=self.form, side=self.side, targets=self.targets, groups=self.groups,
                    budget=self.budget, params_before=self.params_before, params_after=self.params_after,
                    kept=self.kept, activation_aware=self.activation_aware, ranks=self.ranks,
                    errors=self.errors)

    def table(self) -> str:
        """One line per layer, one column per target: ``rank / relative error``."""
        kind = "output error on the calibration data" if self.activation_aware else "weight error"
        head = ["layer"] + self.targets
        rows = [[str(i)] + [f"{self.ranks[t][i]} / {self.errors[t][i]:.3f}" for t in self.targets]
                for i in range(len(self.ranks[self.targets[0]]))]
        widths = [max(len(r[c]) for r in [head] + rows) for c in range(len(head))]
        fmt = lambda r: "  ".join(v.rjust(w) for v, w in zip(r, widths))  # noqa: E731
        what = "residual rank" if self.form == "lors" else "basis width"
        return "\n".join([f"{what} / relative {kind}", fmt(head)] + [fmt(r) for r in rows])


@dataclass(frozen=True)
class InputMoments:
    """What ``input_moments`` records: per target, each layer's input moment ``XᵢᵀXᵢ / rows``,
    (in, in) float64 (``moments[target][i]``). ``convert_layers(calibration=moments)`` reuses
    it, so several conversions of one model pay for one calibration run. A type of its own, not
    a dict, so that it is never mistaken for ``{target: [activations]}``."""

    by_target: dict[str, list[torch.Tensor]]
    __iter__ = None  # not iterable: dict(moments) is a TypeError, not a dict of odd activations

    def __getitem__(self, target: str) -> list[torch.Tensor]:
        return self.by_target[target]

    def __contains__(self, target: str) -> bool:
        return target in self.by_target

    @property
    def targets(self) -> list[str]:
        return list(self.by_target)


def input_moments(layers: Sequence[nn.Module], targets: Sequence[str],
                  run: Callable[[], object]) -> InputMoments:
    """Call ``run()`` with a hook on every target Linear of every layer and return, per target,
    each layer's input moment ``XᵀX / rows`` (in, in), float64.

    Linears that read one tensor (q, k and v; gate and up) share one product.
    """
    n = len(layers)
    sums = {t: [None] * n for t in targets}
    rows = {t: [0] * n for t in targets}
    owner: dict[tuple[str, int], set] = {}  # (target, layer) -> the targets whose inputs it read
    last: dict[int, tuple] = {}  # layer -> (input tensor, its product, first target): held, so `is` is exact

    def hook(t: str, i: int):
        def record(_module, args):
            x = args[0]
            seen = last.get(i)
            if seen is not None and seen[0] is x:
                prod, first = seen[1], seen[2]
            else:
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                prod, first = (flat.t() @ flat).double(), t  # (in, in)
                last[i] = (x, prod, t)
            owner.setdefault((t, i), set()).add(first)
            sums[t][i] = prod.clone() if sums[t][i] is None else sums[t][i].add_(prod)
            rows[t][i] += x.numel() // x.shape[-1]
        return record

    handles = [layer.get_submodule(t).register_forward_pre_hook(hook(t, i))
               for t in targets for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
        last.clear()
    out: dict[str, list[torch.Tensor]] = {}
    for t in targets:
        out[t] = []
        for i in range(n):
            if rows[t][i] == 0:
                raise ValueError(f"the calibration run never called target '{t}' of layer {i}: pass a "
                                 "callable that runs the model forward on calibration inputs")
            first = owner[(t, i)]
            if len(first) == 1 and (f := next(iter(first))) != t and f in out:
                out[t].append(out[f][i])  # one tensor for Linears that always read the same input
            else:
                out[t].append(sums[t][i] / rows[t][i])
    return InputMoments(out)


def _moments_from_activations(calibration: Mapping, targets: Sequence[str], n: int,
                              widths: dict[str, int]) -> dict[str, list[torch.Tensor]]:
    out = {}
    for t in targets:
        if t not in calibration:
            raise ValueError(f"calibration has no activations for target '{t}' (it has "
                             f"{sorted(calibration)}): give a list of {n} input tensors per target, "
                             "or a callable that runs the model")
        acts = list(calibration[t])
        if len(acts) != n:
            raise ValueError(f"calibration for target '{t}' holds {len(acts)} tensors; the stack has "
                             f"{n} layers: give one input tensor per layer")
        moments = []
        for i, x in enumerate(acts):
            if not torch.is_tensor(x) or x.ndim < 1 or x.shape[-1] != widths[t] or x.numel() == 0:
                got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
                raise ValueError(f"calibration for target '{t}' layer {i} has shape {got}; the Linear "
                                 f"reads inputs of width {widths[t]}: pass its input activations, "
                                 f"shape (..., {widths[t]})")
            if x.dtype == torch.float64 and x.shape == (widths[t], widths[t]) and torch.equal(x, x.t()):
                raise ValueError(f"calibration for target '{t}' layer {i} is a symmetric ({widths[t]}, "
                                 f"{widths[t]}) float64 matrix, an input moment rather than activations: "
                                 "pass the InputMoments object that input_moments returned itself (not "
                                 "dict(moments)), or the input activations")
            flat = x.detach().reshape(-1, widths[t]).double()
            moments.append(flat.t() @ flat / flat.shape[0])
        out[t] = moments
    return out


def _whitener(moment: torch.Tensor | None, damping: float, size: int, cache: dict):
    """(S, S⁻¹) with S Sᵀ = moment + damping · mean diagonal · I; (None, None) without one.
    Linears that read one input (q, k, v) share one moment tensor and so, through ``cache``
    (id -> (moment, S, S⁻¹)), one eigh."""
    if moment is None:
        return None, None
    hit = cache.get(id(moment))
    if hit is not None and hit[0] is moment:
        return hit[1], hit[2]
    s, s_inv = _whiten(moment, damping, size)
    cache[id(moment)] = (moment, s, s_inv)
    return s, s_inv


def _whiten(moment: torch.Tensor, damping: float, size: int):
    eye = torch.eye(size, dtype=torch.float64, device=moment.device)
    scale = moment.diagonal().mean().clamp_min(1e-30)
    lam, q = torch.linalg.eigh(moment + damping * scale * eye)
    root = lam.clamp_min(lam.max() * 1e-12).sqrt()
    return q * root, (q / root).t()


def _mul(w: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    return w if s is None else w @ s


def _groups(groups, n: int) -> list[list[int]]:
    if groups is None:
        return [list(range(n))]
    if isinstance(groups, int) and not isinstance(groups, bool):
        if groups < 1:
            raise ValueError(f"groups={groups}: give a group size >= 1, a list of lists of layer "
                             "indices, or None for one group of all layers")
        return [list(range(s, min(s + groups, n))) for s in range(0, n, groups)]
    if isinstance(groups, (list, tuple)) and all(isinstance(g, (list, tuple)) and g for g in groups):
        flat = [i for g in groups for i in g]
        if sorted(flat) == list(range(n)) and all(isinstance(i, int) for i in flat):
            return [list(g) for g in groups]
        raise ValueError(f"groups {groups!r} must name every layer 0..{n - 1} exactly once")
    raise ValueError(f"groups must be None (all {n} layers), a group size, or a list of lists of "
                     f"layer indices, got {groups!r}")


def _per_target(value, targets: list[str], what: str, default=None) -> dict:
    """``value`` for every target: one value for all, or a dict ``{target: value}`` (targets it
    does not name get ``default``); a ValueError for a dict that names other targets."""
    if not isinstance(value, Mapping):
        return {t: value for t in targets}
    unknown = sorted(set(value) - set(targets))
    if unknown:
        raise ValueError(f"{what} names targets {unknown} that are not converted; the targets are {targets}")
    return {t: value.get(t, default) for t in targets}


def convert_targets(layer: nn.Module, targets=None) -> list[str]:
    """``targets`` checked against ``layer`` (a named ValueError for a bad one); None: every
    nn.Linear of the layer."""
    return pick_targets(layer, targets, "convert")


@dataclass
class _Plan:
    """One target's factorisation, before ranks are cut."""
    out: int
    inp: int
    has_bias: bool
    units: list  # lors: one per layer; basis: one per group
    gains: list  # per unit: relative energy removed by each rank step, descending
    step: list   # per unit: parameters one rank step costs
    limit: list  # per unit: the largest rank
    fixed: int   # parameters that do not depend on the ranks (shared weights, biases)
    before: int  # the original weights and biases


def _plan_lors(ws, moments, groups, damping, cache):
    """One unit per layer, in layer order: (its group's mean, U, singular values, Vᵀ S⁻¹)."""
    means = {i: mean for g in groups for mean in [torch.stack([ws[j] for j in g]).mean(0)] for i in g}
    units, gains, limits = [], [], []
    for i, w in enumerate(ws):
        s, s_inv = _whitener(None if moments is None else moments[i], damping, w.shape[1], cache)
        u, sig, vh = torch.linalg.svd(_mul(w - means[i], s), full_matrices=False)
        total = _mul(w, s).square().sum().clamp_min(1e-30)
        units.append((means[i], u, sig, vh if s_inv is None else vh @ s_inv))
        gains.append((sig.square() / total).tolist())
        limits.append(sig.numel())
    return units, gains, limits


def _plan_basis(ws, moments, groups, damping, side, cache):
    units, gains, limits = [], [], []
    for g in groups:
        n_in = ws[g[0]].shape[1]
        if side == "in":  # one basis of the input space, whitened by the group's pooled moment
            pooled = None if moments is None else sum(moments[i] for i in g)
            s, s_inv = _whitener(pooled, damping, n_in, cache)
            stacked = torch.cat([_mul(ws[i], s) for i in g])                   # (n·out, in)
            gram = stacked.t() @ stacked                                      # (in, in)
        else:  # one basis of the output space; each layer whitened by its own moment
            stacked = torch.cat([_mul(ws[i], _whitener(None if moments is None else moments[i],
                                                        damping, n_in, cache)[0]) for i in g], dim=1)
            gram = stacked @ stacked.t()                                      # (out, out)
        lam, vec = torch.linalg.eigh(gram)
        limit = min(stacked.shape)  # the rank of the stacked weights
        lam, vec = lam.flip(0).clamp_min(0)[:limit], vec.flip(1)[:, :limit]
        if side == "out":
            basis = vec                                                       # (out, k)
        else:
            basis = vec.t() if s_inv is None else vec.t() @ s_inv             # (k, in)
        units.append((g, basis))
        total = lam.sum().clamp_min(1e-30)
        gains.append((lam * len(g) / total).tolist())
        limits.append(limit)
    return units, gains, limits


def _check_rank(value, count: int, what: str, limits: list[int], t: str) -> list[int]:
    values = per_layer(value, count, f"rank for target '{t}' (or 'full')", unit=what)
    for j, (v, lim) in enumerate(zip(values, limits)):
        if not 0 <= v <= lim:
            raise ValueError(f"rank {v} for {what} {j} of target '{t}' is out of range; use 0 <= rank "
                             f"<= {lim} (full rank reproduces the layer)")
    return values


NEGLIGIBLE = 1e-12  # a rank step that removes less of a weight's (relative) energy buys nothing


def _useful(gains: list[float]) -> int:
    """Rank steps worth a parameter: those that remove more than ``NEGLIGIBLE`` of the energy
    (a residual of identical layers has none)."""
    return sum(g > NEGLIGIBLE for g in gains)


def _allocate(plans: dict[str, _Plan], budget: float, allocation: str) -> dict[str, list[int]]:
    """Ranks per unit that keep ``budget`` of the parameters, to within one rank step."""
    # uniform: every target keeps its own share, so each must fit; greedy: the total must
    checked = plans.items() if allocation == "uniform" else [("", _Plan(0, 0, False, [], [], [], [],
                                                                        sum(p.fixed for p in plans.values()),
                                                                        sum(p.before for p in plans.values())))]
    for t, p in checked:
        if p.fixed > budget * p.before:
            raise ValueError(f"budget {budget} keeps {int(budget * p.before):,} of {p.before:,} parameters"
                             f"{f' of target {t!r}' if t else ''}, but the shared weights and biases alone "
                             f"take {p.fixed:,}: use a larger budget, larger groups (form='lors'), or "
                             "form='basis'")
    fixed = sum(p.fixed for p in plans.values())
    before = sum(p.before for p in plans.values())
    if allocation == "uniform":  # one rank per target, the largest that fits its own share
        return {t: [min(max(0, int((budget * p.before - p.fixed) // sum(p.step))), _useful(gs))
                    for gs in p.gains] for t, p in plans.items()}
    room = budget * before - fixed
    # Each step's gain / cost; steps of one unit have falling gains, so the sorted order takes
    # them first to last (ties broken by step index).
    items = sorted((-g / p.step[u], j, t, u) for t, p in plans.items()
                   for u, gs in enumerate(p.gains) for j, g in enumerate(gs[:_useful(gs)]))
    ranks = {t: [0] * len(p.units) for t, p in plans.items()}
    blocked = set()
    for _, j, t, u in items:
        cost = plans[t].step[u]
        if (t, u) in blocked or cost > room:
            blocked.add((t, u))  # a later step of this unit alone would skip one
            continue
        ranks[t][u], room = j + 1, room - cost
    return ranks


def _plans(linears, targets, moments, groups, form, sides, damping, n):
    """Per target: its factorisation (``_Plan``) over its ``groups[t]`` and its weights in float64."""
    plans, weights, cache = {}, {}, {}
    for t in targets:
        parts = groups[t]
        ws = [lin.weight.detach().to(torch.float64) for lin in linears[t]]
        out, inp = ws[0].shape
        has_bias = linears[t][0].bias is not None
        mts = None if moments is None else moments[t]
        if form == "lors":
            units, gains, limits = _plan_lors(ws, mts, parts, damping, cache)
            step = [out + inp] * n
            fixed = len(parts) * out * inp + has_bias * n * out
        else:
            side = sides[t]
            units, gains, limits = _plan_basis(ws, mts, parts, damping, side, cache)
            step = [(inp + len(g) * out) if side == "in" else (out + len(g) * inp) for g in parts]
            fixed = has_bias * n * out
        plans[t] = _Plan(out, inp, has_bias, units, gains, step, limits, fixed, n * (out * inp + has_bias * out))
        weights[t] = ws
    return plans, weights


def check_options(form: str, side, allocation: str) -> None:
    """A named ValueError for a ``form``, ``side`` (or dict of sides) or ``allocation`` that
    ``convert_layers`` does not know (callers check before loading a model)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    bad = [v for v in (side.values() if isinstance(side, Mapping) else [side]) if v not in SIDES]
    if bad:
        raise ValueError(f"side must be one of {SIDES} (or a dict of them per target), got {bad[0]!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")


def convert_layers(module: nn.Module, targets: str | Iterable[str] | None = None, form: str = "lors",
                   budget: float | None = None, rank=None, groups=None, calibration=None,
                   side: str | Mapping[str, str] = "in", allocation: str = "uniform",
                   damping: float = 0.001) -> Conversion:
    """Replace the target Linears of a pretrained stack by a shared form made from their weights.

    Args:
        module: an ``nn.ModuleList``/``nn.Sequential`` of identical layers, or a model holding
            one (``find_layers``).
        targets: Linear names relative to one layer, or None for every ``nn.Linear``.
        form: ``"lors"`` (group mean + per-layer SVD of the residual) or ``"basis"`` (a basis
            shared by the group + per-layer coefficients).
        budget: the fraction of the targets' parameters to keep, 0 < budget < 1; ranks are
            chosen by ``allocation``. Give ``budget`` or ``rank``, not both.
        rank: an int, a list (one per layer for ``lors``, one per group for ``basis``), a dict
            ``{target: int or list}``, or ``"full"``, which reproduces the layers exactly.
        groups: None (all N layers share), a group size (adjacent layers), a list of lists of
            layer indices, or a dict ``{target: any of these}`` (targets not named: all N
            layers), so that the Linears that read the residual stream and those that write it
            can be grouped differently in one call.
        calibration: None (weight-space SVD), a callable that runs the model on calibration
            inputs (hooks record each target's inputs), ``{target: [N tensors (..., in)]}``, or
            the ``InputMoments`` that ``input_moments`` recorded.
        side: ``"in"`` or ``"out"``, where the ``basis`` form's shared basis sits, or a dict
            ``{target: side}`` (targets not named: ``"in"``). Linears that read the residual
            stream (q, k, v, gate, up) read similar subspaces in adjacent layers; those that
            write it (o, down) read layer-specific inputs, so ``"out"`` may suit them.
        allocation: ``"greedy"`` or ``"uniform"``, how ``budget`` is spent.
        damping: added to each input moment, times its mean diagonal, before whitening.

    Every argument is checked before the stack changes; bad input is a ValueError that names it.
    Returns a ``Conversion`` (ranks, errors, parameter counts, the new modules).
    """
    stack, targets, groups, sides = _check_arguments(module, targets, form, budget, rank, groups, side,
                                                     allocation, damping)
    layers = list(stack)
    n = len(layers)
    linears = {t: [layer.get_submodule(t) for layer in layers] for t in targets}
    moments = _calibration_moments(calibration, layers, targets, {t: linears[t][0].in_features for t in targets})
    plans, weights = _plans(linears, targets, moments, groups, form, sides, damping, n)
    if budget is not None:
        unit_ranks = _allocate(plans, float(budget), allocation)
    else:
        what = "layer" if form == "lors" else "group"
        unit_ranks = {t: list(p.limit) if r == "full" else _check_rank(r, len(p.units), what, p.limit, t)
                      for t, p in plans.items() for r in [rank[t] if isinstance(rank, Mapping) else rank]}
    stacks, errors = {}, {}
    for t, p in plans.items():
        build = _build_lors if form == "lors" else _build_basis
        stacks[t], fitted = build(p, groups[t], unit_ranks[t], linears[t], weights[t], sides[t],
                                  None if moments is None else moments[t], damping, n, name=f"target '{t}'")
        errors[t] = [_relative_error(weights[t][i], fitted[i], None if moments is None else moments[t][i])
                     for i in range(n)]
    for t, built in stacks.items():  # every check passed: change the stack
        for mod, g in zip(built, groups[t]):
            attach(stack, t, mod, g)
    ranks = {t: list(unit_ranks[t]) if form == "lors" else  # lors: one unit per layer; basis: per group
             [r for i in range(n) for r, g in zip(unit_ranks[t], groups[t]) if i in g] for t in targets}
    after = sum(sum(q.numel() for q in mod.parameters()) for built in stacks.values() for mod in built)
    return Conversion(form=form, side=sides if form == "basis" else None, targets=targets, groups=groups,
                      ranks=ranks, errors=errors, params_before=sum(p.before for p in plans.values()),
                      params_after=after, activation_aware=moments is not None, budget=budget, stacks=stacks)


def _check_arguments(module, targets, form, budget, rank, groups, side, allocation, damping):
    """Everything ``convert_layers`` checks before any work: (the stack, the targets, their
    groups and sides)."""
    check_options(form, side, allocation)
    if (budget is None) == (rank is None):
        raise ValueError("give either budget (a fraction of the parameters to keep) or rank, not "
                         + ("both" if budget is not None else "neither"))
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not 0 < budget < 1):
        raise ValueError(f"budget must be a fraction with 0 < budget < 1, got {budget!r}")
    if not isinstance(damping, (int, float)) or damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    _, stack = find_layers(module)
    layers = list(stack)
    check_identical(layers, caller="convert_layers")
    targets = convert_targets(layers[0], targets)
    check_owner(stack)
    if isinstance(rank, Mapping):
        unknown = sorted(set(rank) - set(targets))
        missing = [t for t in targets if t not in rank]
        if unknown or missing:
            raise ValueError(f"rank dict: {'unknown targets ' + str(unknown) if unknown else ''}"
                             f"{'; ' if unknown and missing else ''}"
                             f"{'no rank for targets ' + str(missing) if missing else ''}; "
                             f"the targets are {targets}")
    groups = {t: _groups(g, len(layers)) for t, g in _per_target(groups, targets, "groups").items()}
    sides = _per_target(side, targets, "side", default="in")
    return stack, targets, groups, sides


def _calibration_moments(calibration, layers, targets, widths) -> InputMoments | None:
    """Each target's input moment per layer, from whatever ``calibration`` is (None: none)."""
    n = len(layers)
    if calibration is None:
        return None
    if isinstance(calibration, InputMoments):
        missing = [t for t in targets if t not in calibration or len(calibration[t]) != n]
        if missing:
            raise ValueError(f"the recorded moments hold no {n} layers of targets {missing}: record them "
                             "with input_moments on this stack and these targets")
        return calibration
    if callable(calibration):
        return input_moments(layers, targets, calibration)
    if isinstance(calibration, Mapping):
        return InputMoments(_moments_from_activations(calibration, targets, n, widths))
    raise ValueError(f"calibration must be None, a callable that runs the model, or a dict "
                     f"{{target: [input tensors]}}, got a {type(calibration).__name__}")


def _build_lors(p: _Plan, parts, ranks, linears, ws, side, moments, damping, n, name):
    """One StaticLors per group (its mean and each layer's truncated residual SVD), and each
    layer's fitted weight."""
    built, fitted = [], [None] * n
    kw = dict(device=linears[0].weight.device, dtype=linears[0].weight.dtype)
    for gi, g in enumerate(parts):
        rs = [ranks[i] for i in g]
        lors = StaticLors(len(g), p.inp, p.out, rank=rs, groups=1, bias=p.has_bias, full_range=True,
                          name=f"{name} group {gi}", **kw)
        with torch.no_grad():
            lors.shared_weight.copy_(p.units[g[0]][0])
            for j, i in enumerate(g):
                mean, u, sig, right = p.units[i]
                r, root = rs[j], sig[: rs[j]].sqrt()
                lors.B[j].copy_((u[:, :r] * root)[None])
                lors.A[j].copy_((root[:, None] * right[:r])[None])
                fitted[i] = mean + (u[:, :r] * sig[:r]) @ right[:r]
                if p.has_bias:
                    lors.bias[j].copy_(linears[i].bias.detach())
        built.append(lors)
    return built, fitted


def _build_basis(p: _Plan, parts, ranks, linears, ws, side, moments, damping, n, name):
    """One SharedBasis per group (its basis cut to the group's rank, each layer's best
    coefficients for it), and each layer's fitted weight."""
    built, fitted = [], [None] * n
    kw = dict(device=linears[0].weight.device, dtype=linears[0].weight.dtype)
    for gi, (g, basis) in enumerate(p.units):
        k = ranks[gi]
        shared = basis[:k] if side == "in" else basis[:, :k]
        sb = SharedBasis(len(g), p.inp, p.out, rank=k, side=side, bias=p.has_bias, name=f"{name} group {gi}", **kw)
        with torch.no_grad():
            sb.basis.copy_(shared)
            for j, i in enumerate(g):
                coeff = _coefficients(ws[i], shared, side, None if moments is None else moments[i], damping)
                sb.coeffs[j].copy_(coeff)
                fitted[i] = coeff @ shared if side == "in" else shared @ coeff
                if p.has_bias:
                    sb.bias[j].copy_(linears[i].bias.detach())
        built.append(sb)
    return built, fitted


def _coefficients(w, basis, side, moment, damping):
    """The layer's best coefficients for a fixed basis, in its own (whitened) metric."""
    if side == "out":  # the basis has orthonormal columns: C = Pᵀ W is optimal for any metric
        return basis.t() @ w
    if basis.shape[0] == 0:
        return w.new_zeros(w.shape[0], 0)
    if moment is None:
        m = None
    else:
        eye = torch.eye(moment.shape[0], dtype=moment.dtype, device=moment.device)
        m = moment + damping * moment.diagonal().mean().clamp_min(1e-30) * eye
    if m is None:  # C = argmin ‖W − C P‖: least squares over P's rows
        return torch.linalg.solve(basis @ basis.t(), basis @ w.t()).t()
    return torch.linalg.solve(basis @ m @ basis.t(), basis @ m @ w.t()).t()  # (out, k)


def _relative_error(w, fitted, moment) -> float:
    diff = w - fitted
    if moment is None:
        return float(diff.norm() / w.norm().clamp_min(1e-30))
    num = (diff @ moment * diff).sum().clamp_min(0)
    den = (w @ moment * w).sum().clamp_min(1e-30)
    return float((num / den).sqrt())
