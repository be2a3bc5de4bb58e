"""BARL, bilateral alignment in representation and label spaces (spec section b3), as a co-training
plug-in of the one trainer.

Two networks with the same topology and independent initialisation learn side by side: branch A is the
trainer's student (transposed-conv decoder), branch B is an extra module (bilinear decoder by default,
for diversity). Each has multi-scale heads (the U-Net's deep-supervision heads at 1/8, 1/4, 1/2 plus the
main head) and a representation head. Every step both see the labelled slices, the weak view of the
unlabelled slices and, for DPR, their strong view. Four switchable components:

* **DPR** (``dpr``): path 1, cross pseudo-supervision — each branch's confident weak-view argmax
  supervises the other branch on the strong view (CutMix applied to image and pseudo-label alike);
  path 2, agreement-weighted bidirectional KL between the branches' weak-view distributions.
* **PCBC** (``pcbc``): on the weak view, each scale is pulled towards the two branches' consensus one
  scale finer (fixed target, confident pixels); coarser pairs switch on later (``pcbc_schedule``).
* **RA** (``ra``): per image and class, the branches' embedding centroids agree (cosine); regions are
  ground truth on labelled slices and the confident consensus on unlabelled ones.
* **IA** (``ia``): connected components of each branch's own weak-view prediction are matched across
  branches per class (Hungarian on IoU) and the embeddings pooled over matched pairs agree.

All four off: two independently trained supervised networks (the sanity row); only ``dpr``: a CPS-like
baseline. Each term is ramped by w(t) (the Mean Teacher sigmoid normalised to 1) times its λ.

Bases. ``base.mix: none`` is the above: each branch learns the labelled slices with multi-scale supervision.
``base.mix: bcp`` gives each branch BCP's step instead, on the same mixed inputs (BCP's loss at every scale,
weighted by ``beta``), so BARL can be compared with, and added to, the copy-paste base the other methods use
(spec a.4): pseudo-labels come from an EMA teacher of branch A (BARL has a teacher only on this base) and
BCP's stage switch applies (the trainer restores branch B with the student). BARL's terms then compare the
branches on the mixed inputs after pre-training (they are made for unlabelled pixels): the weak view is
the mixed inputs; DPR's strong view is the strong views mixed with the same box, and its hard pseudo-labels
supervise only pixels that are not ground truth (those are the base's); RA takes ground truth where the
pixel came from a labelled slice, the confident consensus elsewhere; PCBC, IA and DPR's soft path use whole
mixed slices. On this base branch B's initial weights and dropout come from a random stream of its own (a
function of the run's seed and the iteration; torch's global stream is forked around it), so branch A
makes exactly BCP's random draws: with the four components off and one scale, branch A is BCP bit for bit
(tested), and a resumed run repeats branch B's draws. On ``mix: none`` branch B still draws from the
global stream, so runs of that base are unchanged.

Choices the spec leaves open, and why:

* One SGD optimiser (the trainer's) holds both branches and heads. SGD's update, momentum and weight
  decay are per parameter, so this is exactly the spec's "one optimiser per branch" with equal settings,
  and the trainer checkpoints and resumes branch B (an extra module) with no special case.
* Branch B is initialised from the torch RNG right after the student (same seed, different draws; on
  ``mix: bcp`` from its own stream, see above): independent weights, yet a run is reproducible from its
  seed.
* Multi-scale logits are upsampled bilinearly to the patch (URPC style) before every loss, so all scales
  are compared with full-resolution labels and with each other pixel for pixel.
* The strong view is the trainer's intensity-only strong augmentation (``augment.strong_*``: set
  brightness/contrast/gamma/blur there) plus CutMix done here (``cutmix_prob`` per image, a box of side
  ``cutmix_ratio`` taken from the next unlabelled image of the batch), because CutMix must mix the
  pseudo-labels too. The shipped config turns the trainer's cutout and noise off.
* Masked losses average over all pixels with unreliable ones weighted 0 (FixMatch convention).
* Representation heads are MPCL's projection head (1/2 + 1/1 decoder maps, two 1x1 convs, unit norm)
  rather than a single 1x1 conv on the 1/2 map: one head design in the code base, and a nonlinear
  head keeps the alignment losses from constraining the segmentation features directly.
  ``ra_min_pixels`` counts pixels on that (stride-2) embedding grid; ``ia_min_size`` counts full-res pixels.
* Batch-norm statistics: in eval mode the co-trained branches' running statistics can miss the clean
  images (dropout before batch norm: a variance shift; ``benchmarks/bn_gap.py``).
  ``train.bn_recalibration_slices`` recomputes them from clean slices before validation; the shipped
  config leaves it off, so its row is scored with running statistics like every other row and the
  published code.
* Inference (``infer``): ``avg`` — validation and best-checkpoint choice use the mean of both branches'
  finest softmax; ``A`` — branch A alone. The model package always holds branch A (the runtime knows one
  U-Net); ``mpcl.training.trainer.inference_model_from_checkpoint`` rebuilds the average for evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpcl.errors import ConfigError
from mpcl.nn.projection import ProjectionHead
from mpcl.nn.unet import UNet, UNetOutput, join_outputs
from mpcl.training.data.batches import Batch
from mpcl.training.losses.barl_alignment import instance_alignment, instance_regions, region_alignment
from mpcl.training.losses.barl_label import (
    agreement_weighted_kl,
    masked_cross_entropy,
    pcbc_loss,
    pcbc_stage_weights,
)
from mpcl.training.losses.dice import ce_dice_loss
from mpcl.training.losses.mixing import mix_images, random_box_mask
from mpcl.training.losses.prototypes import IGNORE
from mpcl.training.methods.base import Method, Models, StageSwitch, StepInfo, check_params, delayed_ramp
from mpcl.training.methods.bcp import (
    BCPParams,
    CopyPasteStep,
    check_copy_paste_batches,
    copy_paste_loss,
    copy_paste_stage_switches,
    copy_paste_step,
)
from mpcl.training.precision import run_fp32


@dataclass
class BARLBaseParams(BCPParams):
    """What each branch learns from labels: ``none``, BARL's multi-scale ½(CE + Dice) on the labelled
    slices; ``bcp``, BCP's step (the inherited keys are BCP's own and apply to ``bcp`` only, ``ema_decay``
    included: only then does BARL have a teacher, the EMA of branch A that pseudo-labels for both)."""

    mix: Literal["none", "bcp"] = "none"


@dataclass
class BARLParams:
    base: BARLBaseParams = field(default_factory=BARLBaseParams)
    dpr: bool = True
    pcbc: bool = True
    ra: bool = True
    ia: bool = True
    scales: int = 4  # finest heads used: 4 = 1/8, 1/4, 1/2, 1/1 (needs model.deep_supervision: true)
    beta: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4])  # supervised weight per scale
    tau: float = 0.8  # confidence of pseudo-labels (DPR path 1) and of the consensus map (RA)
    tau_s: float = 0.7  # confidence of the finer-scale consensus that corrects a coarser scale (PCBC)
    soft_weight: float = 0.5  # weight of DPR path 2 relative to path 1
    lambda_dpr: float = 0.5
    lambda_pcbc: float = 0.5
    lambda_ra: float = 0.1
    lambda_ia: float = 0.1
    rampup_iterations: int | None = None  # w(t) ramp length; None: the whole run
    consistency_start: int = 0  # unsupervised terms are 0 before this iteration
    pcbc_schedule: Literal["progressive", "constant"] = "progressive"
    pcbc_stage_fraction: float = 0.1  # progressive: each coarser scale pair starts this fraction later
    ra_min_pixels: int = 16
    ia_min_size: int = 10
    ia_iou: float = 0.3
    ia_unmatched_penalty: float = 0.0
    embed_dim: int = 64
    embed_stride: int = 2
    cutmix_prob: float = 0.5
    cutmix_ratio: float = 0.5  # side of the CutMix box relative to the patch
    branch_b_upsampling: Literal["bilinear", "transposed"] = "bilinear"
    infer: Literal["avg", "A"] = "avg"

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.scales <= 4, "scales must be between 1 and 4"),
            (len(self.beta) == self.scales, f"beta must list one weight per scale ({self.scales})"),
            (all(b >= 0 for b in self.beta) and sum(self.beta) > 0, "beta must be >= 0, not all 0"),
            (self.scales >= 2 or not self.pcbc, "pcbc needs scales >= 2"),
            (0.0 <= self.tau <= 1.0 and 0.0 <= self.tau_s <= 1.0, "tau and tau_s must be in [0, 1]"),
            (0.0 < self.pcbc_stage_fraction <= 1.0, "pcbc_stage_fraction must be in (0, 1]"),
            (0.0 <= self.cutmix_prob <= 1.0, "cutmix_prob must be in [0, 1]"),
            (0.0 < self.cutmix_ratio < 1.0, "cutmix_ratio must be in (0, 1)"),
            (0.0 < self.ia_iou <= 1.0, "ia_iou must be in (0, 1]"),
            (self.ia_min_size >= 1 and self.ra_min_pixels >= 1, "ia_min_size and ra_min_pixels must be >= 1"),
            (self.embed_stride in (1, 2), "embed_stride must be 1 or 2"),
            (self.embed_dim >= 2, "embed_dim must be >= 2"),
        ]
        check_params(checks)


class BranchAverage(nn.Module):
    """Two segmentation networks as one: returns log(½(softmax a + softmax b)), logits whose softmax
    (and argmax) is the average of the branches' distributions."""

    def __init__(self, branch_a: nn.Module, branch_b: nn.Module) -> None:
        super().__init__()
        self.branch_a, self.branch_b = branch_a, branch_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = 0.5 * (torch.softmax(self.branch_a(x), 1) + torch.softmax(self.branch_b(x), 1))
        return torch.log(mean.clamp_min(1e-12))


def cutmix_boxes(batch: int, shape: tuple[int, int], prob: float, ratio: float) -> torch.Tensor:
    """(B, H, W) bool: for each image, with probability ``prob``, one random box of side ratio·size."""
    chosen = torch.rand(batch) < prob
    boxes = torch.zeros(batch, *shape, dtype=torch.bool)
    for index in torch.nonzero(chosen).flatten().tolist():
        boxes[index] = random_box_mask(shape, ratio).bool()
    return boxes


def cutmix(tensor: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Inside image i's box, the content of image i+1 (cyclically); images (B,1,H,W) or maps (B,H,W)."""
    partner = torch.roll(tensor, shifts=-1, dims=0)
    mask = boxes[:, None] if tensor.dim() == 4 else boxes
    return torch.where(mask.to(tensor.device), partner, tensor)


def scale_logits(output: UNetOutput, rows: slice, scales: int, size: tuple[int, int]) -> list[torch.Tensor]:
    """The finest ``scales`` logit maps of ``rows``, coarse to fine, upsampled to ``size``."""
    maps = [*output.deep_logits, output.logits][-scales:]
    return [
        m[rows]
        if m.shape[-2:] == size
        else F.interpolate(m[rows], size=size, mode="bilinear", align_corners=False)
        for m in maps
    ]


def mixed_views(step: CopyPasteStep, labeled: torch.Tensor, unlabeled: torch.Tensor) -> list[torch.Tensor]:
    """Another view of a copy-paste step's slices (e.g. the strong one) mixed as ``copy_paste_step`` mixed
    the weak view: the same box, the same pairs, so pixels correspond one to one."""
    half, outer = labeled.shape[0] // 2, step.outer_mask
    if step.stage == "copy_paste_labeled":
        return [mix_images(labeled[:half], labeled[half:], outer)]
    return [
        mix_images(unlabeled[:half], labeled[:half], outer),
        mix_images(labeled[half:], unlabeled[half:], outer),
    ]


def _stream_seed(*key: int) -> int:
    return int(np.random.SeedSequence([*key]).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class WeakView:
    """The two branches' finest predictions on the weak view of the unlabelled slices."""

    rows: slice  # where the weak view sits in the step's batch
    logits_a: torch.Tensor
    logits_b: torch.Tensor
    confidence_a: torch.Tensor
    pseudo_a: torch.Tensor
    confidence_b: torch.Tensor
    pseudo_b: torch.Tensor
    consensus_confidence: torch.Tensor  # max of ½(p_a + p_b)
    consensus: torch.Tensor  # argmax of ½(p_a + p_b)

    @classmethod
    def of(cls, out_a: UNetOutput, out_b: UNetOutput, rows: slice) -> WeakView:
        logits_a, logits_b = out_a.logits[rows], out_b.logits[rows]
        with torch.no_grad():
            # float32: confidences meet thresholds (mpcl.training.precision)
            probabilities_a = torch.softmax(logits_a.float(), 1)
            probabilities_b = torch.softmax(logits_b.float(), 1)
            consensus = (0.5 * (probabilities_a + probabilities_b)).max(1)
            return cls(rows, logits_a, logits_b, *probabilities_a.max(1), *probabilities_b.max(1), *consensus)


class BARL(Method):
    name = "barl"
    Params = BARLParams
    uses_unlabeled = True
    uses_strong_views = True

    def __init__(self, params: BARLParams, num_classes: int) -> None:
        super().__init__(params, num_classes)
        self.semi_supervised = params.dpr or params.pcbc or params.ra or params.ia
        self.representation = params.ra or params.ia
        self.copy_paste = params.base.mix == "bcp"
        if self.copy_paste:
            self.uses_teacher = True  # BCP's pseudo-labeller: the EMA of branch A
            self.uses_strong_views = params.dpr  # only DPR's path 1 looks at a strong view
        self._run_seed = torch.initial_seed()  # the trainer seeds torch before it builds the method
        self._diagnostics: dict[str, float] = {}

    @property
    def ema_decay(self) -> float:
        return self.params.base.ema_decay

    @classmethod
    def check_batches(cls, params: BARLParams, labeled_batch: int, unlabeled_batch: int) -> str | None:
        if params.base.mix == "bcp":
            return check_copy_paste_batches(labeled_batch, unlabeled_batch)
        if (params.dpr or params.pcbc or params.ra or params.ia) and unlabeled_batch < 1:
            return "barl needs train.unlabeled_batch >= 1 unless dpr, pcbc, ra and ia are all off"
        return None

    def stage_switches(self, total_iterations: int) -> list[StageSwitch]:
        if self.copy_paste:
            return copy_paste_stage_switches(self.params.base, total_iterations)
        return []

    def build_extra_modules(self, student: nn.Module) -> dict[str, nn.Module]:
        p = self.params
        if not isinstance(student, UNet):
            raise ConfigError("method barl needs the U-Net student")
        if p.scales > 1 and student.deep_heads is None:
            raise ConfigError(
                f"method barl with method.params.scales: {p.scales} needs model.deep_supervision: true "
                "(its multi-scale heads are the U-Net's deep-supervision heads)"
            )
        if not self.copy_paste:
            return self._build_extra_modules(student)
        with torch.random.fork_rng(devices=[]):  # on the BCP base, branch A's draws stay BCP's
            torch.random.default_generator.manual_seed(_stream_seed(self._run_seed, 0xBA, 0))
            return self._build_extra_modules(student)

    def _build_extra_modules(self, student: UNet) -> dict[str, nn.Module]:
        p = self.params
        modules: dict[str, nn.Module] = {
            "branch_b": UNet(**{**student.hyperparameters(), "upsampling": p.branch_b_upsampling})
        }
        if self.representation:
            channels = student.channels
            for name in ("embed_a", "embed_b"):
                modules[name] = ProjectionHead(channels[1], channels[0], p.embed_dim, p.embed_stride)
        return modules

    def inference_model(self, models: Models) -> nn.Module:
        if self.params.infer == "A":
            return models.student
        return BranchAverage(models.student, models.extra["branch_b"])

    def ramp(self, step: StepInfo) -> float:
        """w(t): 0 before ``consistency_start``, then the sigmoid ramp normalised to 1."""
        return delayed_ramp(step, self.params.consistency_start, self.params.rampup_iterations)

    # -- the step --------------------------------------------------------------------------------
    def training_step(self, batch: Batch, models: Models, step: StepInfo) -> dict[str, torch.Tensor]:
        if self.copy_paste:
            return self._copy_paste_step(batch, models, step)
        return self._own_step(batch, models, step)

    def _own_step(self, batch: Batch, models: Models, step: StepInfo) -> dict[str, torch.Tensor]:
        """``base.mix: none``: labelled slices, weak and (DPR) strong unlabelled views in one pass each."""
        p = self.params
        n_labeled = batch.labeled_image.shape[0]
        n_unlabeled = batch.unlabeled_image.shape[0] if self.semi_supervised else 0
        size = tuple(batch.labeled_image.shape[-2:])
        parts = [batch.labeled_image]
        if self.semi_supervised:
            parts.append(batch.unlabeled_image)
        boxes = None
        if p.dpr:
            if batch.unlabeled_strong is None:
                raise ValueError("barl's dpr needs the strong view of the unlabelled batch")
            boxes = cutmix_boxes(n_unlabeled, size, p.cutmix_prob, p.cutmix_ratio)
            parts.append(cutmix(batch.unlabeled_strong, boxes))
        images = torch.cat(parts)
        out_a = models.student.forward_features(images)
        out_b = models.extra["branch_b"].forward_features(images)

        terms = {}
        for name, output in (("a", out_a), ("b", out_b)):
            logits = scale_logits(output, slice(0, n_labeled), p.scales, size)
            terms[f"supervised_{name}"] = sum(
                beta * ce_dice_loss(scale, batch.labeled_label)
                for beta, scale in zip(p.beta, logits, strict=True)
            )
        if not self.semi_supervised:
            return terms
        weak = WeakView.of(out_a, out_b, slice(n_labeled, n_labeled + n_unlabeled))
        strong = slice(n_labeled + n_unlabeled, n_labeled + 2 * n_unlabeled)
        strong_logits = (out_a.logits[strong], out_b.logits[strong]) if p.dpr else None
        unknown = torch.full_like(batch.labeled_label[:1], IGNORE).expand(n_unlabeled, -1, -1)
        known = torch.cat([batch.labeled_label, unknown])
        terms.update(
            self._alignment_terms(models, out_a, out_b, weak, strong_logits, boxes, known, None, step)
        )
        return terms

    def _copy_paste_step(self, batch: Batch, models: Models, step: StepInfo) -> dict[str, torch.Tensor]:
        """``base.mix: bcp``: both branches learn BCP's step on the same mixed inputs (pseudo-labels from
        the EMA of branch A), each scale weighted by ``beta``; BARL's terms compare the branches on the
        mixed inputs (weak) and on the same mixing of the strong views (DPR path 1), after pre-training.
        Branch B draws its random numbers from a stream of its own (``_branch_b_rng``)."""
        p, base = self.params, self.params.base
        mixed = copy_paste_step(base, self.num_classes, batch, models, step)
        inputs = [item.images for item in mixed.inputs]
        semi_supervised = self.semi_supervised and mixed.stage != "copy_paste_labeled"
        boxes, strong = None, None
        if semi_supervised and p.dpr:
            if batch.labeled_strong is None or batch.unlabeled_strong is None:
                raise ValueError("barl's dpr needs the strong views of the labelled and unlabelled batch")
            strong = torch.cat(mixed_views(mixed, batch.labeled_strong, batch.unlabeled_strong))
            boxes = cutmix_boxes(strong.shape[0], tuple(strong.shape[-2:]), p.cutmix_prob, p.cutmix_ratio)
            strong = cutmix(strong, boxes)
        passes_a, strong_a = self._copy_paste_passes(models.student, inputs, strong)
        with self._branch_b_rng(step, batch.labeled_image.device):
            passes_b, strong_b = self._copy_paste_passes(models.extra["branch_b"], inputs, strong)
        terms = {
            f"{mixed.stage}_{name}": self._copy_paste_loss(mixed, passes)
            for name, passes in (("a", passes_a), ("b", passes_b))
        }
        if not semi_supervised:
            return terms
        out_a, out_b = join_outputs(passes_a), join_outputs(passes_b)
        weak = WeakView.of(out_a, out_b, slice(0, out_a.logits.shape[0]))
        known = torch.where(mixed.from_labeled, mixed.target, torch.full_like(mixed.target, IGNORE))
        strong_logits = (strong_a, strong_b) if p.dpr else None
        terms.update(
            self._alignment_terms(
                models, out_a, out_b, weak, strong_logits, boxes, known, ~mixed.from_labeled, step
            )
        )
        return terms

    def _copy_paste_passes(
        self, network: nn.Module, inputs: list[torch.Tensor], strong: torch.Tensor | None
    ) -> tuple[list[UNetOutput], torch.Tensor | None]:
        """One branch on the mixed inputs with the base's passes (one per input, or one for all) and, if
        given, on the strong mixed batch (split the same way): its outputs and the strong finest logits."""
        separate = self.params.base.forward_passes == "separate" or len(inputs) == 1
        if separate:
            passes = [network.forward_features(images) for images in inputs]
        else:
            passes = [network.forward_features(torch.cat(inputs))]
        if strong is None:
            return passes, None
        chunks = torch.split(strong, [images.shape[0] for images in inputs]) if separate else [strong]
        return passes, torch.cat([network(chunk) for chunk in chunks])

    def _copy_paste_loss(self, mixed: CopyPasteStep, passes: list[UNetOutput]) -> torch.Tensor:
        """Σ_s β_s · BCP's loss of scale s (coarse to fine, upsampled to the patch)."""
        p, size = self.params, tuple(mixed.outer_mask.shape)
        levels = [scale_logits(output, slice(None), p.scales, size) for output in passes]
        if len(passes) == len(mixed.inputs):  # one pass per mixed input
            per_scale = [list(scale) for scale in zip(*levels, strict=True)]
        else:
            sizes = [item.images.shape[0] for item in mixed.inputs]
            per_scale = [list(torch.split(scale, sizes)) for scale in levels[0]]
        return sum(
            beta * copy_paste_loss(p.base, mixed, logits)
            for beta, logits in zip(p.beta, per_scale, strict=True)
        )

    @contextmanager
    def _branch_b_rng(self, step: StepInfo, device: torch.device) -> Iterator[None]:
        """Branch B's random draws (dropout) from a stream that is a function of (seed, iteration), so
        branch A's draws are exactly those the base method would make, and a resumed run repeats them."""
        cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if cuda else []):
            seed = _stream_seed(self._run_seed, 0xBA, 1, step.iteration)
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            yield

    def _alignment_terms(
        self,
        models: Models,
        out_a: UNetOutput,
        out_b: UNetOutput,
        weak: WeakView,
        strong_logits: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        known: torch.Tensor,
        pseudo_pixels: torch.Tensor | None,
        step: StepInfo,
    ) -> dict[str, torch.Tensor]:
        """DPR, PCBC, RA and IA between the branches. ``known``: (rows up to the weak view's end) ground
        truth, IGNORE elsewhere; ``pseudo_pixels``: where DPR's hard pseudo-labels may supervise (None:
        the whole weak view)."""
        p = self.params
        size = tuple(weak.logits_a.shape[-2:])
        self._diagnostics = {
            "branch_agreement": float((weak.pseudo_a == weak.pseudo_b).float().mean()),
            "consensus_confident": float((weak.consensus_confidence >= p.tau).float().mean()),
        }
        weight = self.ramp(step)
        terms: dict[str, torch.Tensor] = {}
        if p.dpr:
            terms.update(self._dpr_terms(*strong_logits, weak, boxes, weight, pseudo_pixels))
        if p.pcbc:
            stage_weights = pcbc_stage_weights(
                step.iteration, step.total_iterations, p.scales - 1, p.pcbc_stage_fraction, p.pcbc_schedule
            )
            terms["pcbc"] = (weight * p.lambda_pcbc) * pcbc_loss(
                scale_logits(out_a, weak.rows, p.scales, size),
                scale_logits(out_b, weak.rows, p.scales, size),
                stage_weights,
                p.tau_s,
            )
        if self.representation:
            terms.update(self._representation_terms(models, out_a, out_b, weak, known, weight))
        return terms

    def _dpr_terms(
        self,
        strong_a: torch.Tensor,
        strong_b: torch.Tensor,
        weak: WeakView,
        boxes: torch.Tensor,
        weight: float,
        pseudo_pixels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Path 1: each branch's confident weak-view argmax (CutMixed like the image) supervises the other
        branch's strong view (only on ``pseudo_pixels`` if given). Path 2: agreement-weighted KL between
        the weak-view distributions."""
        p = self.params
        confident_a, confident_b = weak.confidence_a >= p.tau, weak.confidence_b >= p.tau
        if pseudo_pixels is not None:  # ground-truth pixels are supervised by the base already
            confident_a, confident_b = confident_a & pseudo_pixels, confident_b & pseudo_pixels
        target_a, mask_a = cutmix(weak.pseudo_a, boxes), cutmix(confident_a, boxes)
        target_b, mask_b = cutmix(weak.pseudo_b, boxes), cutmix(confident_b, boxes)
        cps = masked_cross_entropy(strong_b, target_a, mask_a) + masked_cross_entropy(
            strong_a, target_b, mask_b
        )
        soft = agreement_weighted_kl(weak.logits_a, weak.logits_b)
        return {
            "dpr_cps": (weight * p.lambda_dpr) * cps,
            "dpr_soft": (weight * p.lambda_dpr * p.soft_weight) * soft,
        }

    def _representation_terms(
        self,
        models: Models,
        out_a: UNetOutput,
        out_b: UNetOutput,
        weak: WeakView,
        known: torch.Tensor,
        weight: float,
    ) -> dict[str, torch.Tensor]:
        """RA on the rows up to the weak view's end (ground truth where ``known``, the confident consensus
        elsewhere); IA on the weak view, from each branch's own prediction."""
        p, stride = self.params, self.params.embed_stride
        # representation heads in float32 under mixed precision: their unit vectors' cosines are the losses
        embed_a = run_fp32(models.extra["embed_a"], [f[: weak.rows.stop] for f in out_a.features])
        embed_b = run_fp32(models.extra["embed_b"], [f[: weak.rows.stop] for f in out_b.features])
        terms = {}
        if p.ra:
            consensus = weak.consensus
            pseudo = torch.where(
                weak.consensus_confidence >= p.tau, consensus, torch.full_like(consensus, IGNORE)
            )
            given = known[weak.rows]
            labels = torch.cat([known[: weak.rows.start], torch.where(given >= 0, given, pseudo)])
            terms["ra"] = (weight * p.lambda_ra) * region_alignment(
                embed_a, embed_b, labels[:, ::stride, ::stride], self.num_classes, p.ra_min_pixels
            )
        if p.ia:
            regions = instance_regions(
                weak.pseudo_a, weak.pseudo_b, self.num_classes, p.ia_min_size, p.ia_iou
            )
            self._diagnostics["ia_pairs_per_image"] = regions.num_matched / max(weak.pseudo_a.shape[0], 1)
            terms["ia"] = (weight * p.lambda_ia) * instance_alignment(
                embed_a[weak.rows], embed_b[weak.rows], regions.on_grid(stride), p.ia_unmatched_penalty
            )
        return terms

    def diagnostics(self) -> dict[str, float]:
        """Branch agreement on the weak view, confident-consensus fraction, matched instances per image."""
        return dict(self._diagnostics)
