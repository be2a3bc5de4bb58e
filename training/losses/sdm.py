"""Signed distance maps and the SDM "layers" that PCCS builds boundary-aware prototypes from (spec b2.3).

A layer is a set of pixels of one class at one depth from the class boundary (a ring, or a band of
rings); PCCS averages pixel features over each layer, so a class is represented by a stack of
prototypes ordered from its boundary inwards. Pure numpy on one (h, w) label map: the grids are small
(1/4 of the input), and scipy's exact Euclidean distance transform does the work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.ndimage import distance_transform_edt


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Signed distance map of a 2-D binary mask, in pixels: positive outside (distance to the nearest
    mask pixel), negative inside (distance to the nearest pixel outside), and exactly 0 on the inner
    boundary (mask pixels with a 4-neighbour outside the mask, skimage's ``find_boundaries(mode='inner')``).

    Not normalised, as PCCS uses the levels themselves. An empty mask is +inf everywhere and a mask that
    covers the whole image is −inf everywhere: neither has a boundary inside the image.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.full(mask.shape, np.inf)
    if mask.all():
        return np.full(mask.shape, -np.inf)
    outside = distance_transform_edt(~mask)  # 0 on mask pixels
    inside = distance_transform_edt(mask)  # 0 off the mask; exactly 1 next to a 4-neighbour outside
    sdf = outside - inside
    sdf[inside == 1] = 0.0
    return sdf


@dataclass(frozen=True)
class Layer:
    """Pixels of class ``cls`` at one depth: ``depth`` (pixels from the boundary, mean over the layer)
    orders a class's layers boundary → interior; ``pixels`` are flat indices into the (h, w) grid."""

    cls: int
    depth: float
    pixels: np.ndarray


def _depth_key(depth: np.ndarray) -> np.ndarray:
    """Exact ring identity: Euclidean distances on a grid are square roots of integers."""
    return np.rint(depth * depth).astype(np.int64)


def _rings(region: np.ndarray, depth: np.ndarray, keys: np.ndarray, cls: int) -> list[Layer]:
    """One layer per level in ``keys`` (squared depths): the pixels of ``region`` at exactly that depth."""
    layers = []
    region_keys = _depth_key(depth)
    for key in keys:
        pixels = np.flatnonzero(region & (region_keys == key))
        if pixels.size:
            layers.append(Layer(cls, math.sqrt(key), pixels))
    return layers


def _bands(region: np.ndarray, depth: np.ndarray, max_depth: float, bands: int, cls: int) -> list[Layer]:
    """``bands`` equal-width depth bands over [0, max_depth]; band 0 holds the boundary ring itself."""
    inside = region & (depth <= max_depth)
    index = np.minimum((bands * depth / (max_depth + 1.0)).astype(np.int64), bands - 1)
    layers = []
    for band in range(bands):
        pixels = np.flatnonzero(inside & (index == band))
        if pixels.size:
            layers.append(Layer(cls, float(depth.reshape(-1)[pixels].mean()), pixels))
    return layers


def sdm_layers(
    labels: np.ndarray,
    uncertain: np.ndarray,
    num_classes: int,
    levels: Literal["rings", "bands"] = "rings",
    bands: int = 4,
) -> list[Layer]:
    """The SDM layers of one (h, w) label map, class by class, each class boundary → interior.

    * Background: only its ``uncertain`` pixels, split into a boundary band (depth ≤ ⌈D/2⌉, D = the
      deepest background pixel) and a deep band — two layers at most.
    * A foreground class c bounded on one side only (every other label is below c, or every other is
      above): one ring per distinct depth level of its own SDM.
    * A class "sandwiched" between lower and higher labels (the myocardium between the LV and the
      background): rings measured from each side separately, by the SDMs of {label ≤ c} and
      {label ≥ c}, at the class's own depth levels, restricted to the class's pixels.

    ``levels: rings`` keeps one layer per exact depth level > 0, as the PCCS code does (boundary pixels,
    at depth 0, form no ring, and a class with no pixel off its boundary gives no layer). ``bands``
    quantises depths [0, D] into ``bands`` equal bands including the boundary ring: on small grids the
    exact rings are a handful of pixels each and thin classes would give none.
    """
    labels = np.asarray(labels)
    uncertain = np.asarray(uncertain, dtype=bool)
    rings = levels == "rings"
    layers: list[Layer] = []
    for cls in range(num_classes):
        mask = labels == cls
        if not mask.any() or mask.all():
            continue  # absent, or covering the image: no boundary to measure from
        depth = np.maximum(-signed_distance(mask), 0.0)
        deepest = float(depth[mask].max())
        if rings and deepest <= 0:
            continue  # the class is all boundary: no ring below it
        off_boundary = depth > 0 if rings else mask
        if cls == 0:
            region = mask & uncertain & off_boundary
            split = math.ceil(deepest / 2)
            for band in (region & (depth <= split), region & (depth > split)):
                pixels = np.flatnonzero(band)
                if pixels.size:
                    layers.append(Layer(cls, float(depth.reshape(-1)[pixels].mean()), pixels))
            continue
        sandwiched = not (labels <= cls).all() and not (labels >= cls).all()
        sides = [depth]
        if sandwiched:
            sides = [np.maximum(-signed_distance(labels <= cls), 0.0),
                     np.maximum(-signed_distance(labels >= cls), 0.0)]  # fmt: skip
        if rings:
            keys = np.unique(_depth_key(depth[mask & (depth > 0)]))
            for side in sides:
                layers.extend(_rings(mask & (side > 0), side, keys, cls))
        else:
            for side in sides:
                layers.extend(_bands(mask, side, deepest, bands, cls))
    return layers


def class_layers(labels: np.ndarray, num_classes: int) -> list[Layer]:
    """One layer per present class holding all its pixels: the per-image class-mean prototypes that
    replace the SDM layers when they are switched off, or when a batch yields no SDM layer at all."""
    labels = np.asarray(labels).reshape(-1)
    layers = []
    for cls in range(num_classes):
        pixels = np.flatnonzero(labels == cls)
        if pixels.size:
            layers.append(Layer(cls, 0.0, pixels))
    return layers
