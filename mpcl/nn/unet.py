"""The 2D U-Net of the SSL4MIS reference (16-32-64-128-256 channels, transposed-conv upsampling).

With 4 classes it has 1 944 324 parameters (the often-quoted 1.81 M is the bilinear-upsampling variant,
``upsampling="bilinear"``: a 1x1 conv then a fixed bilinear ×2, which two-network methods use to make
their second decoder differ from the first).

``forward`` returns logits only, which is what inference and export need; ``forward_features`` also
returns the decoder feature maps (used by prototype methods) and optional deep-supervision logits.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
from torch import nn


class UNetOutput(NamedTuple):
    logits: torch.Tensor  # (B, C, H, W)
    features: list[torch.Tensor]  # decoder maps, coarse to fine: 128@1/8, 64@1/4, 32@1/2, 16@1/1
    deep_logits: list[torch.Tensor]  # logits at 1/8, 1/4, 1/2 when deep supervision is on, else []


def join_outputs(outputs: list[UNetOutput]) -> UNetOutput:
    """One UNetOutput for the concatenation of several passes' batches."""
    return UNetOutput(
        torch.cat([output.logits for output in outputs]),
        [torch.cat(level) for level in zip(*(output.features for output in outputs), strict=True)],
        [torch.cat(level) for level in zip(*(output.deep_logits for output in outputs), strict=True)],
    )


class ConvBlock(nn.Module):
    """Two 3x3 conv + BN + LeakyReLU, with dropout between them (as the reference network)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


Upsampling = Literal["transposed", "bilinear"]


class UpBlock(nn.Module):
    """Upsampling (transposed conv, or 1x1 conv + bilinear ×2), concatenation with the skip, a ConvBlock."""

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        dropout: float,
        upsampling: Upsampling = "transposed",
    ) -> None:
        super().__init__()
        if upsampling == "transposed":
            self.up: nn.Module = nn.ConvTranspose2d(in_channels, skip_channels, kernel_size=2, stride=2)
        elif upsampling == "bilinear":
            self.up = nn.Sequential(
                nn.Conv2d(in_channels, skip_channels, kernel_size=1),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            )
        else:
            raise ValueError(f"upsampling must be 'transposed' or 'bilinear', got {upsampling!r}")
        self.conv = ConvBlock(skip_channels * 2, out_channels, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        channels: tuple[int, ...] | list[int] = (16, 32, 64, 128, 256),
        dropout: tuple[float, ...] | list[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
        decoder_dropout: float = 0.0,
        deep_supervision: bool = False,
        upsampling: Upsampling = "transposed",
    ) -> None:
        super().__init__()
        if len(channels) != 5 or len(dropout) != 5:
            raise ValueError("UNet needs 5 channel widths and 5 dropout rates, one per level")
        self.channels = list(channels)
        self.num_classes = num_classes
        self._hyperparameters = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "channels": list(channels),
            "dropout": list(dropout),
            "decoder_dropout": decoder_dropout,
            "deep_supervision": deep_supervision,
            "upsampling": upsampling,
        }
        self.encoder = nn.ModuleList([ConvBlock(in_channels, channels[0], dropout[0])])
        for level in range(1, 5):
            self.encoder.append(ConvBlock(channels[level - 1], channels[level], dropout[level]))
        self.pool = nn.MaxPool2d(2)
        self.decoder = nn.ModuleList(
            UpBlock(channels[level + 1], channels[level], channels[level], decoder_dropout, upsampling)
            for level in (3, 2, 1, 0)
        )
        self.head = nn.Conv2d(channels[0], num_classes, kernel_size=3, padding=1)
        self.deep_heads = (
            nn.ModuleList(nn.Conv2d(channels[level], num_classes, kernel_size=1) for level in (3, 2, 1))
            if deep_supervision
            else None
        )

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments, so a sibling network (e.g. a second co-training branch) can be
        built as ``UNet(**{**net.hyperparameters(), "upsampling": "bilinear"})``."""
        return {
            key: list(value) if isinstance(value, list) else value
            for key, value in self._hyperparameters.items()
        }

    def forward_features(self, x: torch.Tensor) -> UNetOutput:
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        features = []
        x = skips[-1]
        for up, skip in zip(self.decoder, reversed(skips[:-1]), strict=True):
            x = up(x, skip)
            features.append(x)
        deep = []
        if self.deep_heads is not None:
            deep = [head(f) for head, f in zip(self.deep_heads, features[:3], strict=True)]
        return UNetOutput(self.head(x), features, deep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).logits
