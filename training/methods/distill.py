"""Knowledge distillation into a compact student, as a method of the one training loop.

A frozen teacher (the trained network of ``params.teacher``, a training checkpoint or a package's
model.pt, training-only parts stripped, batch norms folded, eval mode) labels every slice softly; the
student (``model``: usually narrower widths) learns
T²·KL(softmax(t/T) ‖ softmax(s/T)) on labelled and unlabelled slices alike (the teacher's dark knowledge
is what the unlabelled pool carries) plus soft Dice against the ground truth on labelled slices. The
trainer supplies seeding, SGD with poly lr, batches, validation, best.pt, CSV logs and resume.
``params.init: teacher_channels`` (start from the teacher's most important channels) is applied by
``mpcl-export --distill`` (:mod:`mpcl.export.distill`) before the first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mpcl.errors import ConfigError
from mpcl.nn.checkpoint import load_checkpoint
from mpcl.nn.folding import fold_batch_norm
from mpcl.nn.student import stripped_student
from mpcl.training.data.batches import Batch
from mpcl.training.losses.dice import soft_dice_loss
from mpcl.training.methods.base import Method, Models, StepInfo, check_params


@dataclass
class DistillParams:
    teacher: str = ""  # the teacher's checkpoint file (a training checkpoint or a package's model.pt)
    temperature: float = 4.0
    kd_weight: float = 1.0
    dice_weight: float = 1.0
    # random: a fresh network; teacher_channels: start from the teacher's most important channels
    # (mpcl.export.channel_selection), so distillation repairs a pruned teacher instead of starting over
    init: Literal["random", "teacher_channels"] = "random"

    def __post_init__(self) -> None:
        check_params(
            [
                (self.temperature > 0, "temperature must be > 0"),
                (self.kd_weight >= 0 and self.dice_weight >= 0, "kd_weight and dice_weight must be >= 0"),
                (self.kd_weight + self.dice_weight > 0, "kd_weight and dice_weight cannot both be 0"),
            ]
        )


def load_teacher(path: str | Path) -> nn.Module:
    """The checkpoint's student network, training-only parts stripped, eval mode (BN not folded).
    Building it draws from torch's generator: a run that must stay reproducible wraps it in fork_rng."""
    return stripped_student(load_checkpoint(path))[0]


def distillation_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    params: DistillParams,
) -> dict[str, torch.Tensor]:
    """kd_weight·T²·KL(teacher ‖ student) over all slices, dice_weight·soft Dice on the first len(labels)."""
    t = params.temperature
    kd = F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1), reduction="none"
    )
    kd = kd.sum(1).mean() * t * t
    dice = soft_dice_loss(torch.softmax(student_logits[: len(labels)], dim=1), labels)
    return {"kd": params.kd_weight * kd, "dice": params.dice_weight * dice}


class Distill(Method):
    name = "distill"
    Params = DistillParams
    uses_unlabeled = True

    def __init__(self, params: DistillParams, num_classes: int) -> None:
        super().__init__(params, num_classes)
        self._teacher: nn.Module | None = None  # loaded on first use: frozen, never saved or optimised

    def teacher(self, device: torch.device | None = None) -> nn.Module:
        """The frozen, BN-folded teacher (loaded from ``params.teacher`` on first use)."""
        if self._teacher is None:
            if not self.params.teacher:
                raise ConfigError("method.params.teacher must name the teacher's checkpoint")
            # building the network and its folded copy draws random inits: keep the run's generator as is
            with torch.random.fork_rng(devices=[]):
                teacher = fold_batch_norm(load_teacher(self.params.teacher))
            self._teacher = teacher.eval().requires_grad_(False)
        if device is not None:
            self._teacher = self._teacher.to(device)
        return self._teacher

    def training_step(self, batch: Batch, models: Models, step: StepInfo) -> dict[str, torch.Tensor]:
        images = torch.cat([batch.labeled_image, batch.unlabeled_image])
        with torch.no_grad():
            teacher_logits = self.teacher(images.device)(images)
        return distillation_terms(models.student(images), teacher_logits, batch.labeled_label, self.params)
