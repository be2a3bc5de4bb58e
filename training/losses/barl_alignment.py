"""BARL representation-space alignment (spec b3.6): the two branches' embeddings of the same region —
a whole class in an image (region level) or one connected component of it (lesion-instance level) —
must point the same way.

Region means reuse the prototype pooling of ``mpcl.training.losses.prototypes`` (``group_prototypes``);
instance matching is plain numpy/scipy on CPU (connected components + Hungarian assignment on 1 − IoU)
and carries no gradient; only the pooling of embeddings over the matched regions is differentiable.
Shapes: embeddings (B, D, h, w) unit vectors; label / prediction maps (B, h, w). Region means and their
cosines run in float32 under mixed precision (``@fp32``, see ``mpcl.training.precision``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from mpcl.training.losses.prototypes import IGNORE, group_prototypes
from mpcl.training.precision import fp32


def _zero(*references: torch.Tensor) -> torch.Tensor:
    return sum(reference.sum() * 0.0 for reference in references)


# -- region level ------------------------------------------------------------------------------------
@fp32
def image_class_centroids(
    embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised mean embedding per (class, image) (C, B, D) and pixel counts (C, B); IGNORE pixels
    take no part. (The prototype pooling with the image index as the "group".)"""
    batch = labels.shape[0]
    image_index = torch.arange(batch, device=labels.device).view(batch, 1, 1).expand_as(labels)
    return group_prototypes(embeddings, labels, image_index, num_classes, batch)


@fp32
def region_alignment(
    embeddings_a: torch.Tensor,
    embeddings_b: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    min_pixels: int = 16,
) -> torch.Tensor:
    """L_ra = mean over (image, class) with ≥ ``min_pixels`` labelled pixels of 1 − cos(r_a, r_b),
    r = the branch's class centroid in that image. Both branches receive gradient."""
    centroids_a, counts = image_class_centroids(embeddings_a, labels, num_classes)
    centroids_b, _ = image_class_centroids(embeddings_b, labels, num_classes)
    present = counts >= max(min_pixels, 1)
    if not bool(present.any()):
        return _zero(embeddings_a, embeddings_b)
    return (1.0 - (centroids_a * centroids_b).sum(-1))[present].mean()


# -- instance level ----------------------------------------------------------------------------------
def connected_components(mask: np.ndarray, min_size: int = 1) -> tuple[np.ndarray, int]:
    """Components of a boolean mask with full connectivity (8 in 2D, 26 in 3D), those smaller than
    ``min_size`` dropped, the rest numbered 1..n in scan order (0 = none)."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labelled, count = ndimage.label(mask, structure=structure)
    sizes = np.bincount(labelled.ravel(), minlength=count + 1)
    keep = sizes >= min_size
    keep[0] = False
    renumber = np.zeros(count + 1, dtype=np.int64)
    renumber[keep] = np.arange(1, int(keep.sum()) + 1)
    return renumber[labelled], int(keep.sum())


@dataclass(frozen=True)
class InstanceMatch:
    """Components of two masks and the accepted one-to-one pairs (1-based component numbers)."""

    components_a: np.ndarray
    components_b: np.ndarray
    pairs: list[tuple[int, int]]
    ious: list[float]
    count_a: int
    count_b: int

    @property
    def unmatched_a(self) -> list[int]:
        matched = {a for a, _ in self.pairs}
        return [i for i in range(1, self.count_a + 1) if i not in matched]

    @property
    def unmatched_b(self) -> list[int]:
        matched = {b for _, b in self.pairs}
        return [i for i in range(1, self.count_b + 1) if i not in matched]


def match_instances(
    mask_a: np.ndarray, mask_b: np.ndarray, min_size: int = 10, min_iou: float = 0.3
) -> InstanceMatch:
    """Pair the connected components of ``mask_a`` and ``mask_b`` one-to-one by maximal total IoU
    (Hungarian assignment on 1 − IoU); pairs with IoU below ``min_iou`` are rejected."""
    if mask_a.shape != mask_b.shape:
        raise ValueError(f"match_instances needs masks of one shape, got {mask_a.shape} and {mask_b.shape}")
    components_a, count_a = connected_components(mask_a.astype(bool), min_size)
    components_b, count_b = connected_components(mask_b.astype(bool), min_size)
    if count_a == 0 or count_b == 0:
        return InstanceMatch(components_a, components_b, [], [], count_a, count_b)
    joint = np.bincount(
        (components_a * (count_b + 1) + components_b).ravel(), minlength=(count_a + 1) * (count_b + 1)
    ).reshape(count_a + 1, count_b + 1)
    intersection = joint[1:, 1:].astype(np.float64)
    size_a, size_b = joint[1:].sum(1), joint[:, 1:].sum(0)
    iou = intersection / (size_a[:, None] + size_b[None, :] - intersection)
    rows, cols = linear_sum_assignment(1.0 - iou)
    accepted = [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if iou[r, c] >= min_iou]
    return InstanceMatch(
        components_a,
        components_b,
        [(r + 1, c + 1) for r, c in accepted],
        [float(iou[r, c]) for r, c in accepted],
        count_a,
        count_b,
    )


@dataclass(frozen=True)
class InstanceRegions:
    """Region ids per pixel (IGNORE outside), built from both branches' predictions of a batch.

    ``matched_a`` / ``matched_b``: id p of the p-th matched pair on branch A's / B's component (a pixel
    has one class and one component per branch, so one id per map suffices). ``unmatched_a``: ids of
    A's components without a partner (likewise ``unmatched_b``), used by the optional penalty.
    """

    matched_a: torch.Tensor
    matched_b: torch.Tensor
    num_matched: int
    unmatched_a: torch.Tensor
    num_unmatched_a: int
    unmatched_b: torch.Tensor
    num_unmatched_b: int

    def on_grid(self, stride: int) -> InstanceRegions:
        """Nearest subsampling onto an embedding grid of the given stride."""
        if stride == 1:
            return self
        sub = lambda ids: ids[:, ::stride, ::stride]  # noqa: E731
        return InstanceRegions(
            sub(self.matched_a),
            sub(self.matched_b),
            self.num_matched,
            sub(self.unmatched_a),
            self.num_unmatched_a,
            sub(self.unmatched_b),
            self.num_unmatched_b,
        )


@torch.no_grad()
def instance_regions(
    prediction_a: torch.Tensor,
    prediction_b: torch.Tensor,
    num_classes: int,
    min_size: int = 10,
    min_iou: float = 0.3,
) -> InstanceRegions:
    """Match, per image and foreground class, the components of branch A's and branch B's label maps."""
    array_a, array_b = prediction_a.cpu().numpy(), prediction_b.cpu().numpy()
    maps = {name: np.full(array_a.shape, IGNORE, dtype=np.int64) for name in ("ma", "mb", "ua", "ub")}
    counts = {"m": 0, "ua": 0, "ub": 0}
    for index in range(array_a.shape[0]):
        for cls in range(1, num_classes):
            match = match_instances(array_a[index] == cls, array_b[index] == cls, min_size, min_iou)
            for a, b in match.pairs:
                maps["ma"][index][match.components_a == a] = counts["m"]
                maps["mb"][index][match.components_b == b] = counts["m"]
                counts["m"] += 1
            for a in match.unmatched_a:
                maps["ua"][index][match.components_a == a] = counts["ua"]
                counts["ua"] += 1
            for b in match.unmatched_b:
                maps["ub"][index][match.components_b == b] = counts["ub"]
                counts["ub"] += 1
    device = prediction_a.device
    tensor = lambda name: torch.from_numpy(maps[name]).to(device)  # noqa: E731
    return InstanceRegions(
        tensor("ma"), tensor("mb"), counts["m"], tensor("ua"), counts["ua"], tensor("ub"), counts["ub"]
    )


@fp32
def region_means(
    embeddings: torch.Tensor, ids: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised mean embedding (count, D) of each region id and its pixel count (count,)."""
    means, counts = group_prototypes(embeddings, ids, torch.zeros_like(ids), count, 1)
    return means[:, 0], counts[:, 0]


def _paired_cosine_distance(
    embeddings_a: torch.Tensor,
    ids_a: torch.Tensor,
    embeddings_b: torch.Tensor,
    ids_b: torch.Tensor,
    count: int,
) -> torch.Tensor:
    """1 − cos of region means, one value per region present (non-empty) in both maps."""
    means_a, counts_a = region_means(embeddings_a, ids_a, count)
    means_b, counts_b = region_means(embeddings_b, ids_b, count)
    present = (counts_a > 0) & (counts_b > 0)  # a tiny component can vanish on a coarser grid
    return (1.0 - (means_a * means_b).sum(-1))[present]


@fp32
def instance_alignment(
    embeddings_a: torch.Tensor,
    embeddings_b: torch.Tensor,
    regions: InstanceRegions,
    unmatched_penalty: float = 0.0,
) -> torch.Tensor:
    """L_ia = mean over matched pairs (u, v) of 1 − cos(mean_u e_a, mean_v e_b).

    ``unmatched_penalty`` > 0 adds, with that weight, the same distance for each unmatched component
    between the two branches' embeddings pooled over that component's own pixels (a component only one
    branch sees is still the same tissue for both); 0 (default) ignores unmatched components.
    """
    loss = _zero(embeddings_a, embeddings_b)
    if regions.num_matched:
        distances = _paired_cosine_distance(
            embeddings_a, regions.matched_a, embeddings_b, regions.matched_b, regions.num_matched
        )
        if distances.numel():
            loss = loss + distances.mean()
    if unmatched_penalty > 0:
        for ids, count in (
            (regions.unmatched_a, regions.num_unmatched_a),
            (regions.unmatched_b, regions.num_unmatched_b),
        ):
            if count:
                distances = _paired_cosine_distance(embeddings_a, ids, embeddings_b, ids, count)
                if distances.numel():
                    loss = loss + unmatched_penalty * distances.mean()
    return loss
