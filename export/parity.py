"""The checks every exported artefact must pass before it is kept: logit parity and the Dice gate.

Parity compares an artefact's logits with the torch network it was made from, on real validation slices
(resized to the patch exactly as inference does): the largest absolute logit difference, relative to the
logit scale, and the fraction of pixels whose argmax label agrees. The Dice gate runs the artefact on
the runtime backend ``Segmenter`` uses, over whole validation volumes, through the inference core that
``Segmenter`` and training's evaluation run (``mpcl.inference``), and compares its mean Dice with the
source model's: a lossy artefact (int8, fp16, a distilled student) is kept only if it loses at most
``max_drop`` Dice points (1 point = 0.01 Dice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mpcl.errors import MPCLError
from mpcl.preprocessing import resize_2d, through_plane_axis
from mpcl.training.data.base import Volume
from mpcl.training.evaluate import evaluate_volumes


class CheckFailed(MPCLError):
    """An exported artefact did not match its source model closely enough; it was not written."""


@dataclass(frozen=True)
class ParityThresholds:
    """Largest allowed |logit difference| as a fraction of the logit scale, and smallest label agreement."""

    relative_logit_tolerance: float | None
    min_label_agreement: float


# fp32 graphs compute the same arithmetic in another order; fp16 keeps ~3 significant digits through
# 18 convolutions; TensorRT may use TF32 for its fp32 engines. int8 is judged by the Dice gate only.
THRESHOLDS = {
    "fold": ParityThresholds(1e-5, 0.999),
    "onnx_fp32": ParityThresholds(1e-4, 0.999),
    "onnx_fp16": ParityThresholds(1e-2, 0.99),
    "onnx_int8": ParityThresholds(None, 0.0),
    "openvino_bf16": ParityThresholds(5e-2, 0.99),  # 8-bit mantissas: looser than fp16, Dice decides
    "tensorrt_fp32": ParityThresholds(1e-2, 0.995),
    "tensorrt_fp16": ParityThresholds(1e-2, 0.99),
}


@dataclass(frozen=True)
class ParityResult:
    max_abs_logit_difference: float
    logit_scale: float
    label_agreement: float
    slices: int
    thresholds: ParityThresholds

    @property
    def tolerance(self) -> float | None:
        relative = self.thresholds.relative_logit_tolerance
        return None if relative is None else relative * self.logit_scale

    @property
    def passed(self) -> bool:
        logits_ok = self.tolerance is None or self.max_abs_logit_difference <= self.tolerance
        return logits_ok and self.label_agreement >= self.thresholds.min_label_agreement

    def describe(self) -> str:
        """One line for the export log. Every export check compares against the source network run in
        fp32 torch; the agreement is the share of all pixels of the slices whose argmax labels match."""
        limit = "not gated" if self.tolerance is None else f"limit {self.tolerance:.3g}"
        required = self.thresholds.min_label_agreement
        gate = "not gated" if required <= 0 else f"at least {100 * required:.1f}% required"
        return (
            f"max |logit diff| {self.max_abs_logit_difference:.3g} ({limit}); labels agree with the fp32 "
            f"torch network on {100 * self.label_agreement:.3f}% of pixels ({gate}) over {self.slices} slices"
        )

    def record(self) -> dict:
        """What model.json keeps about this check."""
        return {
            "max_abs_logit_difference": self.max_abs_logit_difference,
            "logit_tolerance": self.tolerance,
            "label_agreement": self.label_agreement,
            "min_label_agreement": self.thresholds.min_label_agreement,
            "slices": self.slices,
        }


def compare_logits(expected: np.ndarray, actual: np.ndarray, thresholds: ParityThresholds) -> ParityResult:
    """Parity of two (N, C, H, W) logit arrays."""
    expected, actual = np.asarray(expected, np.float32), np.asarray(actual, np.float32)
    if expected.shape != actual.shape:
        raise CheckFailed(f"logits have shape {actual.shape}; the source model gives {expected.shape}")
    agreement = float((expected.argmax(1) == actual.argmax(1)).mean())
    difference = float(np.abs(actual - expected).max()) if np.isfinite(actual).all() else float("inf")
    scale = float(max(1.0, np.abs(expected).max()))
    return ParityResult(difference, scale, agreement, int(expected.shape[0]), thresholds)


def validation_slices(volumes: Sequence[Volume], patch_size: tuple[int, int], limit: int = 32) -> np.ndarray:
    """(N, 1, H, W) float32 validation slices resized to the patch, taken evenly across the volumes."""
    per_volume = max(1, -(-limit // max(1, len(volumes))))
    chunks, total = [], 0
    for volume in volumes:
        slices = np.moveaxis(volume.image, through_plane_axis(volume.spacing), 0)
        picks = np.linspace(0, slices.shape[0] - 1, min(per_volume, slices.shape[0])).round().astype(int)
        chunks.append(resize_2d(slices[np.unique(picks)], patch_size, order=1))
        total += len(chunks[-1])
        if total >= limit:
            break
    if not chunks:
        raise CheckFailed("no validation slices to check the exported model on")
    return np.ascontiguousarray(np.concatenate(chunks)[:limit, None], dtype=np.float32)


def random_slices(in_channels: int, patch_size: tuple[int, int], count: int = 3) -> np.ndarray:
    """Deterministic random inputs, for when no data is at hand (packaging at the end of training)."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(count, in_channels, *patch_size, generator=generator).numpy()


@torch.no_grad()
def torch_logits(model: nn.Module, batch: np.ndarray, chunk: int = 16) -> np.ndarray:
    model = model.eval()
    outputs = [model(torch.from_numpy(batch[i : i + chunk])).numpy() for i in range(0, len(batch), chunk)]
    return np.concatenate(outputs)


def backend_logits(backend, batch: np.ndarray, chunk: int = 16) -> np.ndarray:
    """Logits of an ``mpcl.backends`` backend, fed in chunks as the Segmenter feeds it."""
    return np.concatenate([backend.run(batch[i : i + chunk]) for i in range(0, len(batch), chunk)])


def mean_dice(
    model, volumes: Sequence[Volume], class_names: list[str], patch_size, resize: str = "linear"
) -> float:
    """Mean foreground Dice over ``volumes`` (training's per-volume evaluation protocol, with the model's
    ``resize``) of a torch network (on the device its weights are on) or of an ``mpcl.backends`` backend
    (the artefact as the runtime runs it), both through the same inference core as ``Segmenter``."""
    result = evaluate_volumes(model, volumes, class_names, tuple(patch_size), None, resize=resize)
    if not result["summary"]:
        raise CheckFailed("the validation volumes have no labels, so the Dice gate cannot run")
    return float(result["summary"]["mean"]["dice"]["mean"])


@dataclass(frozen=True)
class DiceCheck:
    """Source vs artefact mean validation Dice; ``drop_points`` > ``max_drop_points`` refuses the artefact."""

    source_dice: float
    dice: float
    max_drop_points: float
    volumes: int

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.source_dice - self.dice)

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.dice)) and self.drop_points <= self.max_drop_points + 1e-9

    def describe(self) -> str:
        return (
            f"validation Dice {self.dice:.4f} vs source {self.source_dice:.4f} "
            f"(change {-self.drop_points:+.2f} points, max drop {self.max_drop_points:g}) "
            f"on {self.volumes} volumes"
        )

    def record(self) -> dict:
        return {
            "validation_dice": self.dice,
            "source_validation_dice": self.source_dice,
            "dice_drop_points": self.drop_points,
            "max_dice_drop_points": self.max_drop_points,
            "validation_volumes": self.volumes,
        }
