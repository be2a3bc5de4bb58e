"""Projection head for prototype methods: fine decoder features -> L2-normalised pixel embeddings.

The two finest decoder maps (1/2 and 1/1 resolution) carry both context and boundary detail; they are
brought to one resolution (``stride`` 2: average-pool the 1/1 map; ``stride`` 1: upsample the 1/2 map),
concatenated, and mapped by two 1x1 convolutions to a ``dim``-dimensional unit vector per pixel. At
stride 2 the embedding map has a quarter of the pixels, which keeps prototype losses cheap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    def __init__(self, half_channels: int, full_channels: int, dim: int = 64, stride: int = 2) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"projection stride must be 1 or 2, got {stride}")
        self.stride = stride
        hidden = 64
        self.layers = nn.Sequential(
            nn.Conv2d(half_channels + full_channels, hidden, kernel_size=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, dim, kernel_size=1),
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """``features``: the U-Net decoder maps, coarse to fine (the last two are used)."""
        half, full = features[-2], features[-1]
        if self.stride == 2:
            full = F.avg_pool2d(full, kernel_size=2)
        else:
            half = F.interpolate(half, size=full.shape[-2:], mode="bilinear", align_corners=False)
        return F.normalize(self.layers(torch.cat([half, full], dim=1)), dim=1)
