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


class BCP(Method):
    name = "bcp"
    Params = BCPParams
    uses_teacher = True
    uses_unlabeled = True

    @classmethod
    def check_batches(cls, labeled_batch: int, unlabeled_batch: int) -> str | None:
        if labeled_batch % 2 or labeled_batch != unlabeled_batch:
            return "bcp needs train.labeled_batch even and equal to train.unlabeled_batch (both are halved)"
        return None

    def training_step(self, batch: Batch, models: Models, step: StepInfo) -> dict[str, torch.Tensor]:
        images, labels = batch.labeled_image, batch.labeled_label
        half = images.shape[0] // 2
        mask = random_box_mask(tuple(images.shape[-2:]), self.params.mask_ratio).to(images.device)
        if step.iteration < self.params.pretrain_iterations:
            mixed = paste(images[:half], images[half:], mask)
            target = paste(labels[:half], labels[half:], mask)
            logits = models.student(mixed)
            return {"copy_paste_labeled": ce_dice_loss(logits, target)}
        if step.iteration == self.params.pretrain_iterations:
            models.teacher.load_state_dict(models.student.state_dict())  # self-training starts from stage 1
        unlabeled = batch.unlabeled_image
        with torch.no_grad():
            pseudo = models.teacher(unlabeled).argmax(1)
            if self.params.largest_component:
                pseudo = largest_component_per_class(pseudo, self.num_classes)
        image_a, image_b, label_a, label_b = images[:half], images[half:], labels[:half], labels[half:]
        unlabeled_a, unlabeled_b, pseudo_a, pseudo_b = (
            unlabeled[:half],
            unlabeled[half:],
            pseudo[:half],
            pseudo[half:],
        )
        u = self.params.unlabeled_weight
        ones = torch.ones_like(label_a, dtype=images.dtype)
        # labelled box in an unlabelled slice; unlabelled box in a labelled slice
        mixed = torch.cat([paste(image_a, unlabeled_a, mask), paste(unlabeled_b, image_b, mask)])
        target = torch.cat([paste(label_a, pseudo_a, mask), paste(pseudo_b, label_b, mask)])
        weight = torch.cat([paste(ones, u * ones, mask), paste(u * ones, ones, mask)])
        logits = models.student(mixed)
        return {"copy_paste_bidirectional": ce_dice_loss(logits, target, weight)}
