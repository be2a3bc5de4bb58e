"""Multi-scale projection head (PCCS, spec b2.1): decoder maps at 1/8, 1/4 and 1/2 resolution, brought
to the 1/4 grid and fused by two 1x1 convolutions into one feature vector per pixel.

The 1/4 grid keeps boundary detail from the 1/2 map and context from the 1/8 map while the per-pixel
work of prototype methods stays small. Bilinear resampling: an exact 2x downsampling with
``align_corners=False`` is the 2x2 average. Outputs are not normalised (PCCS normalises prototypes,
not pixels, on the student side).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiScaleProjection(nn.Module):
    def __init__(self, in_channels: int, dim: int = 256) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, dim, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, kernel_size=1),
        )

    @staticmethod
    def input_channels(channels: list[int]) -> int:
        """Channels of the three fused decoder maps for a U-Net with these five encoder widths."""
        return channels[1] + channels[2] + channels[3]

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """``features``: U-Net decoder maps, coarse to fine (1/8, 1/4, 1/2, 1/1) -> (B, dim, H/4, W/4)."""
        size = features[1].shape[-2:]
        resized = [
            f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            for f in features[:3]
        ]
        return self.layers(torch.cat(resized, dim=1))
