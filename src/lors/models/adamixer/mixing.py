"""AdaMixer's adaptive mixing for all decoder stages, plain or with LORS.

For a query q and its sampled features x (P_in points x C/G channels per group), each stage
mixes channels then points with weights generated from q, and projects back to the query:

    ACM:  x <- ReLU(LayerNorm(x M_c(q))),    M_c(q) = Linear(q) in R^{C/G x C/G}     (paper eq. 3-4)
    ASM:  x <- ReLU(LayerNorm(x^T M_s(q))),  M_s(q) = Linear(q) in R^{P_in x P_out}  (eq. 5-6)
    out = L_output(flatten(x)),              (C/G) P_out G -> d

The mixing weights of all stages live in one module, ``AdaptiveMixing``, called with the
stage index, so that a LORS generator shared by every stage is owned once:

- ``PlainGenerator``: one Linear(d, G((C/G)^2 + P_in P_out)) per stage (AdaMixer);
  with ``shared=True``, one Linear for all stages (LORS with the private term off, Table 5);
- ``LorsGenerator``: LORS^A (eq. 9-12), two ``AdaptiveLors`` (channel and spatial) with a
  generator shared by all stages plus per-stage factors B, A and E-generators;
- the output projection is ``StageLinears`` (one Linear per stage) or ``StaticLors``
  (LORS^T, eq. 7-8: a shared bias-free weight, per-stage B, A and bias).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from lors.core import AdaptiveLors, StaticLors

GENERATOR_INITS = ("official", "paper")


class StageLinears(nn.Module):
    """One independent Linear per stage, applied by index: the plain (not shared) stack.

    Parameters: ``layers[i]`` Linear(in_features, out_features) for each of ``num_layers``.
    """

    def __init__(self, num_layers: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(in_features, out_features, bias=bias) for _ in range(num_layers))

    def forward(self, x: Tensor, i: int) -> Tensor:
        """x (..., in_features) -> (..., out_features) with stage i's Linear."""
        return self.layers[i](x)


def mix_channels_then_points(x: Tensor, channel_mix: Callable[[Tensor], Tensor],
                             point_mix: Callable[[Tensor], Tensor]) -> Tensor:
    """ACM then ASM on x (B, N, G, P_in, c) -> (B, N, G, c, P_out).

    ``channel_mix`` maps (B, N, G, P_in, c) -> (B, N, G, P_in, c); ``point_mix`` maps the
    transpose (B, N, G, c, P_in) -> (B, N, G, c, P_out). The layer norms have no affine
    parameters and normalise each group's whole (points x channels) matrix, as AdaMixer does.
    """
    x = F.relu(F.layer_norm(channel_mix(x), x.shape[-2:]))                   # eq. 4
    x = point_mix(x.transpose(-1, -2))                                       # x^T M_s, eq. 6
    return F.relu(F.layer_norm(x, x.shape[-2:]))


class PlainGenerator(nn.Module):
    """AdaMixer's generators: M_c and M_s of every group from one Linear per stage.

    Args:
        num_stages: number of decoder stages.
        query_dim: d.
        num_groups: G, sampling groups.
        channels: c = C/G, channels per group.
        in_points, out_points: P_in, P_out.
        shared: one Linear used by every stage instead of one per stage.

    Parameters: ``weights.layers[i]`` Linear(d, G (c^2 + P_in P_out)); the weight starts at
    zero (AdaMixer's init), so the first mixing weights are the bias, the same for all queries.
    """

    def __init__(self, num_stages: int, query_dim: int, num_groups: int, channels: int,
                 in_points: int, out_points: int, shared: bool = False):
        super().__init__()
        self.num_groups, self.channels, self.in_points, self.out_points = num_groups, channels, in_points, out_points
        self.shared = shared
        per_group = channels * channels + in_points * out_points
        self.weights = StageLinears(1 if shared else num_stages, query_dim, num_groups * per_group)
        for layer in self.weights.layers:
            nn.init.zeros_(layer.weight)

    def forward(self, x: Tensor, query: Tensor, stage: int) -> Tensor:
        """x (B, N, G, P_in, c), query (B, N, d) -> (B, N, G, c, P_out)."""
        B, N = query.shape[:2]
        G, c = self.num_groups, self.channels
        params = self.weights(query, 0 if self.shared else stage).view(B, N, G, -1)
        m_c = params[..., : c * c].view(B, N, G, c, c)                                      # eq. 3
        m_s = params[..., c * c:].view(B, N, G, self.in_points, self.out_points)            # eq. 5
        return mix_channels_then_points(x, lambda t: t @ m_c, lambda t: t @ m_s)


class LorsGenerator(nn.Module):
    """LORS^A generators for all stages: W_i(q) = Linear(q) + sum_k B_ik E_ik(q) A_ik (eq. 9-12).

    Args:
        num_stages, query_dim, num_groups, channels, in_points, out_points: as PlainGenerator.
        rank: r, an int or one per stage.
        groups: K, an int or one per stage (the paper: [1, 1, 2, 2, 3, 3]).
        init: ``"official"`` (the authors' code: zero shared-generator weight, Kaiming B and A,
            zero E-generators) or ``"paper"`` (section 4.1: Kaiming generator, B and A, zero
            E-generators). Either way the private part starts at zero.
        use_shared: keep the shared term; ``False`` drops it (Table 5, private only).

    Parameters: ``channel`` AdaptiveLors with weights (G, c, c) and ``spatial`` AdaptiveLors
    with weights (G, P_in, P_out). Their generators together are the one shared
    Linear(d, G (c^2 + P_in P_out)); per stage i the factors are (G, K_i, c, r), (G, K_i, r, c),
    (G, K_i, P_in, r), (G, K_i, r, P_out) and the E-generators Linear(d, G K_i r^2) twice.
    """

    def __init__(self, num_stages: int, query_dim: int, num_groups: int, channels: int,
                 in_points: int, out_points: int, rank: int | Sequence[int] = 16,
                 groups: int | Sequence[int] = 1, init: str = "official", use_shared: bool = True):
        super().__init__()
        if init not in GENERATOR_INITS:
            raise ValueError(f"lors.init must be one of {GENERATOR_INITS}, got {init!r}")
        kw = dict(num_layers=num_stages, query_dim=query_dim, rank=rank, groups=groups, init=init,
                  shared=use_shared)
        self.channel = AdaptiveLors(shape=(num_groups, channels, channels), name="lors.adaptive (channel mixing)", **kw)
        self.spatial = AdaptiveLors(shape=(num_groups, in_points, out_points), name="lors.adaptive (spatial mixing)", **kw)
        self.use_shared = use_shared

    def forward(self, x: Tensor, query: Tensor, stage: int) -> Tensor:
        """x (B, N, G, P_in, c), query (B, N, d) -> (B, N, G, c, P_out)."""
        return mix_channels_then_points(x, lambda t: self.channel.mix(t, query, stage),
                                        lambda t: self.spatial.mix(t, query, stage))


class AdaptiveMixing(nn.Module):
    """Generated channel and spatial mixing plus the output projection, for every stage.

    Args:
        generator: a PlainGenerator or LorsGenerator (called as ``generator(x, q, stage)``).
        out_proj: a StageLinears or StaticLors from (C/G) P_out G to d (called as
            ``out_proj(x, stage)``).
    """

    def __init__(self, generator: nn.Module, out_proj: nn.Module):
        super().__init__()
        self.generator = generator
        self.out_proj = out_proj

    def forward(self, x: Tensor, query: Tensor, stage: int) -> Tensor:
        """Mix stage ``stage``'s sampled features.

        Args:
            x: (B, N, G, P_in, C/G) sampled features.
            query: (B, N, d) query content that generates the weights.
            stage: the decoder stage, 0-based.

        Returns:
            (B, N, d), to be added to the query (the stage adds and normalises).
        """
        mixed = self.generator(x, query, stage)                 # (B, N, G, C/G, P_out)
        return self.out_proj(mixed.flatten(2), stage)           # (B, N, G (C/G) P_out) -> (B, N, d)


def build_mixing(num_stages: int, query_dim: int, feat_dim: int, num_groups: int, in_points: int,
                 out_points: int, adaptive: dict | None = None, static: dict | None = None,
                 init: str = "official") -> AdaptiveMixing:
    """Wire an AdaptiveMixing, plain or with LORS per component (paper Tables 4-5).

    Args:
        adaptive: ``None`` for AdaMixer's per-stage generators, or LORS^A options
            ``dict(rank=, groups=, use_shared=, use_private=)``.
        static: ``None`` for per-stage output projections, or LORS^T options
            ``dict(rank=, groups=)``.
        init: LORS initialisation, ``"official"`` or ``"paper"`` (see LorsGenerator).
    """
    if feat_dim % num_groups:
        raise ValueError(f"feature width {feat_dim} is not divisible by {num_groups} sampling groups")
    c = feat_dim // num_groups
    dims = dict(num_stages=num_stages, query_dim=query_dim, num_groups=num_groups, channels=c,
                in_points=in_points, out_points=out_points)
    if adaptive is None:
        generator = PlainGenerator(**dims)
    else:
        use_shared, use_private = adaptive.get("use_shared", True), adaptive.get("use_private", True)
        if not (use_shared or use_private):
            raise ValueError("lors.adaptive: use_shared and use_private are both false, which leaves "
                             "no mixing weights; turn one on, or set lors.adaptive.enabled=false")
        if use_private:
            generator = LorsGenerator(**dims, rank=adaptive["rank"], groups=adaptive["groups"],
                                      init=init, use_shared=use_shared)
        else:  # W = W^shared(q) alone: one generator for all stages
            generator = PlainGenerator(**dims, shared=True)
            if init == "paper":
                generator.weights.layers[0].reset_parameters()
    in_features = c * out_points * num_groups
    if static is None:
        out_proj = StageLinears(num_stages, in_features, query_dim)
        for layer in out_proj.layers:  # AdaMixer: Xavier weights
            nn.init.xavier_uniform_(layer.weight)
    else:
        out_proj = StaticLors(num_stages, in_features, query_dim, rank=static["rank"],
                              groups=static["groups"], bias=True, init=init, name="lors.static")
    return AdaptiveMixing(generator, out_proj)
