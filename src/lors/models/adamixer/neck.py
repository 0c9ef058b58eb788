"""AdaMixer's neck: a 1x1 convolution per level to a common width, one shared GroupNorm.

No FPN: AdaMixer's 3D sampling mixes levels itself, so the neck only maps channels.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


class ChannelMapping(nn.Module):
    """Map each feature level to ``out_channels`` with a 1x1 conv, then normalise.

    Args:
        in_channels: channels of each input level (C2..C5 of a ResNet: 256, 512, 1024, 2048).
        out_channels: common width of the outputs (256).
        gn_groups: groups of the GroupNorm, which is one module applied to every level.

    For ResNet-50: 3840 x 256 weights + 4 x 256 biases + 2 x 256 GroupNorm = 984,576 parameters.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, gn_groups: int = 32):
        super().__init__()
        if out_channels % gn_groups:
            raise ValueError(f"neck width {out_channels} is not divisible by gn_groups={gn_groups}")
        self.convs = nn.ModuleList(nn.Conv2d(c, out_channels, kernel_size=1) for c in in_channels)
        self.norm = nn.GroupNorm(gn_groups, out_channels)  # shared across levels
        self.out_channels = out_channels
        for conv in self.convs:  # mmdetection's ChannelMapping init: Xavier-uniform, zero bias
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """features: L maps (B, in_channels[l], H_l, W_l) -> L maps (B, out_channels, H_l, W_l)."""
        if len(features) != len(self.convs):
            raise ValueError(f"neck expects {len(self.convs)} feature levels, got {len(features)}")
        return [self.norm(conv(x)) for conv, x in zip(self.convs, features)]
