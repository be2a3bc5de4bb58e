"""PCCS, Prototype Contrastive Consistency Segmentation (He et al., arXiv 2502.06650; spec section b2).

A student–teacher method with two prediction branches: the student's segmentation head and the
teacher's prototype classifier (per class, the best cosine of a pixel's teacher embedding to the class's
K prototypes Π, LayerNorm'd over classes). Four switchable components on a base step (``base.mix``):

* **SDM prototypes** (``sdm_protos``): on the 1/4 grid, each class of each unlabelled image is cut by
  its signed distance map into layers (rings at one depth, or ``sdm_levels: bands``), ordered from the
  boundary inwards; one prototype per layer = normalised mean of the student's projected features.
  Labels: ground truth on labelled images, the student's argmax elsewhere. Off: one class-mean
  prototype per image.
* **Uncertainty weighting** (``unc_weight``) of the prototype contrast l_pc: positives weighted by
  their similarity to the anchor (dubious positives count less), anchors by the entropy of their mean
  prediction (``unc_sign``). Off: plain supervised contrast between prototypes. ``contrast: false``
  drops l_pc altogether.
* **Prototype updating prototype** (``proto_update``): on unlabelled pixels, teacher pseudo-classes
  (the prototype classifier's argmax) are split among their K sub-prototypes by Sinkhorn on the
  student's sub-prototype scores; Π moves by EMA (``gamma``) towards the teacher features of pixels
  where teacher and student agree, then towards the boundary-aware layer prototypes grouped into K
  slots boundary → interior (``mix_momentum``) — historical teacher prototypes blended with new
  evidence keep the K sub-prototypes diverse. The student's prototype layer W_S learns to classify
  teacher features into the assigned sub-prototypes (l_aux). Off: Π follows the class means of the
  teacher features, and there is no l_aux.
* **Uncertainty consistency** (``unc_consistency``) l_c between the two branches: squared error between
  student logits and teacher prototype scores, plus entropy minimisation of both branches.

Schedule (the PCCS code's phases): the base alone before ``consistency_start``; l_c from then on,
ramped by ``lambda_c``·sigmoid ramp over ``rampup_iterations``; prototype terms from
``warmup_iterations`` on. The spec's ``phase_iters`` [200, 500] are these two keys, named as in the
other methods so that benchmark budgets scale them alike.

Bases. ``base.mix: none`` is the PCCS code's: supervised ½(CE + Dice) on the labelled slices, the student
seeing labelled and unlabelled slices in one pass. ``base.mix: bcp`` is BCP's step (mixed inputs, passes,
loss, stage switch), so PCCS can be compared with, and added to, the copy-paste base the other methods use
(spec a.4). PCCS's terms then work on the mixed inputs, each piece where PCCS had its counterpart: labels
are the mixed label map (ground truth where the pixel came from a labelled slice, BCP's pseudo-label
elsewhere: what the student learns from) instead of the student's argmax; the teacher runs on the mixed
inputs with the base's passes; l_c averages its squared error per mixed input instead of per
labelled/unlabelled half; Π moves with the pseudo-labelled pixels, which stand for the unlabelled half;
every mixed slice gives SDM layers (each holds unlabelled pixels). Nothing of PCCS runs during BCP's
labelled-only pre-training, since its terms are made for unlabelled pixels. PCCS always runs its own view
of the base step; the unlabelled slices in the student's pass, the extra heads and the teacher's passes
exist only when a term (``contrast``, ``proto_update``, ``unc_consistency``) is on, so with every switch off
a run is its base's (supervised, or BCP), bit for bit (tested). ``ema_decay`` lives in ``base`` (the
teacher is the base's); ``method.params.ema_decay``, where it used to be, is still accepted.

Choices the spec leaves open, and why:

* Prototype features come from the decoder maps at 1/8, 1/4 and 1/2 (the PCCS code fuses encoder maps at
  the same scales): the U-Net here exposes decoder features, which also carry the skip connections'
  detail; with SSL4MIS widths the fused width (224) equals the code's.
* Teacher = EMA of the student network and of the student's projection head; the teacher's embeddings
  are that head's output LayerNorm'd and normalised. The code's separate teacher head (3×3 conv, BN,
  Dropout2d) is never trained there; an EMA needs a trained student counterpart, so the student's own
  head plays that role. ``teacher_update: frozen`` reproduces the code's untrained teacher: the trainer
  then never moves the teacher (its batch-norm statistics do, as in the code), which stays as it was
  copied from the student at the start (on ``base.mix: bcp``: at the stage switch, so BCP's pseudo-labels
  then come from that fixed pre-trained network too). The trainer owns the teacher
  (``Method.teacher_update``) and saves it; checkpoints of the earlier layout, where PCCS kept its own
  frozen copy in its state, are upgraded on resume (``base.mix: none``) or refused with the reason.
* Sandwiched classes: the rings measured from each side are restricted to the class's own pixels, so
  every prototype labelled c is made of class-c pixels (the code also averages neighbouring classes).
* Layers are grouped into K slots sorted by depth over the whole batch (the code concatenates images
  in order, which groups by image rather than depth); a class with no layer in the batch leaves its
  slots untouched (the code's zero vectors change nothing after normalisation either).
* When a batch yields no SDM layer at all, per-image class-mean prototypes stand in (spec fallback);
  absent classes give no prototype rather than a zero vector.
* The student's class decision for the agreement mask is the argmax of its best sub-prototype score
  per class (the code's LayerNorm before the argmax changes no argmax). W_S has no bias, so
  W_S is exactly the student's C·K prototype matrix. Channel layout everywhere: c·K + k.
* Consistency ramp: ``rampup_iterations: null`` reaches ``lambda_c`` at the end of the run, as the
  SSL4MIS recipe; the code's ramp (1000 "epochs" of 150 iterations) is ``rampup_iterations: 150000``
  and leaves l_c at ~2 % of ``lambda_c`` after 15 000 iterations.
* ``consistency_weighting`` (default ``none``, as coded) optionally weights the l_c squared error per
  pixel by the teacher branch's certainty (``hard``: entropy ≤ θ(t), ``soft``: 1 − entropy/ln C).
* ``pseudo_source: teacher`` takes pseudo-labels, uncertain pixels and prototype uncertainties from the
  teacher's segmentation instead of the student's (the code: student); on ``base.mix: bcp`` the labels
  are BCP's and this only picks the uncertainties. ``sdm_images: all`` also builds
  SDM prototypes on labelled images from their ground truth (the code: unlabelled images only).
* Π starts as normalised Gaussian vectors from a fixed generator (the code's truncated normal, σ 0.02
  cut at ±2, never truncates, and its scale vanishes in the normalisation), so the student's
  initialisation, and any comparison with other methods at the same seed, is untouched.
* There is no SDM regression head: PCCS uses signed distances only to define prototype layers.
* Network width (the code's wider encoder [32, 32, 64, 128, 256]) is ``model.channels``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpcl.errors import ConfigError
from mpcl.nn.multiscale_projection import MultiScaleProjection
from mpcl.nn.unet import UNetOutput, join_outputs
from mpcl.training.data.batches import Batch
from mpcl.training.losses.pccs import (
    class_scores,
    entropy,
    entropy_weight,
    layer_groups,
    pool_layers,
    sinkhorn,
    teacher_features,
    uncertainty_consistency,
    uncertainty_threshold,
    uncertainty_weighted_contrast,
)
from mpcl.training.losses.prototypes import IGNORE, group_prototypes
from mpcl.training.losses.sdm import Layer, class_layers, sdm_layers
from mpcl.training.methods.base import (
    Method,
    Models,
    StageSwitch,
    StepInfo,
    TeacherUpdate,
    check_params,
    delayed_ramp,
)
from mpcl.training.methods.bcp import (
    BCPParams,
    check_copy_paste_batches,
    copy_paste_loss,
    copy_paste_stage_switches,
    copy_paste_step,
)
from mpcl.training.methods.prototype_bank import PrototypeBank
from mpcl.training.methods.supervised import supervised_terms
from mpcl.training.precision import run_fp32

PROTOTYPE_SEED = 0  # Π's initial values come from their own generator (see the module docstring)


@dataclass
class PCCSBaseParams(BCPParams):
    """The base PCCS's terms ride on: ``none``, a supervised ½(CE + Dice) step; ``bcp``, BCP's step (the
    inherited keys are BCP's own and apply to ``bcp`` only). ``ema_decay`` is the teacher's either way."""

    mix: Literal["none", "bcp"] = "none"
    ema_decay: float | None = None  # None: ``method.params.ema_decay`` (where it used to live), else 0.99


@dataclass
class PCCSParams:
    base: PCCSBaseParams = field(default_factory=PCCSBaseParams)
    ema_decay: float | None = None  # accepted for old configs; the key is ``base.ema_decay``
    teacher_update: Literal["ema", "frozen"] = "ema"
    sdm_protos: bool = True
    unc_weight: bool = True
    proto_update: bool = True
    unc_consistency: bool = True
    contrast: bool = True
    K: int = 2  # sub-prototypes per class in Π and in the student's prototype layer
    embed_dim: int = 256
    tau: float = 0.05  # prototype contrast temperature
    gamma: float = 0.999  # Π's EMA momentum towards agreeing teacher features
    mix_momentum: float = 0.999  # Π's momentum towards the grouped SDM-layer prototypes
    sinkhorn_iters: int = 4
    sinkhorn_eps: float = 0.05
    gumbel_tau: float = 0.5
    lambda_c: float = 0.01
    lambda_pc: float = 0.01
    lambda_aux: float = 0.3
    ent_coef: float = 0.1
    ent_reduce: Literal["fro", "mean"] = "fro"
    consistency_weighting: Literal["none", "hard", "soft"] = "none"
    consistency_start: int = 200  # supervised only before this iteration
    warmup_iterations: int = 500  # prototype terms from this iteration on
    rampup_iterations: int | None = None  # l_c ramp length; None: the whole run
    unc_sign: Literal[1, -1] = 1
    sdm_levels: Literal["rings", "bands"] = "rings"
    sdm_bands: int = 4
    sdm_images: Literal["unlabeled", "all"] = "unlabeled"
    pseudo_source: Literal["student", "teacher"] = "student"

    def __post_init__(self) -> None:
        base = self.base
        if base.ema_decay is None:
            base.ema_decay = 0.99 if self.ema_decay is None else self.ema_decay
        elif self.ema_decay is not None and self.ema_decay != base.ema_decay:
            raise ConfigError("method.params.ema_decay and method.params.base.ema_decay differ; keep one")
        checks = [
            (self.K >= 1, "K must be >= 1"),
            (self.embed_dim >= 2, "embed_dim must be >= 2"),
            (self.tau > 0, "tau must be > 0"),
            (0.0 <= self.gamma < 1.0, "gamma must be in [0, 1)"),
            (0.0 <= self.mix_momentum < 1.0, "mix_momentum must be in [0, 1)"),
            (self.sinkhorn_iters >= 1, "sinkhorn_iters must be >= 1"),
            (self.sinkhorn_eps > 0 and self.gumbel_tau > 0, "sinkhorn_eps and gumbel_tau must be > 0"),
            (min(self.lambda_c, self.lambda_pc, self.lambda_aux, self.ent_coef) >= 0,
             "lambda_c, lambda_pc, lambda_aux and ent_coef must be >= 0"),
            (self.consistency_start >= 0 and self.warmup_iterations >= 0,
             "consistency_start and warmup_iterations must be >= 0"),
            (self.sdm_bands >= 1, "sdm_bands must be >= 1"),
            (0.0 <= base.ema_decay <= 1.0, "base.ema_decay must be in [0, 1]"),
        ]  # fmt: skip
        check_params(checks)


@dataclass
class _LayerSet:
    """The batch's SDM layers as flat tensors (pixel indices into the (B·h·w) grid)."""

    layer_ids: torch.Tensor
    pixel_ids: torch.Tensor
    classes: torch.Tensor
    depth: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.classes.numel())


def _flatten_layers(per_image: list[list[Layer]], first_image: int, grid_pixels: int, device) -> _LayerSet:
    layers = [(image, layer) for image, found in enumerate(per_image, first_image) for layer in found]
    pixel_ids = np.concatenate([layer.pixels + image * grid_pixels for image, layer in layers])
    layer_ids = np.repeat(np.arange(len(layers)), [layer.pixels.size for _, layer in layers])
    as_tensor = lambda values, dtype: torch.as_tensor(values, dtype=dtype, device=device)  # noqa: E731
    return _LayerSet(
        as_tensor(layer_ids, torch.long),
        as_tensor(pixel_ids, torch.long),
        as_tensor([layer.cls for _, layer in layers], torch.long),
        as_tensor([layer.depth for _, layer in layers], torch.float32),
    )


@dataclass
class _StepView:
    """What PCCS's terms need from one base step, whatever the base."""

    student: UNetOutput  # the student's pass(es) over the step's images, joined
    teacher: Callable[[], UNetOutput]  # PCCS's teacher on the same images (no gradient), on demand
    labels: torch.Tensor  # (B, H, W) the given label (ground truth, or BCP's pseudo-label), IGNORE elsewhere
    split: int  # l_c averages the squared error over rows [:split] and [split:] separately
    layer_first: int  # SDM layers come from rows [layer_first:]
    update_rows: slice  # rows whose teacher features move Π (and feed l_aux)
    update_pixels: torch.Tensor | None  # (B, H, W): within those rows, the pixels that do; None: all


class PCCS(Method):
    name = "pccs"
    Params = PCCSParams
    uses_teacher = True
    uses_unlabeled = True

    def __init__(self, params: PCCSParams, num_classes: int) -> None:
        super().__init__(params, num_classes)
        # a component that gives a loss term; sdm_protos and unc_weight only shape l_pc and l_aux
        self.active = params.contrast or params.proto_update or params.unc_consistency
        self.bank = PrototypeBank([params.K] * num_classes, params.embed_dim, params.gamma)
        generator = torch.Generator().manual_seed(PROTOTYPE_SEED)
        self.bank.fill(torch.randn(num_classes, params.K, params.embed_dim, generator=generator))
        self._last: dict[str, torch.Tensor] = {}

    @property
    def ema_decay(self) -> float:
        return self.params.base.ema_decay

    def teacher_update(self) -> TeacherUpdate:
        return TeacherUpdate(self.params.teacher_update, self.ema_decay)

    @classmethod
    def check_batches(cls, params: PCCSParams, labeled_batch: int, unlabeled_batch: int) -> str | None:
        if params.base.mix == "bcp":
            return check_copy_paste_batches(labeled_batch, unlabeled_batch)
        if unlabeled_batch < 1:
            return "pccs needs train.unlabeled_batch >= 1 (its prototypes come from unlabelled images)"
        return None

    def stage_switches(self, total_iterations: int) -> list[StageSwitch]:
        if self.params.base.mix == "bcp":
            return copy_paste_stage_switches(self.params.base, total_iterations)
        return []

    def build_extra_modules(self, student: nn.Module) -> dict[str, nn.Module]:
        if not self.active:  # the base alone: no extra parameters, no extra RNG use
            return {}
        p = self.params
        in_channels = MultiScaleProjection.input_channels(student.channels)
        return {
            "projection": MultiScaleProjection(in_channels, p.embed_dim),
            "prototypes": nn.Conv2d(p.embed_dim, self.num_classes * p.K, kernel_size=1, bias=False),
        }

    # -- schedule --------------------------------------------------------------------------------
    def consistency_weight(self, step: StepInfo) -> float:
        p = self.params
        return p.lambda_c * delayed_ramp(step, p.consistency_start, p.rampup_iterations)

    # -- the step --------------------------------------------------------------------------------
    def training_step(self, batch: Batch, models: Models, step: StepInfo) -> dict[str, torch.Tensor]:
        """The base's terms from PCCS's own view of the step, plus PCCS's terms. With every component
        off the view runs exactly the base's computation (same passes, same RNG draws)."""
        p = self.params
        teacher_network, teacher_head = None, None
        if self.active:  # the trainer's teacher, moved by EMA or kept frozen (``teacher_update``)
            teacher_network, teacher_head = models.teacher, models.teacher_extra["projection"]
        if p.base.mix == "bcp":
            terms, view = self._copy_paste_view(batch, models, step, teacher_network)
        else:
            terms, view = self._supervised_view(batch, models, teacher_network)
        if view is None:
            return terms
        with_prototypes = step.iteration >= p.warmup_iterations
        with_consistency = p.unc_consistency and step.iteration >= p.consistency_start
        if not (with_prototypes or with_consistency):
            return terms
        with torch.no_grad():
            teacher = view.teacher()
            # heads, prototype scores, Sinkhorn and Π in float32 under mixed precision (precision.py)
            z_teacher = teacher_features(run_fp32(teacher_head, teacher.features))
            bank = self.bank.to(z_teacher.device)
            teacher_scores = class_scores(z_teacher, bank.prototypes)
        grid = z_teacher.shape[-2:]
        student_logits = F.interpolate(
            view.student.logits.float(), size=grid, mode="bilinear", align_corners=False
        )
        threshold = uncertainty_threshold(step.iteration, step.total_iterations)
        if with_consistency:
            weight = None
            if p.consistency_weighting != "none":
                weight = entropy_weight(torch.softmax(teacher_scores, 1), p.consistency_weighting, threshold)
            terms["uncertainty_consistency"] = self.consistency_weight(step) * uncertainty_consistency(
                student_logits, teacher_scores, view.split, p.ent_coef, p.ent_reduce, weight
            )
        if with_prototypes:
            terms.update(
                self._prototype_terms(
                    view, models, teacher, z_teacher, teacher_scores, student_logits, threshold
                )
            )
        return terms

    def _supervised_view(
        self, batch: Batch, models: Models, teacher_network: nn.Module | None
    ) -> tuple[dict[str, torch.Tensor], _StepView | None]:
        """½(CE + Dice) on the labelled slices; the student sees the unlabelled slices in the same pass
        (as the PCCS code), but only when a component will use them: all off, this is the supervised
        baseline's step."""
        n_labeled = batch.labeled_image.shape[0]
        images = (
            torch.cat([batch.labeled_image, batch.unlabeled_image]) if self.active else batch.labeled_image
        )
        student = models.student.forward_features(images)
        terms = supervised_terms(models, batch, 0.0, (student.logits[:n_labeled], []))
        if not self.active:
            return terms, None
        unknown = torch.full_like(batch.labeled_label[:1], IGNORE).expand(
            batch.unlabeled_image.shape[0], -1, -1
        )

        @torch.no_grad()
        def teacher() -> UNetOutput:
            return teacher_network.forward_features(images)

        first = n_labeled if self.params.sdm_images == "unlabeled" else 0
        labels = torch.cat([batch.labeled_label, unknown])
        return terms, _StepView(student, teacher, labels, n_labeled, first, slice(n_labeled, None), None)

    def _copy_paste_view(
        self, batch: Batch, models: Models, step: StepInfo, teacher_network: nn.Module | None
    ) -> tuple[dict[str, torch.Tensor], _StepView | None]:
        """BCP's step (its mixed inputs, passes and loss). PCCS's terms then work on the mixed inputs:
        labels = the mixed label map, the teacher runs on the mixed inputs (with the base's passes), l_c
        compares each mixed input separately, Π moves with the pseudo-labelled pixels. Nothing of PCCS
        runs during the labelled-only pre-training."""
        base = self.params.base
        mixed = copy_paste_step(base, self.num_classes, batch, models, step)
        inputs = [item.images for item in mixed.inputs]
        if base.forward_passes == "separate":
            outputs = [models.student.forward_features(images) for images in inputs]
            logits = [output.logits for output in outputs]
        else:
            joint = models.student.forward_features(torch.cat(inputs))
            logits = list(torch.split(joint.logits, [images.shape[0] for images in inputs]))
        terms = {mixed.stage: copy_paste_loss(base, mixed, logits)}
        if not self.active or mixed.stage == "copy_paste_labeled":
            return terms, None
        student = join_outputs(outputs) if base.forward_passes == "separate" else joint

        @torch.no_grad()
        def teacher() -> UNetOutput:
            if base.forward_passes == "separate":
                return join_outputs([teacher_network.forward_features(images) for images in inputs])
            return teacher_network.forward_features(torch.cat(inputs))

        view = _StepView(
            student, teacher, mixed.target, inputs[0].shape[0], 0, slice(0, None), ~mixed.from_labeled
        )
        return terms, view

    def _prototype_terms(
        self,
        view: _StepView,
        models: Models,
        teacher: UNetOutput,
        z_teacher: torch.Tensor,
        teacher_scores: torch.Tensor,
        student_logits: torch.Tensor,
        threshold: float,
    ) -> dict[str, torch.Tensor]:
        p = self.params
        grid = z_teacher.shape[-2:]
        nearest = lambda t: F.interpolate(t[:, None].float(), size=grid, mode="nearest")[:, 0]  # noqa: E731
        features = run_fp32(models.extra["projection"], view.student.features)  # (B, D, h, w), with gradient
        with torch.no_grad():
            source = student_logits.detach()
            if p.pseudo_source == "teacher":
                source = F.interpolate(
                    teacher.logits.float(), size=grid, mode="bilinear", align_corners=False
                )
            probabilities = torch.softmax(source, dim=1)
            given = nearest(view.labels).long()
            labels = torch.where(given >= 0, given, probabilities.argmax(dim=1))
            uncertain = entropy(probabilities) > threshold
            rows = view.update_rows
            teacher_labels = teacher_scores[rows].argmax(dim=1)
            pseudo_uncertain = uncertain[rows]
            if view.update_pixels is not None:
                pixels = nearest(view.update_pixels)[rows] > 0.5
                teacher_labels = torch.where(pixels, teacher_labels, torch.full_like(teacher_labels, IGNORE))
                pseudo_uncertain = pseudo_uncertain[pixels]
        layers = self._layers(labels, uncertain, view.layer_first)
        flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # noqa: E731
        prototypes, mean_probabilities = pool_layers(
            flat(features), flat(probabilities), layers.layer_ids, layers.pixel_ids, layers.count
        )
        self._last = {
            "pccs_prototypes": torch.tensor(float(layers.count)),
            "pccs_uncertain_fraction": pseudo_uncertain.float().mean(),
        }
        terms: dict[str, torch.Tensor] = {}
        if p.contrast:
            terms["prototype_contrast"] = p.lambda_pc * uncertainty_weighted_contrast(
                prototypes, layers.classes, mean_probabilities, p.tau, p.unc_weight, p.unc_sign
            )
        if p.proto_update:
            terms["prototype_aux"] = p.lambda_aux * self._update_prototypes(
                models.extra["prototypes"],
                features[rows].detach(),
                z_teacher[rows],
                teacher_labels,
                layer_groups(prototypes.detach(), layers.classes, layers.depth, self.num_classes, p.K),
            )
        else:
            self._class_mean_update(z_teacher[rows], teacher_labels)
        return terms

    def _layers(self, labels: torch.Tensor, uncertain: torch.Tensor, first: int) -> _LayerSet:
        """SDM layers (or class-mean sets) of images [first:], falling back to class means if empty."""
        p = self.params
        label_maps = labels[first:].cpu().numpy()
        uncertain_maps = uncertain[first:].cpu().numpy()
        if p.sdm_protos:
            per_image = [
                sdm_layers(label_map, uncertain_map, self.num_classes, p.sdm_levels, p.sdm_bands)
                for label_map, uncertain_map in zip(label_maps, uncertain_maps, strict=True)
            ]
        else:
            per_image = []
        if not any(per_image):
            per_image = [class_layers(label_map, self.num_classes) for label_map in label_maps]
        grid_pixels = labels.shape[1] * labels.shape[2]
        return _flatten_layers(per_image, first, grid_pixels, labels.device)

    @torch.no_grad()
    def _assign(
        self, scores: torch.Tensor, teacher_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pixel: the sub-prototype target c·K + k (Sinkhorn argmax within the teacher's class c) and
        a Gumbel-sampled sub-prototype index k used for the prototype update, as in the PCCS code."""
        p, k = self.params, self.params.K
        target = torch.full_like(teacher_labels, IGNORE)
        sampled = torch.full_like(teacher_labels, IGNORE)
        for cls in range(self.num_classes):
            pixels = teacher_labels == cls
            if not bool(pixels.any()):
                continue
            class_scores_k = scores[:, cls].permute(0, 2, 3, 1)[pixels]  # (n, K)
            assignment = sinkhorn(class_scores_k, p.sinkhorn_iters, p.sinkhorn_eps)
            target[pixels] = cls * k + assignment.argmax(dim=1)
            sample = F.gumbel_softmax(assignment, tau=p.gumbel_tau, hard=True)
            sampled[pixels] = sample.argmax(dim=1)
        return target, sampled

    def _update_prototypes(
        self,
        prototype_layer: nn.Conv2d,
        features: torch.Tensor,
        z_teacher: torch.Tensor,
        teacher_labels: torch.Tensor,
        grouped_layers: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Prototype updating prototype on the unlabelled images; returns l_aux (gradient into W_S)."""
        p, num_classes, k = self.params, self.num_classes, self.params.K
        bank = self.bank
        with torch.no_grad():
            batch, _, height, width = features.shape
            scores = run_fp32(prototype_layer, features).view(batch, num_classes, k, height, width)
            agree = teacher_labels == scores.amax(dim=2).argmax(dim=1)
            target, sampled = self._assign(scores, teacher_labels)
            agreeing = torch.where(agree, teacher_labels, torch.full_like(teacher_labels, IGNORE))
            means, counts = group_prototypes(z_teacher, agreeing, sampled, num_classes, k)
            bank.update(means, None, counts, n_min=1)  # PCCS tracks no intensities
            layer_prototypes, present = grouped_layers
            present_counts = present[:, None].expand(-1, k).long()
            bank.update(layer_prototypes, None, present_counts, n_min=1, momentum=p.mix_momentum)
            self._last["pccs_agreement"] = agree[teacher_labels >= 0].float().mean()
        # teacher features scored by the student's prototypes: only W_S learns from l_aux
        return F.cross_entropy(run_fp32(prototype_layer, z_teacher), target, ignore_index=IGNORE)

    @torch.no_grad()
    def _class_mean_update(self, z_teacher: torch.Tensor, teacher_labels: torch.Tensor) -> None:
        """``proto_update: false``: every sub-prototype of a class follows the class mean (EMA ``gamma``)."""
        means, counts = group_prototypes(
            z_teacher, teacher_labels, torch.zeros_like(teacher_labels), self.num_classes, 1
        )
        self.bank.update_per_class(means, counts, n_min=1)

    # -- state and diagnostics ---------------------------------------------------------------------
    def diagnostics(self) -> dict[str, float]:
        return {name: float(value) for name, value in self._last.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if FROZEN_TEACHER_KEY in state:
            raise ValueError(
                "pccs method state holds a frozen teacher (the earlier checkpoint layout); "
                "resume it through the trainer, which upgrades it"
            )
        self.bank.load_state_dict(state["bank"])

    def upgrade_checkpoint(self, checkpoint: dict[str, Any], source: str) -> None:
        """Earlier checkpoints of ``teacher_update: frozen`` kept PCCS's frozen teacher (network and
        projection head) in the method state, next to an EMA teacher that PCCS did not read on
        ``base.mix: none``: that frozen copy becomes the trainer's teacher, so the run continues exactly.
        On ``base.mix: bcp`` the EMA teacher was BCP's pseudo-labeller while PCCS read the untrained copy;
        one frozen teacher cannot continue that run, so it is refused."""
        frozen = checkpoint.get("method_state", {}).pop(FROZEN_TEACHER_KEY, None)
        if frozen is None:
            return
        if self.params.base.mix != "none":
            raise ConfigError(
                f"{source}: written when pccs with teacher_update: frozen on base.mix: bcp kept a separate "
                "untrained teacher for its prototypes; the teacher is now one, frozen at the stage switch, "
                "so this run cannot continue exactly: start it again"
            )
        checkpoint["teacher"] = _prefixed(frozen, "network.")
        teacher_extra = dict(checkpoint["teacher_extra"])
        teacher_extra.update({f"projection.{k}": v for k, v in _prefixed(frozen, "projection.").items()})
        checkpoint["teacher_extra"] = teacher_extra


FROZEN_TEACHER_KEY = "frozen_teacher"  # where earlier versions kept PCCS's own frozen teacher


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, with the prefix removed."""
    return {name[len(prefix) :]: value for name, value in state.items() if name.startswith(prefix)}
