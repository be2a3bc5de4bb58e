"""Mean Teacher (Tarvainen & Valpola 2017) as in SSL4MIS: EMA teacher, noisy teacher input, softmax-MSE
consistency on the unlabelled half with a sigmoid ramp-up, switched off during the first iterations."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpcl.training.data.batches import Batch
from mpcl.training.losses.consistency import softmax_mse
from mpcl.training.methods.base import Method, Models, StepInfo, delayed_ramp
from mpcl.training.methods.supervised import supervised_terms


@dataclass
class MeanTeacherParams:
    ema_decay: float = 0.99
    consistency: float = 0.1  # λ, the weight the ramp-up reaches
    rampup_iterations: int | None = None  # None: the whole run, as SSL4MIS (200 epochs × 150 = 30 000)
    consistency_start: int = 1000  # no consistency before this iteration
    rampup_step: int = 150  # the ramp moves every 150 iterations, as SSL4MIS's "epochs"; 1: every step
    teacher_noise_std: float = 0.1
    teacher_noise_clip: float = 0.2
    deep_supervision_weight: float = 0.0


def noisy(images: torch.Tensor, std: float, clip: float) -> torch.Tensor:
    """Teacher input: images + clamp(N(0, std²), −clip, clip)."""
    return images + torch.clamp(torch.randn_like(images) * std, -clip, clip)


def consistency_weight(params: MeanTeacherParams, step: StepInfo) -> float:
    ramp = delayed_ramp(step, params.consistency_start, params.rampup_iterations, params.rampup_step)
    return params.consistency * ramp


class MeanTeacher(Method):
    name = "mean_teacher"
    Params = MeanTeacherParams
    uses_teacher = True
    uses_unlabeled = True

    def training_step(self, batch: Batch, models: Models, step: StepInfo) -> dict[str, torch.Tensor]:
        n_labeled = batch.labeled_image.shape[0]
        output = models.student.forward_features(torch.cat([batch.labeled_image, batch.unlabeled_image]))
        deep = [d[:n_labeled] for d in output.deep_logits]
        terms = supervised_terms(
            models, batch, self.params.deep_supervision_weight, (output.logits[:n_labeled], deep)
        )
        teacher_input = noisy(
            batch.unlabeled_image, self.params.teacher_noise_std, self.params.teacher_noise_clip
        )
        with torch.no_grad():
            teacher_probabilities = torch.softmax(models.teacher(teacher_input).float(), dim=1)
        weight = consistency_weight(self.params, step)
        terms["consistency"] = weight * softmax_mse(output.logits[n_labeled:], teacher_probabilities)
        return terms
