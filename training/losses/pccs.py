"""PCCS building blocks (spec b2.3–b2.6): entropy-based uncertainty, the teacher's prototype classifier,
the uncertainty-consistency loss, pooling of SDM layers into prototypes, the uncertainty-weighted
prototype contrast, Sinkhorn assignment to sub-prototypes, and the layer → K-slot grouping used to mix
boundary-aware prototypes into the teacher's prototypes. Pure functions of tensors; the prototype state
lives in ``mpcl.training.methods.prototype_bank.PrototypeBank``.

Everything here runs in float32 under mixed precision (``@fp32``: autocast off, bf16/fp16 inputs cast
up): prototype cosines / τ = 0.05 are logits, Sinkhorn iterates log-sum-exps of scores / ε = 0.05 (20×
the rounding of its input), and entropies of confident pixels are tiny differences
(``mpcl.training.precision``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from mpcl.training.losses.consistency import sigmoid_rampup
from mpcl.training.losses.prototypes import _zero
from mpcl.training.precision import fp32

_MASKED = -1.0e4  # a finite "−inf" for masked logits: exp underflows to 0 and gradients stay finite


@fp32
def entropy(probabilities: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Shannon entropy (nats) of distributions along ``dim``; ``eps`` keeps log(0) finite."""
    return -(probabilities * torch.log(probabilities + eps)).sum(dim)


def uncertainty_threshold(iteration: int, total: int) -> float:
    """θ(t) = (0.25 + 0.25·ramp(t, T))·ln 2.7, the PCCS code's entropy threshold: a pixel with entropy
    above it is "uncertain". It rises over the run, so fewer pixels count as uncertain as the net learns."""
    return (0.25 + 0.25 * sigmoid_rampup(iteration, total)) * math.log(2.7)


@fp32
def entropy_weight(
    probabilities: torch.Tensor, mode: Literal["hard", "soft"], threshold: float
) -> torch.Tensor:
    """Per-pixel trust in a (B, C, H, W) prediction, lower where it is more uncertain:
    ``hard`` = 1[entropy ≤ threshold], ``soft`` = 1 − entropy / ln C (1 when one-hot, 0 when uniform)."""
    uncertainty = entropy(probabilities)
    if mode == "hard":
        return (uncertainty <= threshold).to(probabilities.dtype)
    return (1.0 - uncertainty / math.log(probabilities.shape[1])).clamp(0.0, 1.0)


@fp32
def teacher_features(features: torch.Tensor) -> torch.Tensor:
    """The teacher's pixel embeddings: LayerNorm over channels (no affine), then unit length."""
    z = features.permute(0, 2, 3, 1)
    z = F.normalize(F.layer_norm(z, z.shape[-1:]), dim=-1)
    return z.permute(0, 3, 1, 2)


@fp32
def class_scores(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """The teacher's prototype classifier (B, C, h, w): per class, the best cosine to its K prototypes
    (unit ``features`` (B, D, h, w) and ``prototypes`` (C, K, D)), LayerNorm'd over the classes."""
    best = torch.einsum("bdhw,ckd->bckhw", features, prototypes).amax(dim=2)
    return F.layer_norm(best.movedim(1, -1), (best.shape[1],)).movedim(-1, 1)


def _reduce_entropy(values: torch.Tensor, mode: Literal["fro", "mean"]) -> torch.Tensor:
    squares = (values * values).sum() if mode == "fro" else (values * values).mean()
    return torch.sqrt(squares + 1e-12)


@fp32
def uncertainty_consistency(
    student_logits: torch.Tensor,
    teacher_scores: torch.Tensor,
    n_labeled: int,
    entropy_coefficient: float = 0.1,
    entropy_reduce: Literal["fro", "mean"] = "fro",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """l_c: squared error between the student's segmentation logits and the teacher's prototype scores
    (both (B, C, h, w)), labelled and unlabelled halves averaged separately and summed, plus
    ``entropy_coefficient``·½(‖H_S‖ + ‖H_T‖) with H the per-pixel entropy of each branch's softmax.

    ``entropy_reduce: fro`` is the Frobenius norm over the whole batch, as the PCCS code (its scale grows
    with batch and grid); ``mean`` divides it by √(pixel count): the root-mean-square entropy, the same
    gradient direction at a scale independent of batch and resolution. ``weight`` (B, h, w) optionally
    weights pixels in the squared error (e.g. ``entropy_weight`` of the teacher)."""
    error = ((student_logits - teacher_scores) ** 2).mean(dim=1)
    squared = []
    for part in (slice(0, n_labeled), slice(n_labeled, None)):
        values = error[part]
        if values.numel() == 0:
            continue
        if weight is None:
            squared.append(values.mean())
        else:
            w = weight[part]
            squared.append((w * values).sum() / w.sum().clamp_min(1e-6))
    student_entropy = entropy(torch.softmax(student_logits, dim=1))
    teacher_entropy = entropy(torch.softmax(teacher_scores, dim=1))
    entropies = 0.5 * (
        _reduce_entropy(student_entropy, entropy_reduce) + _reduce_entropy(teacher_entropy, entropy_reduce)
    )
    return torch.stack(squared).sum() + entropy_coefficient * entropies


@fp32
def pool_layers(
    features: torch.Tensor,
    probabilities: torch.Tensor,
    layer_ids: torch.Tensor,
    pixel_ids: torch.Tensor,
    num_layers: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototypes of possibly overlapping pixel sets: ``features`` (N, D) and ``probabilities`` (N, C)
    are flattened pixel rows, membership pair m says pixel ``pixel_ids[m]`` belongs to layer
    ``layer_ids[m]``. Returns unit-length mean features (L, D) and mean probabilities (L, C)."""
    sums = features.new_zeros(num_layers, features.shape[1]).index_add(0, layer_ids, features[pixel_ids])
    counts = torch.bincount(layer_ids, minlength=num_layers).clamp_min(1).to(probabilities.dtype)
    probability_sums = probabilities.new_zeros(num_layers, probabilities.shape[1])
    probability_sums = probability_sums.index_add(0, layer_ids, probabilities[pixel_ids])
    mean_probabilities = probability_sums / counts[:, None]
    return F.normalize(sums, dim=1), mean_probabilities


@fp32
def uncertainty_weighted_contrast(
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    mean_probabilities: torch.Tensor,
    tau: float = 0.05,
    weighted: bool = True,
    sign: int = 1,
) -> torch.Tensor:
    """l_pc over a set of unit prototypes (P, D) with class ``labels`` (P,).

    Each prototype i is an anchor; its positives are the other prototypes of its class, its negatives
    the prototypes of other classes (mass N_i = Σ exp(s_ij)). Per positive pair the InfoNCE term is
    log(exp(s_ij) + N_i) − s_ij with s = cosine/τ. ``weighted``: positives are averaged with weights
    softmax_j(s_ij) over the positives — a dissimilar positive (likely a wrong pseudo-label) counts
    less — and anchors are combined with weights softmax_i(sign·u_i), u_i the entropy of the anchor's
    mean prediction ``mean_probabilities`` (P, C); sign +1 (the PCCS code) favours uncertain anchors,
    −1 trusts certain ones. Unweighted: plain means. Anchors without a positive are skipped."""
    count = prototypes.shape[0]
    similarity = prototypes @ prototypes.T / tau
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(count, dtype=torch.bool, device=prototypes.device)
    anchors = positive.any(dim=1)
    if not bool(anchors.any()):
        return _zero(prototypes)
    log_negative = similarity.masked_fill(same, _MASKED).logsumexp(dim=1, keepdim=True)
    pair_loss = F.softplus(log_negative - similarity)  # = log(exp(s) + N) − s, stable
    if weighted:
        pair_weight = torch.softmax(similarity.masked_fill(~positive, _MASKED), dim=1) * positive
    else:
        pair_weight = positive / positive.sum(dim=1, keepdim=True).clamp_min(1)
    per_anchor = (pair_weight * pair_loss).sum(dim=1)[anchors]
    if weighted:
        anchor_weight = torch.softmax(sign * entropy(mean_probabilities[anchors], dim=1), dim=0)
    else:
        anchor_weight = torch.full_like(per_anchor, 1.0 / per_anchor.numel())
    return (anchor_weight * per_anchor).sum()


@fp32
def sinkhorn(scores: torch.Tensor, iterations: int = 4, epsilon: float = 0.05) -> torch.Tensor:
    """Sinkhorn–Knopp equal-partition assignment of n samples to K sub-prototypes from ``scores`` (n, K):
    alternately every sub-prototype receives 1/K of the mass and every sample 1/n. Returns (n, K) with
    rows summing to 1. Log-domain, so scores/ε never overflow."""
    count, k = scores.shape
    log_q = scores / epsilon
    for _ in range(iterations):
        log_q = log_q - log_q.logsumexp(dim=0, keepdim=True) - math.log(k)
        log_q = log_q - log_q.logsumexp(dim=1, keepdim=True) - math.log(count)
    return torch.exp(log_q + math.log(count))


@fp32
def layer_groups(
    prototypes: torch.Tensor, labels: torch.Tensor, depth: torch.Tensor, num_classes: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's layer prototypes (P, D) sorted boundary → interior by ``depth`` and cut into K
    contiguous groups, each averaged and normalised: (C, K, D) and a (C,) mask of classes with layers.
    A class with fewer than K layers fills its remaining slots with the mean of its layers."""
    grouped = prototypes.new_zeros(num_classes, k, prototypes.shape[1])
    present = torch.zeros(num_classes, dtype=torch.bool, device=prototypes.device)
    for cls in range(num_classes):
        members = torch.nonzero(labels == cls).flatten()
        if members.numel() == 0:
            continue
        ordered = prototypes[members[torch.argsort(depth[members], stable=True)]]
        if ordered.shape[0] >= k:
            slots = torch.stack([chunk.mean(dim=0) for chunk in torch.tensor_split(ordered, k)])
        else:
            padding = ordered.mean(dim=0, keepdim=True).expand(k - ordered.shape[0], -1)
            slots = torch.cat([ordered, padding])
        grouped[cls] = F.normalize(slots, dim=-1)
        present[cls] = True
    return grouped, present
