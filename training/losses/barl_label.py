"""BARL label-space terms (spec b3.4, b3.5): dual-path regularisation between two branches and
progressive coarse-to-fine bias correction across decoder scales. Pure functions of logits.

Shapes: logits (B, C, H, W); label maps and masks (B, H, W). Every loss is a mean over *all* pixels
with unreliable pixels weighted 0 (FixMatch convention), so a step with few confident pixels gives a
small loss instead of a large one averaged over a handful of pixels. Under mixed precision they run in
float32 (``@fp32``; KL and cross-entropy of confident pixels are small differences of logs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from mpcl.training.losses.consistency import sigmoid_rampup
from mpcl.training.precision import fp32


def _zero(reference: torch.Tensor) -> torch.Tensor:
    """A zero that keeps the graph connected (backward works when a term has nothing to do)."""
    return reference.sum() * 0.0


@fp32
def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against hard pseudo-labels, counted only where ``mask`` is true (DPR path 1)."""
    pixel_ce = F.cross_entropy(logits, labels.long(), reduction="none")
    return (pixel_ce * mask.to(pixel_ce.dtype)).mean()


def _kl(target: torch.Tensor, log_target: torch.Tensor, log_prediction: torch.Tensor) -> torch.Tensor:
    """Per-pixel KL(target ‖ prediction) summed over classes (B, H, W)."""
    return (target * (log_target - log_prediction)).sum(1)


@fp32
@torch.no_grad()
def agreement_weight(probabilities_a: torch.Tensor, probabilities_b: torch.Tensor) -> torch.Tensor:
    """ρ = 1 − JS(p_a, p_b)/ln 2 ∈ [0, 1] per pixel: 1 where the branches agree, 0 where they are
    certain of different classes (pushing them together there would only copy one branch's error)."""
    middle = 0.5 * (probabilities_a + probabilities_b)
    log_middle = torch.log(middle.clamp_min(1e-12))
    js = 0.5 * (
        (torch.xlogy(probabilities_a, probabilities_a) - probabilities_a * log_middle).sum(1)
        + (torch.xlogy(probabilities_b, probabilities_b) - probabilities_b * log_middle).sum(1)
    )
    return (1.0 - js / math.log(2.0)).clamp(0.0, 1.0)


@fp32
def agreement_weighted_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """DPR path 2: mean_x ρ(x)·[KL(sg p_a ‖ p_b) + KL(sg p_b ‖ p_a)] — each branch is pulled towards
    the other's (fixed) distribution, per pixel and per class, less where they disagree strongly."""
    log_a, log_b = torch.log_softmax(logits_a, 1), torch.log_softmax(logits_b, 1)
    p_a, p_b = log_a.exp(), log_b.exp()
    rho = agreement_weight(p_a.detach(), p_b.detach())
    into_b = _kl(p_a.detach(), log_a.detach(), log_b)
    into_a = _kl(p_b.detach(), log_b.detach(), log_a)
    return ((into_a + into_b) * rho).mean()


def pcbc_stage_weights(
    iteration: int,
    total_iterations: int,
    num_pairs: int,
    stage_fraction: float = 0.1,
    schedule: Literal["progressive", "constant"] = "progressive",
) -> list[float]:
    """ω_s(t) for the scale pairs s ← s+1, coarsest pair first.

    ``progressive``: the finest pair starts at t = 0, each coarser pair ``stage_fraction``·T later
    (t_s = (num_pairs − 1 − s)·fraction·T), each ramped in over fraction·T — a coarse scale is only
    corrected once the scale above it has had time to become trustworthy. ``constant``: all 1.
    """
    if schedule == "constant":
        return [1.0] * num_pairs
    stage = stage_fraction * total_iterations
    weights = []
    for pair in range(num_pairs):
        start = (num_pairs - 1 - pair) * stage
        weights.append(0.0 if iteration < start else sigmoid_rampup(int(iteration - start), int(stage)))
    return weights


@fp32
def pcbc_loss(
    scale_logits_a: Sequence[torch.Tensor],
    scale_logits_b: Sequence[torch.Tensor],
    weights: Sequence[float],
    threshold: float = 0.7,
) -> torch.Tensor:
    """Progressive cognitive bias correction (spec b3.5).

    ``scale_logits_*``: one branch's logits per scale, coarse to fine, all at the same (full) size.
    For each pair s ← s+1 with weight ω_s > 0, the fixed target is the two branches' consensus at the
    finer scale, t = ½(p_a^{s+1} + p_b^{s+1}); both branches' scale-s predictions are pulled to it by
    KL(t ‖ p^s) where max t ≥ ``threshold``. Targets carry no gradient, so a coarse-scale error can never
    be pushed into a finer scale — corrections only flow coarse-ward.
    """
    if len(scale_logits_a) != len(scale_logits_b) or len(weights) != len(scale_logits_a) - 1:
        raise ValueError("pcbc_loss needs the same number of scales per branch and one weight per pair")
    total = _zero(scale_logits_a[0]) + _zero(scale_logits_b[0])
    for pair, weight in enumerate(weights):
        if weight <= 0:
            continue
        with torch.no_grad():
            target = 0.5 * (
                torch.softmax(scale_logits_a[pair + 1], 1) + torch.softmax(scale_logits_b[pair + 1], 1)
            )
            log_target = torch.log(target.clamp_min(1e-12))
            mask = (target.max(1).values >= threshold).to(target.dtype)
        for logits in (scale_logits_a[pair], scale_logits_b[pair]):
            total = total + weight * (_kl(target, log_target, torch.log_softmax(logits, 1)) * mask).mean()
    return total
