"""What the fused kernels must compute, in numpy, built from the runtime's own functions.

The numpy path of the Segmenter is the specification: normalisation and corner-aligned bilinear resize
from ``mpcl.preprocessing``, softmax and normalised entropy from ``mpcl.postprocessing``, and the
test-time-flip mean defined here (the Segmenter calls it too). The kernels are tested against these
functions, and these functions against the Segmenter, so a fused GPU run can only differ from the CPU
runtime by float rounding.

Normalisation is split into statistics (one pass over the whole volume, here on the host) and an affine
map with clipping, ``(clip(x, lower, upper) - offset) / divisor``, which the preprocessing kernel applies
per voxel while it resizes: every scheme of ``normalize_intensity`` has that form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from mpcl.errors import InputError
from mpcl.postprocessing import normalized_entropy, softmax
from mpcl.preprocessing import (  # noqa: F401  (re-exported: the kernels' normalisation contract)
    IDENTITY,
    ZEROS,
    NormalizationAffine,
    apply_normalization,
    normalization_affine,
    resize_2d,
)

Flip = tuple[int, ...]
# Bit 0: flip along the last axis (x, -1); bit 1: flip along the second last (y, -2). With the Segmenter's
# TTA order ((), (-1,), (-2,), (-2, -1)) part f has code f.
_FLIP_BITS = {-1: 1, -2: 2}


class HeadOutputs(NamedTuple):
    """Per-slice results at the slice's own size: labels (b, H, W) uint8, optionally probabilities
    (b, C, H, W) and normalised entropy (b, H, W), both float32."""

    labels: np.ndarray
    probabilities: np.ndarray | None
    uncertainty: np.ndarray | None



def flip_code(flip: Flip) -> int:
    """The kernels' code for one flip (a tuple of axes from {-1, -2}); see ``_FLIP_BITS``."""
    if any(axis not in _FLIP_BITS for axis in flip) or len(set(flip)) != len(flip):
        raise InputError(f"flip {flip!r}: only the last two axes (-1, -2) can be flipped, each once")
    return sum(_FLIP_BITS[axis] for axis in flip)


def average_flips(probabilities: np.ndarray, flips: Sequence[Flip]) -> np.ndarray:
    """Mean over test-time flips: part ``f`` of the (F*b, C, h, w) batch was predicted on the input
    flipped by ``flips[f]``, so it is flipped back before the parts are averaged (float32)."""
    if len(flips) == 1:
        return probabilities
    size = len(probabilities) // len(flips)
    parts = [probabilities[i * size : (i + 1) * size] for i in range(len(flips))]
    total = sum(np.flip(part, f) if f else part for part, f in zip(parts, flips, strict=True))
    return (total / np.float32(len(flips))).astype(np.float32, copy=False)


def preprocess_reference(
    slices: np.ndarray, affine: NormalizationAffine, patch_hw: Sequence[int]
) -> np.ndarray:
    """Raw (b, H, W) slices to the network's (b, 1, h, w) float32 batch: normalise, then resize."""
    resized = resize_2d(apply_normalization(slices, affine), tuple(patch_hw), order=1)
    return np.ascontiguousarray(resized[:, None])


def head_reference(
    logits: np.ndarray,
    flips: Sequence[Flip],
    out_hw: Sequence[int],
    probabilities: bool = False,
    uncertainty: bool = False,
) -> HeadOutputs:
    """Logits (F*b, C, h, w) of the flipped batches to labels (and probabilities / entropy) at ``out_hw``:
    softmax, flip mean, corner-aligned bilinear resize, argmax, normalised entropy — the Segmenter's order."""
    mean = average_flips(softmax(logits), flips)
    resized = resize_2d(mean, tuple(out_hw), order=1)
    return HeadOutputs(
        resized.argmax(axis=1).astype(np.uint8),
        resized if probabilities else None,
        normalized_entropy(resized) if uncertainty else None,
    )
