"""Multi-prototype building blocks (MPCL): intensity sub-groups, group means, the prototype-space losses
and the prototype classifier. Pure functions of tensors; the prototype bank that carries state across
steps lives in ``mpcl.training.methods.prototype_bank``.

Shapes: embeddings ``z`` (B, D, h, w) unit vectors; ``labels`` (B, h, w) with ``IGNORE`` for pixels that
take no part; ``groups`` (B, h, w) intensity group per pixel (``IGNORE`` where undefined); prototypes
(C, K, D) with a (C, K) ``valid`` mask (classes may use fewer than K groups).

Everything here runs in float32 under mixed precision (``@fp32``: autocast off, bf16/fp16 inputs cast
up): similarities of unit vectors divided by τ = 0.1 are logits, so bf16's ≈ 0.4 % error per cosine
would be a ≈ 0.04 error per logit, and group means feed an EMA bank whose 1 % steps bf16 cannot resolve
(``mpcl.training.precision``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from mpcl.training.precision import fp32

IGNORE = -1


def _group_thresholds(
    values: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    rule: Literal["quantile", "kmeans"],
    iterations: int = 10,
) -> torch.Tensor:
    """(R, k−1) ascending intensity thresholds for each row of ``values`` (R, N), over ``mask``ed entries.

    ``quantile``: the (j/k)-quantiles, equal-sized groups. ``kmeans``: 1-D k-means (Lloyd, initialised
    at the ((j+½)/k)-quantiles) and thresholds midway between sorted centres, so groups follow the
    intensity modes even when the sub-regions differ in size.
    """
    masked = torch.where(mask, values, torch.full_like(values, float("nan")))
    if rule == "quantile":
        levels = torch.arange(1, k, dtype=values.dtype, device=values.device) / k
        return torch.nanquantile(masked, levels, dim=1).T
    levels = (torch.arange(k, dtype=values.dtype, device=values.device) + 0.5) / k
    centres = torch.nanquantile(masked, levels, dim=1).T  # (R, k)
    weights = mask[..., None].to(values.dtype)
    for _ in range(iterations):
        assignment = (values[..., None] - centres[:, None, :]).abs().argmin(-1)
        one_hot = F.one_hot(assignment, k).to(values.dtype) * weights
        counts = one_hot.sum(1)
        sums = (one_hot * values[..., None]).sum(1)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    centres = centres.sort(dim=1).values
    return (centres[:, 1:] + centres[:, :-1]) / 2


@torch.no_grad()
def intensity_groups(
    intensity: torch.Tensor,
    labels: torch.Tensor,
    groups_per_class: Sequence[int],
    n_min: int = 16,
    scope: Literal["image", "batch"] = "image",
    rule: Literal["quantile", "kmeans"] = "kmeans",
) -> torch.Tensor:
    """Intensity group of each labelled pixel: 0 = darkest sub-range of its class, K_c − 1 = brightest.

    Thresholds are computed per image (``scope: image``: per-volume intensity scaling makes absolute
    values incomparable across patients) or over the batch, from the pixels of each class; a class with
    fewer than ``n_min`` pixels in the scope cannot be split reliably and its pixels get ``IGNORE``
    (a class with K = 1 needs no split and keeps all its pixels).
    ``intensity`` and ``labels`` are (B, h, w).
    """
    batch = intensity.shape[0]
    rows = 1 if scope == "batch" else batch
    values = intensity.reshape(rows, -1).float()
    flat_labels = labels.reshape(rows, -1)
    groups = torch.full_like(flat_labels, IGNORE)
    for cls, k in enumerate(groups_per_class):
        in_class = flat_labels == cls
        if k == 1:  # nothing to split: every pixel of the class is in its one group
            groups = torch.where(in_class, torch.zeros_like(groups), groups)
            continue
        enough = in_class.sum(1) >= max(n_min, 1)
        if not bool(enough.any()):
            continue
        thresholds = _group_thresholds(values[enough], in_class[enough], k, rule)
        rows_groups = (values[enough][..., None] > thresholds[:, None, :]).sum(-1)
        update = groups[enough]
        update = torch.where(in_class[enough], rows_groups, update)
        groups[enough] = update
    return groups.reshape(labels.shape)


@fp32
def group_sums(
    values: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, num_classes: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(class, group) sums (C, K, D) of ``values`` (B, D, h, w) and pixel counts (C, K)."""
    valid = (labels >= 0) & (groups >= 0)
    index = (labels * k + groups)[valid]
    rows = values.permute(0, 2, 3, 1)[valid]
    sums = torch.zeros(num_classes * k, values.shape[1], dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, index, rows)
    counts = torch.bincount(index, minlength=num_classes * k)
    return sums.view(num_classes, k, -1), counts.view(num_classes, k)


@fp32
def group_prototypes(
    z: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, num_classes: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised mean embedding of each (class, group) (zero where empty) and the pixel counts."""
    sums, counts = group_sums(z, labels, groups, num_classes, k)
    return F.normalize(sums, dim=-1), counts


def _zero(reference: torch.Tensor) -> torch.Tensor:
    """A zero loss that keeps the graph connected (backward works even when a term has nothing to do)."""
    return reference.sum() * 0.0


@fp32
def pixel_prototype_contrast(
    z: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    prototypes: torch.Tensor,
    valid: torch.Tensor,
    tau: float = 0.1,
    anchors_per_group: int = 256,
) -> torch.Tensor:
    """InfoNCE of pixels against the bank: positive = the prototype of the pixel's (class, group),
    negatives = every prototype of the other classes. Sibling prototypes of the same class are left
    out of the denominator: intra-class structure is the diversity term's job, not a repulsion.
    Up to ``anchors_per_group`` random pixels per (class, group) keep the cost independent of size."""
    num_classes, k, dim = prototypes.shape
    ok = (labels >= 0) & (groups >= 0)
    ids = (labels * k + groups)[ok]
    embeddings = z.permute(0, 2, 3, 1)[ok]
    keep = valid.reshape(-1)[ids]
    ids, embeddings = ids[keep], embeddings[keep]
    if ids.numel() == 0:
        return _zero(z)
    permutation = torch.randperm(ids.numel(), device=ids.device)
    shuffled = ids[permutation]
    order = torch.argsort(shuffled, stable=True)
    sorted_ids = shuffled[order]
    counts = torch.bincount(sorted_ids, minlength=num_classes * k)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(sorted_ids.numel(), device=ids.device) - starts[sorted_ids]
    chosen = permutation[order[rank < anchors_per_group]]
    anchor_ids = ids[chosen]
    logits = embeddings[chosen] @ prototypes.reshape(-1, dim).T / tau
    columns = torch.arange(num_classes * k, device=ids.device)
    sibling = (columns[None, :] // k == anchor_ids[:, None] // k) & (columns[None, :] != anchor_ids[:, None])
    logits = logits.masked_fill(sibling | ~valid.reshape(1, -1), float("-inf"))
    return F.cross_entropy(logits, anchor_ids)


@fp32
def diversity_loss(prototypes: torch.Tensor, present: torch.Tensor, margin: float = 0.7) -> torch.Tensor:
    """Anti-collapse: mean over classes of mean_{k≠k'} max(0, cos(μ_ck, μ_ck') − margin)."""
    k = prototypes.shape[1]
    similarity = torch.einsum("ckd,cld->ckl", prototypes, prototypes)
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=prototypes.device)
    pairs = present[:, :, None] & present[:, None, :] & off_diagonal
    pair_counts = pairs.sum((1, 2))
    if not bool((pair_counts > 0).any()):
        return _zero(prototypes)
    per_class = (F.relu(similarity - margin) * pairs).sum((1, 2)) / pair_counts.clamp_min(1)
    return per_class[pair_counts > 0].mean()


@fp32
def separation_loss(
    prototypes: torch.Tensor,
    present: torch.Tensor,
    bank: torch.Tensor,
    valid: torch.Tensor,
    margin: float = 0.0,
) -> torch.Tensor:
    """Inter-class separation: mean over c≠c' of max(0, cos(μ_ck, P_c'k') − margin)."""
    num_classes = prototypes.shape[0]
    similarity = torch.einsum("ckd,eld->ckel", prototypes, bank)
    classes = torch.arange(num_classes, device=prototypes.device)
    other = (classes[:, None] != classes[None, :])[:, None, :, None]
    mask = present[:, :, None, None] & valid[None, None] & other
    if not bool(mask.any()):
        return _zero(prototypes)
    return F.relu(similarity - margin)[mask].mean()


@fp32
def generalisation_loss(
    prototypes: torch.Tensor, present: torch.Tensor, bank: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Batch prototypes agree with the slowly moving bank of the same (class, group): mean 1 − cos."""
    mask = present & valid
    if not bool(mask.any()):
        return _zero(prototypes)
    return (1 - (prototypes * bank).sum(-1))[mask].mean()


@fp32
def prototype_logits(
    z: torch.Tensor, bank: torch.Tensor, valid: torch.Tensor, tau: float = 0.1
) -> torch.Tensor:
    """Prototype-classifier logits (B, C, h, w): s_c/τ with s_c = τ·logsumexp_k(z·P_ck/τ), the smooth
    maximum over the class's prototypes. Needs at least one valid prototype per class."""
    similarity = torch.einsum("bdhw,ckd->bckhw", z, bank) / tau
    similarity = similarity.masked_fill(~valid[None, :, :, None, None], float("-inf"))
    return torch.logsumexp(similarity, dim=2)


@fp32
def confidence_weight(
    probabilities: torch.Tensor, threshold: float, mode: Literal["hard", "soft"]
) -> torch.Tensor:
    """Per-pixel weight from a (B, C, H, W) distribution: 1[max ≥ threshold] or the max itself."""
    top = probabilities.max(dim=1).values
    return (top >= threshold).to(probabilities.dtype) if mode == "hard" else top


@fp32
def dual_alignment(
    student_logits: torch.Tensor,
    student_prototype_logits: torch.Tensor,
    teacher_probabilities: torch.Tensor,
    teacher_prototype_logits: torch.Tensor,
    pixels: torch.Tensor,
    threshold: float = 0.9,
    mode: Literal["hard", "soft"] = "hard",
) -> torch.Tensor:
    """Bidirectional, confidence-weighted knowledge alignment on the ``pixels`` (B, H, W) mask:
    KL(q_T ‖ p_S) moves prototype knowledge into the segmentation head, KL(p_T ‖ q_S) moves the
    segmentation head's knowledge into the prototype space. All maps are (B, C, H, W) at one size."""
    if not bool(pixels.any()):
        return _zero(student_logits) + _zero(student_prototype_logits)
    teacher_prototype = torch.softmax(teacher_prototype_logits, dim=1)
    to_segmentation = F.kl_div(
        torch.log_softmax(student_logits, dim=1), teacher_prototype, reduction="none"
    ).sum(1)
    to_prototypes = F.kl_div(
        torch.log_softmax(student_prototype_logits, dim=1), teacher_probabilities, reduction="none"
    ).sum(1)
    weighted = (
        confidence_weight(teacher_prototype, threshold, mode) * to_segmentation
        + confidence_weight(teacher_probabilities, threshold, mode) * to_prototypes
    )
    return weighted[pixels].mean()
