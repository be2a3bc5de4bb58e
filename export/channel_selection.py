"""Start a narrower U-Net from a trained one by keeping each layer's most important channels.

A distilled student that starts from random weights must rediscover every feature the teacher already
has; one that starts from a subset of the teacher's channels begins close to a working network and the
distillation only has to repair what the missing channels carried (the prune-then-distill recipe).
Channel importance is the batch-norm scale |γ| for convolutions followed by a BN (the network-slimming
criterion: a channel with a small γ contributes little after normalisation) and the filter's L1 norm
for the upsampling convolution, which has no BN. Selections are kept in the teacher's channel order.

Both networks must be :class:`UNet` with trained (unfolded) batch norms and the same upsampling; the
student's widths may not exceed the teacher's at any level.
"""

from __future__ import annotations

import torch
from torch import nn

from mpcl.errors import ConfigError
from mpcl.nn.unet import ConvBlock, UNet, UpBlock


def top_channels(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest ``scores``, in ascending index order."""
    return torch.sort(torch.topk(scores, count).indices).values


def _copy_conv(source: nn.Conv2d, target: nn.Conv2d, keep_in: torch.Tensor, keep_out: torch.Tensor) -> None:
    target.weight.copy_(source.weight[keep_out][:, keep_in])
    if target.bias is not None and source.bias is not None:
        target.bias.copy_(source.bias[keep_out])


def _copy_norm(source: nn.BatchNorm2d, target: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(target, name).copy_(getattr(source, name)[keep])


def _copy_block(source: ConvBlock, target: ConvBlock, keep_in: torch.Tensor) -> torch.Tensor:
    """Copy both conv+BN pairs of a block; returns the block's kept output channels."""
    s, t = source.block, target.block
    middle = top_channels(s[1].weight.abs(), t[0].out_channels)
    _copy_conv(s[0], t[0], keep_in, middle)
    _copy_norm(s[1], t[1], middle)
    out = top_channels(s[5].weight.abs(), t[4].out_channels)
    _copy_conv(s[4], t[4], middle, out)
    _copy_norm(s[5], t[5], out)
    return out


def _copy_up(source: UpBlock, target: UpBlock, keep_in: torch.Tensor) -> torch.Tensor:
    """Copy the upsampling convolution; returns its kept output channels."""
    if isinstance(source.up, nn.ConvTranspose2d):  # weight: (in, out, k, k)
        keep = top_channels(source.up.weight.abs().sum(dim=(0, 2, 3)), target.up.out_channels)
        target.up.weight.copy_(source.up.weight[keep_in][:, keep])
        target.up.bias.copy_(source.up.bias[keep])
        return keep
    source_conv, target_conv = source.up[0], target.up[0]  # 1x1 conv then a fixed bilinear x2
    keep = top_channels(source_conv.weight.abs().sum(dim=(1, 2, 3)), target_conv.out_channels)
    _copy_conv(source_conv, target_conv, keep_in, keep)
    return keep


def _check_compatible(teacher: UNet, student: UNet) -> None:
    if any(s > t for s, t in zip(student.channels, teacher.channels, strict=True)):
        raise ConfigError(
            f"init: teacher_channels needs student channels {student.channels} no wider than the "
            f"teacher's {teacher.channels} at every level"
        )
    if type(teacher.decoder[0].up) is not type(student.decoder[0].up):
        raise ConfigError("init: teacher_channels needs the student and teacher to upsample the same way")
    if not isinstance(teacher.encoder[0].block[1], nn.BatchNorm2d):
        raise ConfigError("init: teacher_channels needs the teacher's trained batch norms (not folded)")


@torch.no_grad()
def init_from_teacher_channels(student: UNet, teacher: UNet) -> UNet:
    """Overwrite ``student``'s weights with the teacher's most important channels; returns ``student``."""
    _check_compatible(teacher, student)
    keep = torch.arange(teacher.encoder[0].block[0].in_channels)
    skips = []
    for source, target in zip(teacher.encoder, student.encoder, strict=True):
        keep = _copy_block(source, target, keep)
        skips.append(keep)
    teacher_skip_widths = list(reversed(teacher.channels[:-1]))
    for source, target, skip, width in zip(
        teacher.decoder, student.decoder, reversed(skips[:-1]), teacher_skip_widths, strict=True
    ):
        up = _copy_up(source, target, keep)
        keep = _copy_block(source.conv, target.conv, torch.cat([skip, up + width]))  # cat([skip, up])
    _copy_conv(teacher.head, student.head, keep, torch.arange(teacher.head.out_channels))
    return student
