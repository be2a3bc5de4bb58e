"""Supervised-only baseline: the labelled half of the batch, ½(CE + Dice)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpcl.training.data.batches import Batch
from mpcl.training.losses.dice import ce_dice_loss, deep_supervision_loss
from mpcl.training.methods.base import Method, Models, StepInfo


@dataclass
class SupervisedParams:
    deep_supervision_weight: float = 0.0  # > 0 needs model.deep_supervision: true


def supervised_terms(
    models: Models, batch: Batch, deep_weight: float, logits_and_deep=None
) -> dict[str, torch.Tensor]:
    """The supervised loss on labelled data, shared by every method."""
    if logits_and_deep is None:
        output = models.student.forward_features(batch.labeled_image)
        logits_and_deep = (output.logits, output.deep_logits)
    logits, deep = logits_and_deep
    terms = {"supervised": ce_dice_loss(logits, batch.labeled_label)}
    if deep_weight > 0:
        if not deep:
            raise ValueError("deep_supervision_weight > 0 needs model.deep_supervision: true")
        terms["deep_supervision"] = deep_weight * deep_supervision_loss(deep, batch.labeled_label)
    return terms


class Supervised(Method):
    name = "supervised"
    Params = SupervisedParams

    def training_step(self, batch: Batch, models: Models, step: StepInfo) -> dict[str, torch.Tensor]:
        return supervised_terms(models, batch, self.params.deep_supervision_weight)
