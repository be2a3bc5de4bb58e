"""BCP, bidirectional copy-paste (Bai et al., CVPR 2023), as its authors' ACDC script does it.

Stage 1 (``pretrain_iterations``): labelled-only — the box of one labelled slice (b) is pasted into
another (a) and the network learns the mixed label map. Stage 2 starts from the best-validation stage-1
student and optimiser (``stage_switch: best``; the trainer does the switch and copies the student into
the teacher): the EMA teacher pseudo-labels each unlabelled half (argmax, then the largest 8-connected
component per class); a labelled box is pasted into an unlabelled slice and an unlabelled box into a
labelled slice, and the student learns both mixed inputs, one forward pass each.

The loss is BCP's ``mix_loss``: for each mixed input, masked Dice and region-mean cross-entropy of the
region outside the box plus those of the region inside it, pseudo-labelled regions weighted by
``unlabeled_weight``; Dice and CE are summed over both inputs and halved. Named deviations:
``loss: pixel_weighted`` (one pixel-weighted ½(CE + Dice) over the whole batch), ``stage_switch: last``,
``connectivity: 4``, ``forward_passes: joint`` (one pass for both mixed inputs, so batch-norm statistics
are pooled over them). BCP's EMA also averages batch-norm buffers; the teacher runs in training mode
(batch statistics) and is never evaluated, so those buffers do not affect training and are not averaged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from mpcl.training.data.batches import Batch
from mpcl.training.losses.dice import ce_dice_loss
from mpcl.training.losses.mixing import largest_component_per_class, mix_images, mix_loss, outer_box_mask
from mpcl.training.methods.base import Method, Models, StageSwitch, StepInfo, check_params


@dataclass
class BCPParams:
    ema_decay: float = 0.99
    pretrain_iterations: int = 10000
    mask_ratio: float = 2 / 3  # side of the pasted box relative to the slice
    unlabeled_weight: float = 0.5  # loss weight of pseudo-labelled regions
    largest_component: bool = True  # filter teacher pseudo-labels to one blob per class
    loss: Literal["published", "pixel_weighted"] = "published"
    stage_switch: Literal["best", "last"] = "best"
    connectivity: int = 8
    forward_passes: Literal["separate", "joint"] = "separate"

    def __post_init__(self) -> None:
        check_params(
            [
                (self.connectivity in (4, 8), f"connectivity must be 4 or 8, got {self.connectivity}"),
                (0 < self.mask_ratio < 1, f"mask_ratio must be in (0, 1), got {self.mask_ratio}"),
            ]
        )


def check_copy_paste_batches(labeled_batch: int, unlabeled_batch: int) -> str | None:
    if labeled_batch % 2 or labeled_batch != unlabeled_batch:
        return "bcp needs train.labeled_batch even and equal to train.unlabeled_batch (both are halved)"
    return None


def copy_paste_stage_switches(params: BCPParams, total_iterations: int) -> list[StageSwitch]:
    if 0 < params.pretrain_iterations < total_iterations:
        return [StageSwitch(params.pretrain_iterations, params.stage_switch)]
    return []


@dataclass
class MixedInput:
    """One mixed network input: ``outer`` fills the slice outside the box, ``inner`` the box."""

    images: torch.Tensor  # (b, 1, H, W)
    outer_target: torch.Tensor  # (b, H, W) ground truth or pseudo-label of the outer slice
    inner_target: torch.Tensor
    outer_weight: float  # loss weight of the region (1 ground truth, unlabeled_weight pseudo-label)
    inner_weight: float
    outer_confidence: torch.Tensor  # (b, H, W) teacher max-probability, 1 on ground truth
    inner_confidence: torch.Tensor


@dataclass
class CopyPasteStep:
    """What the student learns from in one BCP step (also the base that MPCL builds prototypes on)."""

    inputs: list[MixedInput]  # one in pre-training, two (unlabelled-outer, labelled-outer) after
    outer_mask: torch.Tensor  # (H, W): 1 outside the box, 0 inside
    from_labeled: torch.Tensor  # (B, H, W) bool over the concatenated inputs: the target is ground truth
    stage: str  # "copy_paste_labeled" (pre-training) or "copy_paste_bidirectional"; names the loss term

    def _combine(self, outer: Callable[[MixedInput], torch.Tensor], inner: Callable) -> torch.Tensor:
        where = self.outer_mask.bool()
        return torch.cat([torch.where(where, outer(item), inner(item)) for item in self.inputs])

    @property
    def images(self) -> torch.Tensor:
        return torch.cat([item.images for item in self.inputs])

    @property
    def target(self) -> torch.Tensor:
        return self._combine(lambda item: item.outer_target, lambda item: item.inner_target)

    @property
    def confidence(self) -> torch.Tensor:
        return self._combine(lambda item: item.outer_confidence, lambda item: item.inner_confidence)

    @property
    def weight(self) -> torch.Tensor:
        full = lambda value: torch.full_like(self.outer_mask, value)  # noqa: E731
        return torch.cat(
            [
                torch.where(self.outer_mask.bool(), full(item.outer_weight), full(item.inner_weight))[
                    None
                ].expand(item.images.shape[0], -1, -1)
                for item in self.inputs
            ]
        )


def run_per_input(network: Callable, inputs: list[torch.Tensor], forward_passes: str) -> list:
    """The network on each input separately (BCP) or on their concatenation, split back (``joint``)."""
    if forward_passes == "separate" or len(inputs) == 1:
        return [network(images) for images in inputs]
    output = network(torch.cat(inputs))
    return list(torch.split(output, [images.shape[0] for images in inputs]))


@torch.no_grad()
def teacher_pseudo_labels(
    params: BCPParams, num_classes: int, teacher: torch.nn.Module, halves: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(confidence, pseudo-label) of each unlabelled half: softmax max and argmax of the teacher, then
    BCP's largest-component filter."""
    results = []
    for logits in run_per_input(teacher, halves, params.forward_passes):
        # float32: the confidence is compared with thresholds (mpcl.training.precision)
        confidence, pseudo = torch.softmax(logits.float(), dim=1).max(dim=1)
        if params.largest_component:
            pseudo = largest_component_per_class(pseudo, num_classes, params.connectivity)
        results.append((confidence, pseudo))
    return results


def copy_paste_step(
    params: BCPParams, num_classes: int, batch: Batch, models: Models, step: StepInfo
) -> CopyPasteStep:
    """The mixed inputs of iteration ``step`` (the teacher is only read: the trainer owns its reset)."""
    images, labels = batch.labeled_image, batch.labeled_label
    half = images.shape[0] // 2
    outer_mask = outer_box_mask(tuple(images.shape[-2:]), params.mask_ratio).to(images.device)
    image_a, image_b, label_a, label_b = images[:half], images[half:], labels[:half], labels[half:]
    ones = torch.ones_like(label_a, dtype=images.dtype)
    if step.iteration < params.pretrain_iterations:
        mixed = MixedInput(mix_images(image_a, image_b, outer_mask), label_a, label_b, 1.0, 1.0, ones, ones)
        is_gt = torch.ones_like(label_a, dtype=torch.bool)
        return CopyPasteStep([mixed], outer_mask, is_gt, "copy_paste_labeled")
    unlabeled_a, unlabeled_b = batch.unlabeled_image[:half], batch.unlabeled_image[half:]
    (confidence_a, pseudo_a), (confidence_b, pseudo_b) = teacher_pseudo_labels(
        params, num_classes, models.teacher, [unlabeled_a, unlabeled_b]
    )
    u = params.unlabeled_weight
    inputs = [  # labelled box in an unlabelled slice; unlabelled box in a labelled slice
        MixedInput(
            mix_images(unlabeled_a, image_a, outer_mask), pseudo_a, label_a, u, 1.0, confidence_a, ones
        ),
        MixedInput(
            mix_images(image_b, unlabeled_b, outer_mask), label_b, pseudo_b, 1.0, u, ones, confidence_b
        ),
    ]
    inside = outer_mask == 0
    from_labeled = torch.cat(
        [inside.expand_as(label_a), (~inside).expand_as(label_b)]
    )  # ground truth: the box of the first input, outside the box in the second
    return CopyPasteStep(inputs, outer_mask, from_labeled, "copy_paste_bidirectional")


def copy_paste_loss(params: BCPParams, step: CopyPasteStep, logits: list[torch.Tensor]) -> torch.Tensor:
    """``loss: published``: ½(Σ Dice + Σ CE) of BCP's ``mix_loss`` over the mixed inputs;
    ``pixel_weighted``: one pixel-weighted ½(CE + Dice) over their concatenation."""
    if params.loss == "pixel_weighted":
        weight = None if step.stage == "copy_paste_labeled" else step.weight
        return ce_dice_loss(torch.cat(logits), step.target, weight)
    dice_total, ce_total = 0.0, 0.0
    for item, item_logits in zip(step.inputs, logits, strict=True):
        outer = step.outer_mask[None].expand(item.images.shape[0], -1, -1)
        dice, ce = mix_loss(
            item_logits, item.outer_target, item.inner_target, outer, item.outer_weight, item.inner_weight
        )
        dice_total, ce_total = dice_total + dice, ce_total + ce
    return (dice_total + ce_total) / 2


class BCP(Method):
    name = "bcp"
    Params = BCPParams
    uses_teacher = True
    uses_unlabeled = True

    @classmethod
    def check_batches(cls, params: BCPParams, labeled_batch: int, unlabeled_batch: int) -> str | None:
        return check_copy_paste_batches(labeled_batch, unlabeled_batch)

    def stage_switches(self, total_iterations: int) -> list[StageSwitch]:
        return copy_paste_stage_switches(self.params, total_iterations)

    def training_step(self, batch: Batch, models: Models, step: StepInfo) -> dict[str, torch.Tensor]:
        mixed = copy_paste_step(self.params, self.num_classes, batch, models, step)
        logits = run_per_input(
            models.student, [item.images for item in mixed.inputs], self.params.forward_passes
        )
        return {mixed.stage: copy_paste_loss(self.params, mixed, logits)}
