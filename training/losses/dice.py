"""Supervised segmentation losses: soft Dice and the SSL4MIS ½(CE + Dice) combination.

Under mixed precision (``train.precision``) they run in float32 (``@fp32``: bf16 logits cast up, autocast
off): Dice ratios and cross-entropy are means over whole batches of small differences that bf16's 8-bit
mantissa would round away (see ``mpcl.training.precision``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpcl.training.precision import fp32


@fp32
def soft_dice_loss(
    probabilities: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """Mean over classes (background included) of 1 − soft Dice, pooled over the whole batch.

    ``probabilities``: (B, C, H, W) softmax output; ``target``: (B, H, W) integer labels; ``weight``:
    optional (B, H, W) per-pixel weights (copy-paste methods trust pseudo-labelled pixels less).
    """
    num_classes = probabilities.shape[1]
    one_hot = F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2).to(probabilities.dtype)
    w = 1.0 if weight is None else weight[:, None].to(probabilities.dtype)
    dims = (0, 2, 3)
    intersection = (w * probabilities * one_hot).sum(dims)
    denominator = (w * probabilities * probabilities).sum(dims) + (w * one_hot).sum(dims)
    return (1 - (2 * intersection + eps) / (denominator + eps)).mean()


@fp32
def ce_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """½·(cross-entropy + soft Dice), the supervised loss of the SSL4MIS recipe; optionally pixel-weighted."""
    if weight is None:
        ce = F.cross_entropy(logits, target.long())
    else:
        weight = weight.to(logits.dtype)
        pixel_ce = F.cross_entropy(logits, target.long(), reduction="none")
        ce = (pixel_ce * weight).sum() / weight.sum().clamp_min(1e-5)
    return 0.5 * (ce + soft_dice_loss(torch.softmax(logits, dim=1), target, weight))


def deep_supervision_loss(deep_logits: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Average ce_dice_loss of coarse-scale logits against nearest-downsampled labels."""
    losses = []
    for logits in deep_logits:
        small = F.interpolate(target[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
        losses.append(ce_dice_loss(logits, small))
    return torch.stack(losses).mean()
