"""A dataset plan's geometry, applied the same way in training and at inference (numpy only, no torch).

``mpcl-plan`` decides, nnU-Net style, three things about where the network's pixels come from; the
config keys ``data.slicing_axis``, ``data.target_spacing`` and ``data.crop_to_nonzero`` carry them into
training, the checkpoint and the model package (``model.json``'s ``resampling``), so a new scan is
prepared exactly as the training slices were:

* **cropping** to the bounding box of the image's non-zero voxels, measured on the raw image (the
  intensity statistics of per-case schemes are then measured inside the box); outside the box the
  segmentation is background;
* **slicing** across a fixed array axis (``z``, ``y``, ``x``) instead of each scan's own coarsest one;
* **in-plane resampling** of each slice to the target spacing (mm along the slice's rows and columns,
  the two remaining array axes in order), so a structure has the same size in pixels whatever the scan's
  resolution. The patch is then a window at that spacing, not the whole slice: a smaller slice is padded
  (centred, with the volume's lowest normalised value, i.e. its background), a larger one is covered by
  overlapping patch-sized windows whose probabilities are averaged, so a fixed-size network input
  (ONNX, TensorRT) serves any scan. Probabilities are resampled back to the slice's own grid, and the
  result is on the scan's exact grid.

Resampling is corner-aligned like every resize of the runtime (``mpcl.preprocessing``): a slice of ``n``
pixels at spacing ``s`` becomes ``round((n - 1) * s / t) + 1`` pixels, whose first and last centres stay
where they were, so the mapping back is the same resize in the other direction.

Without any of the three keys (``PlannedGeometry()``), nothing here runs: slices are taken across each
scan's coarsest axis and zoomed whole to the patch, as before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpcl.errors import InputError
from mpcl.preprocessing import resize_2d, resized_argmax, through_plane_axis, zoom_nearest

SLICING_AXES = ("auto", "z", "y", "x")
AXIS_INDEX = {"z": 0, "y": 1, "x": 2}
SPACING_RANGE_MM = (0.001, 100.0)  # what mpcl-plan --verify calls plausible
WINDOW_OVERLAP = 0.5  # neighbouring windows share half a patch: every pixel is seen away from an edge

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class PlannedGeometry:
    """Where the network's pixels come from: slicing axis, in-plane target spacing (mm along the slice's
    rows and columns), and whether to crop to the non-zero region. The default is the unplanned path."""

    slicing_axis: str = "auto"
    target_spacing: tuple[float, float] | None = None
    crop_to_nonzero: bool = False

    def __post_init__(self) -> None:
        if self.slicing_axis not in SLICING_AXES:
            raise InputError(f"slicing_axis must be one of {SLICING_AXES}, got {self.slicing_axis!r}")
        if self.target_spacing is not None:
            object.__setattr__(self, "target_spacing", _spacing_pair(self.target_spacing))
        if not isinstance(self.crop_to_nonzero, bool):
            raise InputError(f"crop_to_nonzero must be true or false, got {self.crop_to_nonzero!r}")

    @property
    def active(self) -> bool:
        """True when anything differs from the unplanned path."""
        return self.slicing_axis != "auto" or self.target_spacing is not None or self.crop_to_nonzero

    def axis_for(self, spacing_xyz: Sequence[float]) -> int:
        """The array axis (z, y, x order) slices are taken across for a scan with this (x, y, z) spacing."""
        if self.slicing_axis == "auto":
            return through_plane_axis(tuple(spacing_xyz))
        return AXIS_INDEX[self.slicing_axis]

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint metadata's ``planned_geometry`` (same names as the config keys)."""
        return {
            "slicing_axis": self.slicing_axis,
            "target_spacing": None if self.target_spacing is None else list(self.target_spacing),
            "crop_to_nonzero": self.crop_to_nonzero,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> PlannedGeometry:
        """From :meth:`to_dict` or a config's ``data`` section (other keys are ignored); None: unplanned."""
        if not values:
            return cls()
        spacing = values.get("target_spacing")
        return cls(
            slicing_axis=str(values.get("slicing_axis", "auto")),
            target_spacing=None if spacing is None else tuple(spacing),
            crop_to_nonzero=values.get("crop_to_nonzero", False),
        )

    def resampling_entries(self) -> dict[str, Any]:
        """What model.json's ``resampling`` records beyond the interpolation policy (nothing when unplanned,
        so unplanned packages are written exactly as before; a runtime that predates these keys refuses the
        package instead of segmenting at the wrong scale)."""
        entries: dict[str, Any] = {}
        if self.slicing_axis != "auto":
            entries["slice_axis"] = self.slicing_axis
        if self.target_spacing is not None:
            entries["in_plane"] = "target_spacing"
            entries["target_spacing_mm"] = list(self.target_spacing)
        if self.crop_to_nonzero:
            entries["crop"] = "nonzero"
        return entries


@dataclass(frozen=True)
class PlannedInput:
    """The plan of one volume that a planned dataset's loader has already normalised: the geometry and
    the crop box measured on its raw image (None without cropping), which the normalised image no longer
    shows. Training validation, ``mpcl-eval`` and the export gate segment such volumes with it."""

    geometry: PlannedGeometry
    crop_box: Box | None = None

    def __post_init__(self) -> None:
        if self.geometry.crop_to_nonzero and self.crop_box is None:
            raise InputError("a planned crop needs the crop box measured on the raw image")


def planned_geometry_metadata(data_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint metadata entry for a config's ``data`` section, or None when it plans nothing."""
    planned = PlannedGeometry.from_dict(data_config)
    return planned.to_dict() if planned.active else None


def _spacing_pair(values: Any) -> tuple[float, float]:
    low, high = SPACING_RANGE_MM
    if not isinstance(values, list | tuple) or len(values) != 2:
        raise InputError(f"target_spacing must be two spacings in mm, got {values!r}")
    pair = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise InputError(f"target_spacing must be two spacings from {low} to {high} mm, got {values!r}")
        pair.append(float(value))
    return pair[0], pair[1]


# -- cropping ---------------------------------------------------------------------------------------


def nonzero_box(volume: np.ndarray) -> Box:
    """[start, stop) per array axis of the region where ``volume`` is non-zero (all of it if none is)."""
    mask = np.asarray(volume) != 0
    if not mask.any():
        return tuple((0, int(n)) for n in mask.shape)  # type: ignore[return-value]
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def whole_box(shape: Sequence[int]) -> Box:
    return tuple((0, int(n)) for n in shape)  # type: ignore[return-value]


def box_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(start, stop) for start, stop in box)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in box)


def uncrop(cropped: np.ndarray, box: Box, shape: Sequence[int], fill: float = 0) -> np.ndarray:
    """The inverse of ``volume[box_slices(box)]``: ``cropped`` placed in a ``shape`` array of ``fill``."""
    if tuple(cropped.shape[-3:]) != box_shape(box):
        raise InputError(f"a {cropped.shape} array does not fill the crop box {box}")
    full = np.full((*cropped.shape[:-3], *shape), fill, dtype=cropped.dtype)
    full[(..., *box_slices(box))] = cropped
    return full


# -- in-plane resampling ----------------------------------------------------------------------------


def in_plane_spacing(spacing_xyz: Sequence[float], axis: int) -> tuple[float, float]:
    """Spacing (mm) along a slice's rows and columns when slicing across array ``axis``."""
    array_spacing = (float(spacing_xyz[2]), float(spacing_xyz[1]), float(spacing_xyz[0]))
    rows, cols = (array_spacing[a] for a in range(3) if a != axis)
    return rows, cols


def resampled_length(pixels: int, spacing: float, target: float) -> int:
    """Pixels along one axis at the target spacing, keeping the first and last pixel centres."""
    if pixels <= 1:
        return max(1, pixels)
    return max(1, int(round((pixels - 1) * spacing / target)) + 1)


def resampled_shape(
    shape_hw: Sequence[int], spacing_hw: Sequence[float], target_hw: Sequence[float]
) -> tuple[int, int]:
    return (
        resampled_length(int(shape_hw[0]), spacing_hw[0], target_hw[0]),
        resampled_length(int(shape_hw[1]), spacing_hw[1], target_hw[1]),
    )


def resample_images(slices: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """(…, h, w) images to (…, *size): corner-aligned bilinear, or scipy's order-0 zoom (``nearest``)."""
    if nearest:
        return zoom_nearest(slices, size).astype(np.float32, copy=False)
    return resize_2d(slices, size, order=1)


def resample_labels(labels: np.ndarray, size: tuple[int, int], num_classes: int) -> np.ndarray:
    """(n, h, w) label maps to (n, *size): each class's one-hot map interpolated bilinearly, then the
    argmax (ties to the lower class), so thin structures survive better than with nearest neighbour."""
    labels = np.asarray(labels)
    if labels.shape[-2:] == tuple(size):
        return labels.astype(np.uint8, copy=True)
    out = np.empty((labels.shape[0], *size), np.uint8)
    for start in range(0, labels.shape[0], 8):  # a few slices at a time: C one-hot maps each
        chunk = labels[start : start + 8]
        one_hot = (chunk[:, None] == np.arange(num_classes, dtype=chunk.dtype)[None, :, None, None]).astype(
            np.float32
        )
        out[start : start + 8] = resized_argmax(one_hot, size)
    return out


# -- patch-sized windows ----------------------------------------------------------------------------


def window_starts(length: int, patch: int, overlap: float = WINDOW_OVERLAP) -> list[int]:
    """Starts of patch-sized windows covering ``length`` pixels (``length >= patch``): a stride of
    ``(1 - overlap) * patch``, the last window flush with the end."""
    if length <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    starts = list(range(0, length - patch, step))
    return [*starts, length - patch]


def pad_to_patch(
    slices: np.ndarray, patch: Sequence[int], value: float
) -> tuple[np.ndarray, tuple[int, int]]:
    """(…, h, w) padded (centred, with ``value``) to at least the patch along each axis, and the (top,
    left) offset of the original pixels. Nothing is copied when the slices are large enough."""
    h, w = slices.shape[-2:]
    ph, pw = max(h, int(patch[0])), max(w, int(patch[1]))
    if (ph, pw) == (h, w):
        return slices, (0, 0)
    top, left = (ph - h) // 2, (pw - w) // 2
    padded = np.full((*slices.shape[:-2], ph, pw), value, dtype=slices.dtype)
    padded[..., top : top + h, left : left + w] = slices
    return padded, (top, left)


def windows(shape_hw: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int]]:
    """(top, left) of every window of a padded slice (see :func:`pad_to_patch`), row by row."""
    rows = window_starts(int(shape_hw[0]), int(patch[0]))
    cols = window_starts(int(shape_hw[1]), int(patch[1]))
    return [(y, x) for y in rows for x in cols]


def windows_per_slice(shape_hw: Sequence[int], patch: Sequence[int]) -> int:
    """How many patch-sized windows a slice of this size (after padding) is cut into."""
    ph, pw = max(int(shape_hw[0]), int(patch[0])), max(int(shape_hw[1]), int(patch[1]))
    return len(windows((ph, pw), patch))


def average_windows(
    probabilities: np.ndarray, starts: list[tuple[int, int]], shape_hw: tuple[int, int]
) -> np.ndarray:
    """(len(starts) * b, C, ph, pw) window probabilities (window-major) to (b, C, *shape_hw), averaging
    where windows overlap."""
    count = len(starts)
    if count == 1:
        return probabilities
    batch, classes, ph, pw = probabilities.shape[0] // count, *probabilities.shape[1:]
    total = np.zeros((batch, classes, *shape_hw), np.float32)
    hits = np.zeros(shape_hw, np.float32)
    for index, (y, x) in enumerate(starts):
        total[:, :, y : y + ph, x : x + pw] += probabilities[index * batch : (index + 1) * batch]
        hits[y : y + ph, x : x + pw] += 1
    total /= hits
    return total


def slice_windows(padded: np.ndarray, starts: list[tuple[int, int]], patch: Sequence[int]) -> np.ndarray:
    """(b, H, W) padded slices to (len(starts) * b, 1, ph, pw) network inputs, window-major."""
    ph, pw = int(patch[0]), int(patch[1])
    return np.ascontiguousarray(
        np.concatenate([padded[:, None, y : y + ph, x : x + pw] for y, x in starts], axis=0)
    )


def training_windows(
    image: np.ndarray, label: np.ndarray | None, patch: Sequence[int], value: float
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """One resampled slice (and its label) as patch-sized training windows: padded like an inference
    input, cut at the inference windows' positions. Views into one padded copy, not copies."""
    padded, _ = pad_to_patch(image, patch, value)
    padded_label = None if label is None else pad_to_patch(label, patch, 0)[0]
    ph, pw = int(patch[0]), int(patch[1])
    return [
        (
            padded[y : y + ph, x : x + pw],
            None if padded_label is None else padded_label[y : y + ph, x : x + pw],
        )
        for y, x in windows(padded.shape, patch)
    ]
