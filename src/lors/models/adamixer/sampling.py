"""AdaMixer's adaptive 3D sampling: each query samples points in (x, y, z) feature space.

Every query predicts, per sampling group g and point p, an offset ``(dx, dy, dz)`` relative
to its xyzr box: the point sits at ``(cx + dx w, cy + dy h)`` in the image and at scale
``z + dz`` (``z = log2 sqrt(w h)``). The scale picks feature levels softly, with weights
``softmax_l(-(z - log2 stride_l)^2 / tau)``, tau = 2; each level is read with bilinear
``grid_sample`` on the group's C/G channels, and the weighted levels are summed.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lors.models.adamixer.boxes import xyzr_to_wh


class AdaptiveSampling(nn.Module):
    """Sample ``in_points`` feature vectors per group and query.

    Args:
        query_dim: width d of the query content vector.
        num_groups: G, the sampling groups; each reads its own C/G channels.
        in_points: P_in, the points sampled per group.
        tau: temperature of the level weights (2, as in AdaMixer).

    Parameters: ``offsets`` Linear(d, G * P_in * 3).
    """

    def __init__(self, query_dim: int = 256, num_groups: int = 4, in_points: int = 32, tau: float = 2.0):
        super().__init__()
        self.num_groups, self.in_points, self.tau = num_groups, in_points, tau
        self.offsets = nn.Linear(query_dim, num_groups * in_points * 3)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Offsets start independent of the query: zero weight, and a bias that spreads the
        points over the box (a regular grid when P_in is a square number, else uniform in
        [-0.5, 0.5]) at one octave below the box's scale (dz = -1), as AdaMixer does."""
        nn.init.zeros_(self.offsets.weight)
        bias = self.offsets.bias.view(self.num_groups, self.in_points, 3)
        side = math.isqrt(self.in_points)
        if side * side == self.in_points:
            centres = torch.linspace(-0.5, 0.5, side + 1)[:-1] + 0.5 / side
            gy, gx = torch.meshgrid(centres, centres, indexing="ij")
            bias[..., 0] = gx.flatten()
            bias[..., 1] = gy.flatten()
        else:
            nn.init.uniform_(bias[..., :2], -0.5, 0.5)
        bias[..., 2] = -1.0

    def points(self, query: Tensor, xyzr: Tensor) -> Tensor:
        """Sampling points (B, N, G, P_in, 3) as (x, y) in pixels and z = log2 scale."""
        B, N, _ = query.shape
        offset = self.offsets(query).view(B, N, self.num_groups, self.in_points, 3)
        wh = xyzr_to_wh(xyzr).view(B, N, 1, 1, 2)
        xy = xyzr[..., None, None, :2] + offset[..., :2] * wh
        z = xyzr[..., None, None, 2:3] + offset[..., 2:3]
        return torch.cat([xy, z], dim=-1)

    def forward(self, query: Tensor, xyzr: Tensor, features: Sequence[Tensor],
                strides: Sequence[int]) -> Tensor:
        """Sample features around each query's box.

        Args:
            query: (B, N, d) query content.
            xyzr: (B, N, 4) query boxes in pixels of the (padded) input image.
            features: L maps (B, C, H_l, W_l), C divisible by G.
            strides: L strides, the input pixels per feature cell of each level.

        Returns:
            (B, N, G, P_in, C/G) sampled features.
        """
        B, N, _ = query.shape
        G, P = self.num_groups, self.in_points
        C = features[0].shape[1]
        if C % G:
            raise ValueError(f"feature width {C} is not divisible by the {G} sampling groups")
        points = self.points(query, xyzr)                                   # (B, N, G, P, 3)
        log_strides = torch.tensor([math.log2(s) for s in strides], dtype=points.dtype, device=points.device)
        level_w = torch.softmax(-(points[..., 2:3] - log_strides) ** 2 / self.tau, dim=-1)  # (B, N, G, P, L)
        xy = points[..., :2].permute(0, 2, 1, 3, 4).reshape(B * G, N, P, 2)
        level_w = level_w.permute(0, 2, 1, 3, 4).reshape(B * G, 1, N, P, len(strides))
        out = None
        for level, (value, stride) in enumerate(zip(features, strides)):
            H, W = value.shape[-2:]
            extent = xy.new_tensor([W * stride, H * stride])
            grid = 2.0 * xy / extent - 1.0  # grid_sample's [-1, 1] spans the whole (padded) map
            sampled = F.grid_sample(value.reshape(B * G, C // G, H, W), grid, mode="bilinear",
                                    padding_mode="zeros", align_corners=False)  # (B*G, C/G, N, P)
            sampled = sampled * level_w[..., level]
            out = sampled if out is None else out + sampled
        return out.view(B, G, C // G, N, P).permute(0, 3, 1, 4, 2)          # (B, N, G, P, C/G)
