"""BCP, bidirectional copy-paste (Bai et al., CVPR 2023), as its ACDC recipe (spec section a.3).

Stage 1 (``pretrain_iterations``): labelled-only — a random box of one labelled slice is pasted into
another and the network learns the mixed label map. Stage 2: the EMA teacher (reset to the pre-trained
student when the stage starts) pseudo-labels the unlabelled slices (argmax, largest connected component
per class); a labelled box is pasted into an unlabelled slice and an unlabelled box into a labelled
slice, and the student learns the mixed targets with pseudo-labelled pixels weighted by
``unlabeled_weight``. The labelled and unlabelled batches are each split in two halves (a, b).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpcl.training.data.batches import Batch
from mpcl.training.losses.dice import ce_dice_loss
from mpcl.training.losses.mixing import largest_component_per_class, paste, random_box_mask
from mpcl.training.methods.base import Method, Models, StepInfo


@dataclass
class BCPParams:
    ema_decay: float = 0.99
    pretrain_iterations: int = 10000
    mask_ratio: float = 2 / 3  # side of the pasted box relative to the slice
    unlabeled_weight: float = 0.5  # loss weight of pseudo-labelled pixels
    largest_component: bool = True  # filter teacher pseudo-labels to one blob per class


def check_copy_paste_batches(labeled_batch: int, unlabeled_batch: int) -> str | None:
    if labeled_batch % 2 or labeled_batch != unlabeled_batch:
        return "bcp needs train.labeled_batch even and equal to train.unlabeled_batch (both are halved)"
    return None


@dataclass
class CopyPasteBatch:
    """What the student learns from in one BCP step (also the base that MPCL builds prototypes on)."""

    images: torch.Tensor  # (B, 1, H, W) mixed inputs
    target: torch.Tensor  # (B, H, W) ground truth where the pixel came from a labelled slice, else pseudo
    weight: torch.Tensor | None  # (B, H, W) pixel loss weights; None in pre-training (all pixels are GT)
    from_labeled: torch.Tensor  # (B, H, W) bool: the target pixel is ground truth
    confidence: torch.Tensor  # (B, H, W) teacher max-probability of pseudo-labels, 1 on ground truth
    stage: str  # "copy_paste_labeled" (pre-training) or "copy_paste_bidirectional"; names the loss term


def copy_paste_batch(params: BCPParams, num_classes: int, batch: Batch, models: Models, step: StepInfo):
    """Build the mixed batch of iteration ``step`` (and reset the teacher when self-training starts)."""
    images, labels = batch.labeled_image, batch.labeled_label
    half = images.shape[0] // 2
    mask = random_box_mask(tuple(images.shape[-2:]), params.mask_ratio).to(images.device)
    if step.iteration < params.pretrain_iterations:
        ones = torch.ones_like(labels, dtype=images.dtype)
        return CopyPasteBatch(
            paste(images[:half], images[half:], mask),
            paste(labels[:half], labels[half:], mask),
            None,
            torch.ones_like(labels[:half], dtype=torch.bool),
            ones[:half],
            "copy_paste_labeled",
        )
    if step.iteration == params.pretrain_iterations:  # self-training starts from the stage-1 student
        models.teacher.load_state_dict(models.student.state_dict())
        if models.teacher_extra is not None:
            models.teacher_extra.load_state_dict(models.extra.state_dict())
    unlabeled = batch.unlabeled_image
    with torch.no_grad():
        confidence, pseudo = torch.softmax(models.teacher(unlabeled), dim=1).max(dim=1)
        if params.largest_component:
            pseudo = largest_component_per_class(pseudo, num_classes)
    image_a, image_b, label_a, label_b = images[:half], images[half:], labels[:half], labels[half:]
    unlabeled_a, unlabeled_b = unlabeled[:half], unlabeled[half:]
    pseudo_a, pseudo_b, confidence_a, confidence_b = (
        pseudo[:half],
        pseudo[half:],
        confidence[:half],
        confidence[half:],
    )
    u = params.unlabeled_weight
    ones = torch.ones_like(label_a, dtype=images.dtype)
    is_gt, not_gt = torch.ones_like(label_a, dtype=torch.bool), torch.zeros_like(label_a, dtype=torch.bool)
    # labelled box in an unlabelled slice; unlabelled box in a labelled slice
    return CopyPasteBatch(
        images=torch.cat([paste(image_a, unlabeled_a, mask), paste(unlabeled_b, image_b, mask)]),
        target=torch.cat([paste(label_a, pseudo_a, mask), paste(pseudo_b, label_b, mask)]),
        weight=torch.cat([paste(ones, u * ones, mask), paste(u * ones, ones, mask)]),
        from_labeled=torch.cat([paste(is_gt, not_gt, mask), paste(not_gt, is_gt, mask)]),
        confidence=torch.cat([paste(ones, confidence_a, mask), paste(confidence_b, ones, mask)]),
        stage="copy_paste_bidirectional",
    )


class BCP(Method):
    name = "bcp"
    Params = BCPParams
    uses_teacher = True
    uses_unlabeled = True

    @classmethod
    def check_batches(cls, params: BCPParams, labeled_batch: int, unlabeled_batch: int) -> str | None:
        return check_copy_paste_batches(labeled_batch, unlabeled_batch)

    def training_step(self, batch: Batch, models: Models, step: StepInfo) -> dict[str, torch.Tensor]:
        mixed = copy_paste_batch(self.params, self.num_classes, batch, models, step)
        logits = models.student(mixed.images)
        return {mixed.stage: ce_dice_loss(logits, mixed.target, mixed.weight)}
