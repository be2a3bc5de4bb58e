"""Copy-paste mixing (BCP): box masks, pasting, BCP's region-wise ``mix_loss`` and the pseudo-label filter.

The losses run in float32 under mixed precision (``@fp32``, see ``mpcl.training.precision``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from mpcl.training.precision import fp32


def random_box_mask(
    shape: tuple[int, int], ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(H, W) float mask, 1 inside one random box of ratio·H × ratio·W (the pasted patch), 0 elsewhere."""
    height, width = shape
    box_h, box_w = int(height * ratio), int(width * ratio)
    top = int(torch.randint(0, height - box_h + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - box_w + 1, (1,), generator=generator))
    mask = torch.zeros(height, width)
    mask[top : top + box_h, left : left + box_w] = 1.0
    return mask


def outer_box_mask(shape: tuple[int, int], ratio: float) -> torch.Tensor:
    """(H, W) float mask, 0 inside one random box of int(ratio·H) × int(ratio·W), 1 outside: BCP's
    ``generate_mask`` (its corner is drawn from [0, H − box_h) as ``np.random.randint`` does)."""
    height, width = shape
    box_h, box_w = int(height * ratio), int(width * ratio)
    top = int(torch.randint(0, max(height - box_h, 1), (1,)))
    left = int(torch.randint(0, max(width - box_w, 1), (1,)))
    mask = torch.ones(height, width)
    mask[top : top + box_h, left : left + box_w] = 0.0
    return mask


@fp32
def masked_dice_loss(
    probabilities: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, smooth: float = 1e-10
) -> torch.Tensor:
    """BCP's ``DiceLoss(probabilities, target, mask)``: per class c, 1 − (2Σ p·t·m + s) / (Σ p²·m + Σ t·m
    + s), pooled over batch and pixels, averaged over classes (background included); ``mask`` (B, H, W)."""
    num_classes = probabilities.shape[1]
    one_hot = F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2).to(probabilities.dtype)
    m = mask[:, None].to(probabilities.dtype)
    dims = (0, 2, 3)
    intersection = (probabilities * one_hot * m).sum(dims)
    denominator = (probabilities * probabilities * m).sum(dims) + (one_hot * m).sum(dims)
    return (1 - (2 * intersection + smooth) / (denominator + smooth)).mean()


@fp32
def mix_loss(
    logits: torch.Tensor,
    outer_target: torch.Tensor,
    inner_target: torch.Tensor,
    outer_mask: torch.Tensor,
    outer_weight: float,
    inner_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCP's ``mix_loss``: (Dice, CE) of one mixed batch, each the weighted sum of two regions' losses.

    Outside the box (``outer_mask`` = 1, (B, H, W)) the target is ``outer_target`` with weight
    ``outer_weight``; inside it ``inner_target`` with ``inner_weight``. Dice is :func:`masked_dice_loss`
    per region; CE is the region's mean pixel cross-entropy (sum over the region / its pixel count).
    """
    probabilities = torch.softmax(logits, dim=1)
    inner_mask = 1 - outer_mask
    dice = masked_dice_loss(probabilities, outer_target, outer_mask) * outer_weight
    dice = dice + masked_dice_loss(probabilities, inner_target, inner_mask) * inner_weight
    outer_ce = F.cross_entropy(logits, outer_target.long(), reduction="none")
    inner_ce = F.cross_entropy(logits, inner_target.long(), reduction="none")
    ce = outer_weight * (outer_ce * outer_mask).sum() / (outer_mask.sum() + 1e-16)
    ce = ce + inner_weight * (inner_ce * inner_mask).sum() / (inner_mask.sum() + 1e-16)
    return dice, ce


def mix_images(outer: torch.Tensor, inner: torch.Tensor, outer_mask: torch.Tensor) -> torch.Tensor:
    """``outer`` outside the box, ``inner`` inside it (BCP's ``a * img_mask + b * (1 - img_mask)``)."""
    return outer * outer_mask + inner * (1 - outer_mask)


def largest_component_per_class(
    labels: torch.Tensor, num_classes: int, connectivity: int = 8
) -> torch.Tensor:
    """Keep, for each slice and foreground class, only its largest 2D connected component (BCP's filter
    of teacher pseudo-labels: cardiac structures are single blobs, stray islands are noise).

    ``connectivity`` 8 is BCP's ``skimage.measure.label`` default for 2D; 4 joins only edge neighbours.
    Ties between equally large components keep the first in scan order, as ``np.argmax`` there does.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    array = labels.cpu().numpy()
    cleaned = np.zeros_like(array)
    for index, slice_labels in enumerate(array):
        for cls in range(1, num_classes):
            components, count = ndimage.label(slice_labels == cls, structure=structure)
            if count == 0:
                continue
            sizes = np.bincount(components.ravel())[1:]
            cleaned[index][components == int(np.argmax(sizes)) + 1] = cls
    return torch.from_numpy(cleaned).to(labels.device)
