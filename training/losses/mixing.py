"""Copy-paste mixing (BCP) and the pixel-weighted losses that go with it."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


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


def paste(inside: torch.Tensor, outside: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``inside`` where mask is 1, ``outside`` elsewhere (images (B,1,H,W) or label maps (B,H,W))."""
    if inside.dim() == 4:
        mask = mask[None, None]
    return (
        inside * mask + outside * (1 - mask)
        if inside.is_floating_point()
        else torch.where(mask.bool(), inside, outside)
    )


def largest_component_per_class(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Keep, for each slice and foreground class, only its largest 2D connected component (BCP's filter
    of teacher pseudo-labels: cardiac structures are single blobs, stray islands are noise)."""
    array = labels.cpu().numpy()
    cleaned = np.zeros_like(array)
    for index, slice_labels in enumerate(array):
        for cls in range(1, num_classes):
            components, count = ndimage.label(slice_labels == cls)
            if count == 0:
                continue
            sizes = np.bincount(components.ravel())[1:]
            cleaned[index][components == int(np.argmax(sizes)) + 1] = cls
    return torch.from_numpy(cleaned).to(labels.device)
