"""Numpy (and SimpleITK) code between the network's logits and the label map, shared by every backend.

Softmax and entropy run on batches of slices; the optional clean-ups named in the model package run on
the whole label map: keeping each class's largest 3D connected component, and filling holes of a class
inside each 2D slice (the model is 2D; thick-slice scans rarely have closed holes in 3D). Clean-ups only
turn voxels into background (largest component) or background into the class (holes), so nested
structures such as a ventricle inside the myocardium are left alone.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import SimpleITK as sitk

from mpcl.model_package import Postprocessing


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    """Numerically stable softmax in float32 (as ``torch.softmax`` in training evaluation)."""
    shifted = logits.astype(np.float32, copy=True)
    shifted -= shifted.max(axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted


def normalized_entropy(probabilities: np.ndarray, axis: int = 1) -> np.ndarray:
    """Per-voxel entropy of the class distribution divided by log(C): 0 = certain, 1 = uniform."""
    num_classes = probabilities.shape[axis]
    if num_classes < 2:
        return np.zeros(np.delete(probabilities.shape, axis), dtype=np.float32)
    logs = np.log(np.maximum(probabilities, np.float32(1e-12)))
    logs *= probabilities
    entropy = -logs.sum(axis=axis)
    entropy /= np.float32(np.log(num_classes))
    return np.clip(entropy, 0.0, 1.0).astype(np.float32, copy=False)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    boxes = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if present.size == 0:
            return None
        boxes.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(boxes)


def keep_largest_component(labels: np.ndarray, values: Iterable[int]) -> np.ndarray:
    """For each class value, keep its largest face-connected 3D component; the rest becomes background."""
    labels = labels.copy()
    for value in values:
        box = _bounding_box(labels == value)
        if box is None:
            continue
        region = labels[box]
        mask = sitk.GetImageFromArray((region == value).astype(np.uint8))
        components = sitk.RelabelComponent(sitk.ConnectedComponent(mask, False), sortByObjectSize=True)
        largest = sitk.GetArrayViewFromImage(components) == 1
        region[(region == value) & ~largest] = 0
    return labels


def fill_holes_in_slices(labels: np.ndarray, values: Iterable[int], axis: int = 0) -> np.ndarray:
    """Fill background holes enclosed by a class, slice by slice along ``axis`` (the slicing axis)."""
    labels = labels.copy()
    slices = np.moveaxis(labels, axis, 0)  # a view: writes go to ``labels``
    for value in values:
        for index in range(slices.shape[0]):
            plane = slices[index]
            mask = plane == value
            if not mask.any():
                continue
            image = sitk.GetImageFromArray(mask.astype(np.uint8))
            filled = sitk.GetArrayFromImage(sitk.BinaryFillhole(image, False, 1)).astype(bool)
            plane[filled & (plane == 0)] = value
    return labels


def apply_postprocessing(labels: np.ndarray, settings: Postprocessing, slice_axis: int) -> np.ndarray:
    """The package's clean-ups in a fixed order: largest component first, then hole filling."""
    if settings.largest_component:
        labels = keep_largest_component(labels, settings.largest_component)
    if settings.fill_holes:
        labels = fill_holes_in_slices(labels, settings.fill_holes, slice_axis)
    return labels
