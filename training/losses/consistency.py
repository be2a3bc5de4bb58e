"""Consistency losses and their schedules; the losses run in float32 under mixed precision (``@fp32``,
see ``mpcl.training.precision``)."""

from __future__ import annotations

import math

import torch

from mpcl.training.precision import fp32


def sigmoid_rampup(iteration: int, length: int, step: int = 1) -> float:
    """exp(−5(1−x)²) with x = iteration / length capped at 1: the Mean Teacher / SSL4MIS ramp-up.

    With ``step`` > 1 the iteration is first floored to a multiple of ``step``: SSL4MIS counts the ramp
    in 150-iteration "epochs" (``sigmoid_rampup(iter_num // 150, 200)``), a staircase of the same curve.
    Methods gate it separately (e.g. no consistency before iteration 1000).
    """
    if length <= 0:
        return 1.0
    iteration = (max(iteration, 0) // step) * step
    phase = 1.0 - min(iteration / length, 1.0)
    return float(math.exp(-5.0 * phase * phase))


@fp32
def softmax_mse(student_logits: torch.Tensor, teacher_probabilities: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the student's and the teacher's class probabilities."""
    return torch.mean((torch.softmax(student_logits, dim=1) - teacher_probabilities) ** 2)
