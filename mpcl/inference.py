"""The one inference core: a (z, y, x) volume and a backend in, labels (and maps) on the volume's grid out.

Deployment (``Segmenter``), training validation, ``mpcl-eval`` and the export's Dice gate all segment
through :func:`segment_volume`, so what is scored is what is deployed: a backend only runs the network
(``mpcl.backends``; a torch network in training becomes one with ``TorchBackend.from_module``) and every
step around it is here, in numpy:

1. normalise the whole volume (when ``InferenceSettings.normalization`` is set; training's volumes arrive
   normalised by the data loader with the same ``normalize_intensity``); with a planned crop
   (``InferenceSettings.planned``, see ``mpcl.planned_geometry``) the non-zero box is found on the raw
   volume first and per-case statistics are measured inside it;
2. take 2D slices of the volume (or of its crop box) along the through-plane (coarsest-spaced) axis, or
   along the planned axis;
3. resize each to the patch: corner-aligned bilinear (``resize="linear"``) or scipy's order-0 zoom
   (``"nearest"``, ``zoom_nearest``: the SSL4MIS/BCP test protocol). With a planned target spacing, the
   slice is resampled (same interpolation) to that spacing instead and padded or cut into overlapping
   patch-sized windows;
4. run the backend on batches of slices (with ``tta``, also on their flips, averaged after softmax);
5. softmax (windows: averaged where they overlap), resize back to the slice's own size, argmax
   (``nearest``: argmax at patch size, labels zoomed back with order 0). When only labels are asked for,
   ``linear`` does the last two steps with ``resized_argmax``, which interpolates just the pixels on class
   boundaries and, without test-time flips, takes the softmax just at their source pixels (same labels,
   far less work); outside a crop box everything is background;
6. post-process the label volume (the package's largest-component / hole-filling clean-ups).

Only a batch of slices is ever held at patch or probability resolution, so memory grows with the volume
(normalised copy + uint8 labels), not with the number of classes, unless full probabilities are asked for.

With ``fused=True`` (the torch backend on a CUDA GPU, see ``Capabilities.fused_kernels``) only the
normalisation's statistics are computed here; applying them and steps 3-5 run per batch as two fused
Triton kernels around the network (``FusedBackend.segment_slices``): raw slices go to the device and only
labels (and the maps asked for) come back. The numpy functions used here are their reference
(``mpcl.kernels.reference``).

This module imports no torch, so the runtime keeps working where torch is absent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

from mpcl.backends import Backend
from mpcl.errors import ConfigError, InputError
from mpcl.kernels.reference import HeadOutputs, NormalizationAffine, average_flips, normalization_affine
from mpcl.model_package import ModelPackage, Postprocessing
from mpcl.planned_geometry import (
    Box,
    PlannedGeometry,
    PlannedInput,
    average_windows,
    box_slices,
    in_plane_spacing,
    nonzero_box,
    pad_to_patch,
    resample_images,
    resampled_shape,
    slice_windows,
    whole_box,
    windows,
)
from mpcl.postprocessing import apply_postprocessing, normalized_entropy, softmax
from mpcl.preprocessing import (
    apply_normalization,
    normalize_intensity,
    resize_2d,
    resized_argmax,
    zoom_nearest,
)

log = logging.getLogger("mpcl.segment")

RESIZE_MODES = ("linear", "nearest")
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))
TIMING_KEYS = ("resize_to_patch", "network", "softmax", "resize_back", "argmax_entropy")
# called before each batch of slices, after the last one, and before post-processing; raising stops the work
Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class InferenceSettings:
    """How to segment a volume; everything but the volume and the backend.

    ``normalization``: ``{"scheme": ..., **params}`` as in model.json, or None when volumes arrive
    normalised. ``postprocessing``: the clean-ups to apply, or None. ``fused``: run the per-batch work as
    the backend's fused kernels (only for a backend whose ``capabilities.fused_kernels`` is True, only
    with ``linear`` resizing, and not with a planned target spacing). ``probabilities`` / ``uncertainty``:
    also return those maps. ``planned``: the dataset plan's slicing axis, target spacing and cropping
    (default: none of them).
    """

    patch_size: tuple[int, int]
    resize: str = "linear"
    batch_size: int = 8
    tta: bool = False
    probabilities: bool = False
    uncertainty: bool = False
    normalization: Mapping[str, Any] | None = None
    postprocessing: Postprocessing | None = None
    fused: bool = False
    planned: PlannedGeometry = field(default_factory=PlannedGeometry)

    def __post_init__(self) -> None:
        patch = tuple(int(n) for n in self.patch_size)
        if len(patch) != 2 or min(patch) < 1:
            raise InputError(f"patch_size must be two positive sizes, got {self.patch_size!r}")
        object.__setattr__(self, "patch_size", patch)
        if self.resize not in RESIZE_MODES:
            raise InputError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if int(self.batch_size) < 1:
            raise InputError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.fused and self.resize != "linear":
            raise ConfigError("the fused kernels resize bilinearly; they cannot run resize='nearest'")
        if not isinstance(self.planned, PlannedGeometry):
            raise InputError(f"planned must be a PlannedGeometry, got {self.planned!r}")
        if self.fused and self.planned.target_spacing is not None:
            raise ConfigError("the fused kernels zoom whole slices; they cannot resample to a target spacing")

    @classmethod
    def for_package(
        cls, package: ModelPackage, *, postprocess: bool = True, **options: Any
    ) -> InferenceSettings:
        """The package's patch size, resize, normalisation, planned geometry and (with ``postprocess``)
        clean-ups; ``options`` set the other fields (``batch_size``, ``tta``, ``probabilities``, ...)."""
        return cls(
            patch_size=package.patch_size,
            resize=package.resize,
            normalization=package.normalization,
            postprocessing=package.postprocessing if postprocess else None,
            planned=package.planned,
            **options,
        )


class PreparedVolume(NamedTuple):
    """What :func:`prepare_volume` hands to :func:`predict_volume`: the volume to slice (normalised, or
    raw on the fused path), the affine the fused kernels apply (None on the numpy path), and the planned
    crop box measured on the raw volume (None without cropping)."""

    data: np.ndarray
    affine: NormalizationAffine | None
    crop_box: Box | None


@dataclass
class Prediction:
    """What :func:`segment_volume` returns, on the input's (z, y, x) grid: uint8 ``labels``, optional
    ``probabilities`` (C, z, y, x) and ``uncertainty`` (normalised entropy), the array axis the slices
    were taken along, and where the seconds went."""

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    slice_axis: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def prepare_volume(
    volume: np.ndarray, settings: InferenceSettings, timings: dict[str, float] | None = None
) -> PreparedVolume:
    """Step 1: the volume to slice, the affine the fused kernels apply, and the planned crop box.

    Without ``settings.normalization`` the volume is used as it is (float32). On the fused path only the
    statistics are computed here; the kernels normalise the raw slices on the device. With a planned crop
    the box is the raw volume's non-zero region and the statistics are measured inside it (the whole
    volume is still normalised with them, so its shape is kept). Call it separately from
    :func:`predict_volume` to drop the raw volume before the slice loop.
    """
    clock = time.perf_counter()
    normalization = settings.normalization
    affine = None
    box = nonzero_box(volume) if settings.planned.crop_to_nonzero else None
    if normalization is None:
        data = np.asarray(volume, dtype=np.float32)
        if settings.fused:  # already normalised: the kernels apply the identity
            affine = normalization_affine(data, "none")
    else:
        scheme = str(normalization["scheme"])
        params = {key: value for key, value in normalization.items() if key != "scheme"}
        measured = volume if box is None else volume[box_slices(box)]
        if settings.fused:
            data = np.asarray(volume, dtype=np.float32)
            affine = normalization_affine(measured, scheme, params)
        elif box is None:
            data = normalize_intensity(volume, scheme, params)
        else:
            data = apply_normalization(volume, normalization_affine(measured, scheme, params))
    if timings is not None:
        timings["normalize"] = timings.get("normalize", 0.0) + time.perf_counter() - clock
    return PreparedVolume(data, affine, box)


def predict_volume(
    data: np.ndarray,
    spacing: tuple[float, float, float],
    backend: Backend,
    settings: InferenceSettings,
    *,
    affine: NormalizationAffine | None = None,
    crop_box: Box | None = None,
    timings: dict[str, float] | None = None,
    progress: Progress | None = None,
) -> Prediction:
    """Steps 2-6 on a volume from :func:`prepare_volume`; ``spacing`` is in (x, y, z) order (mm).

    ``crop_box``: the planned crop box from :func:`prepare_volume` (measured on the raw volume, which
    ``data`` no longer is), required when ``settings.planned`` crops. ``progress(fraction, message)`` is
    called before each batch, after the last one and before post-processing; an exception it raises
    (e.g. :class:`mpcl.errors.Cancelled`) stops the work.
    """
    if settings.fused and affine is None:
        raise InputError("the fused kernels need the normalisation affine from prepare_volume")
    planned = settings.planned
    if planned.crop_to_nonzero and crop_box is None:
        raise InputError("the planned crop needs the crop box prepare_volume measured on the raw volume")
    timings = {} if timings is None else timings
    for key in TIMING_KEYS:
        timings.setdefault(key, 0.0)
    report = progress or (lambda fraction, message: None)
    shape = data.shape
    box = whole_box(shape) if crop_box is None else tuple((int(a), int(b)) for a, b in crop_box)
    if len(box) != 3 or not all(0 <= a <= b <= n for (a, b), n in zip(box, shape, strict=False)):
        raise InputError(f"crop box {crop_box} does not lie inside the volume of shape {shape}")
    cropped = box != whole_box(shape)
    region = box_slices(box)
    axis = planned.axis_for(spacing)
    log.debug("shape %s, spacing %s, slicing array axis %d, crop box %s", shape, spacing, axis, box)
    slices = np.moveaxis(data[region], axis, 0)
    count, out_hw = slices.shape[0], (int(slices.shape[1]), int(slices.shape[2]))
    batch_fn = _batch_function(data[region], spacing, axis, backend, settings, affine, timings)

    # outside a crop box: background, certain (probability 1, entropy 0)
    labels = np.zeros(shape, np.uint8) if cropped else np.empty(shape, np.uint8)
    label_slices = np.moveaxis(labels[region], axis, 0)  # views: writing them fills the (z, y, x) arrays
    probabilities = None  # (C, z, y, x), allocated once the first batch says how many classes there are
    uncertainty = None
    if settings.uncertainty:
        uncertainty = np.zeros(shape, np.float32) if cropped else np.empty(shape, np.float32)
    for start in range(0, count, settings.batch_size):
        report(start / count, f"slices {start}/{count}")
        stop = min(start + settings.batch_size, count)
        head = batch_fn(slices[start:stop], out_hw)
        label_slices[start:stop] = head.labels
        if settings.probabilities:
            if probabilities is None:
                probabilities = np.empty((head.probabilities.shape[1], *shape), np.float32)
                if cropped:
                    probabilities[:] = 0
                    probabilities[0] = 1
            np.moveaxis(probabilities[(slice(None), *region)], axis + 1, 1)[:, start:stop] = (
                head.probabilities.transpose(1, 0, 2, 3)
            )
        if uncertainty is not None:
            np.moveaxis(uncertainty[region], axis, 0)[start:stop] = head.uncertainty
    report(1.0, f"slices {count}/{count}")
    postprocessing = settings.postprocessing
    if postprocessing is not None and postprocessing.enabled:
        report(1.0, "post-processing")
        clock = time.perf_counter()
        labels = apply_postprocessing(labels, postprocessing, axis)
        timings["postprocess"] = time.perf_counter() - clock
    return Prediction(labels, probabilities, uncertainty, axis, timings)


def segment_volume(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    backend: Backend,
    settings: InferenceSettings,
    *,
    planned: PlannedInput | None = None,
    timings: dict[str, float] | None = None,
    progress: Progress | None = None,
) -> Prediction:
    """All six steps: :func:`prepare_volume` then :func:`predict_volume`.

    ``planned``: for a volume a planned dataset's loader has already normalised (training validation,
    ``mpcl-eval``, the export gate), its plan and the crop box measured on its raw image; they replace
    ``settings.planned`` and the box ``prepare_volume`` would measure.
    """
    timings = {} if timings is None else timings
    if planned is not None:
        # the box was measured on the raw image, which this (normalised) volume no longer is
        unplanned = replace(settings, planned=PlannedGeometry())
        data, affine, _ = prepare_volume(volume, unplanned, timings)
        settings, box = replace(settings, planned=planned.geometry), planned.crop_box
    else:
        data, affine, box = prepare_volume(volume, settings, timings)
    return predict_volume(
        data, spacing, backend, settings, affine=affine, crop_box=box, timings=timings, progress=progress
    )


BatchFunction = Callable[[np.ndarray, tuple[int, int]], HeadOutputs]


def _batch_function(
    region: np.ndarray,
    spacing: tuple[float, float, float],
    axis: int,
    backend: Backend,
    settings: InferenceSettings,
    affine: NormalizationAffine | None,
    timings: dict[str, float],
) -> BatchFunction:
    """Steps 3-5 for a batch of (b, h, w) slices of ``region``: fused kernels, whole-slice zoom, or the
    planned target spacing with patch-sized windows."""
    if settings.fused:
        flips = TTA_FLIPS if settings.tta else ((),)

        def fused(batch: np.ndarray, out_hw: tuple[int, int]) -> HeadOutputs:
            return backend.segment_slices(
                batch,
                affine,
                settings.patch_size,
                flips,
                settings.probabilities,
                settings.uncertainty,
                timings,
            )

        return fused
    target = settings.planned.target_spacing
    if target is None:
        return lambda batch, out_hw: _numpy_batch(batch, out_hw, backend, settings, timings)
    slice_spacing = in_plane_spacing(spacing, axis)
    # the padding of small slices: the volume's lowest normalised value (its background), as in training
    pad_value = float(region.min()) if region.size else 0.0
    return lambda batch, out_hw: _planned_batch(
        batch, out_hw, slice_spacing, target, pad_value, backend, settings, timings
    )


def _numpy_batch(
    slices: np.ndarray,
    out_hw: tuple[int, int],
    backend: Backend,
    settings: InferenceSettings,
    timings: dict[str, float],
) -> HeadOutputs:
    """Normalised (b, H, W) slices to labels (and maps) on their own grid, in numpy."""
    if settings.resize == "nearest":
        return _numpy_batch_nearest(slices, out_hw, backend, settings, timings)
    clock = time.perf_counter()
    batch = np.ascontiguousarray(resize_2d(slices, settings.patch_size, order=1)[:, None])
    timings["resize_to_patch"] += time.perf_counter() - clock
    if not (settings.probabilities or settings.uncertainty):  # labels only: resize just the boundaries
        if settings.tta:
            scores, to_probabilities = _probabilities(batch, backend, settings.tta, timings), None
        else:  # and softmax just at their source pixels
            scores, to_probabilities = _logits(batch, backend, timings), softmax
        clock = time.perf_counter()
        labels = resized_argmax(scores, out_hw, to_probabilities)
        timings["resize_back"] += time.perf_counter() - clock
        return HeadOutputs(labels, None, None)
    chunk = _probabilities(batch, backend, settings.tta, timings)
    clock = time.perf_counter()
    chunk = resize_2d(chunk, out_hw, order=1)  # (b, C, H, W) on the slice's own grid
    timings["resize_back"] += time.perf_counter() - clock
    clock = time.perf_counter()
    labels = chunk.argmax(axis=1)
    uncertainty = normalized_entropy(chunk) if settings.uncertainty else None
    timings["argmax_entropy"] += time.perf_counter() - clock
    return HeadOutputs(labels, chunk if settings.probabilities else None, uncertainty)


def _planned_batch(
    slices: np.ndarray,
    out_hw: tuple[int, int],
    slice_spacing: tuple[float, float],
    target: tuple[float, float],
    pad_value: float,
    backend: Backend,
    settings: InferenceSettings,
    timings: dict[str, float],
) -> HeadOutputs:
    """Normalised (b, h, w) slices to labels (and maps) on their own grid through the target spacing:
    resample, pad or cut into patch-sized windows, run, average overlapping windows' probabilities,
    resample back (``mpcl.planned_geometry``)."""
    nearest = settings.resize == "nearest"
    clock = time.perf_counter()
    size = resampled_shape(out_hw, slice_spacing, target)
    padded, (top, left) = pad_to_patch(resample_images(slices, size, nearest), settings.patch_size, pad_value)
    starts = windows(padded.shape[-2:], settings.patch_size)
    inputs = slice_windows(padded, starts, settings.patch_size)
    timings["resize_to_patch"] += time.perf_counter() - clock
    parts = [
        _probabilities(inputs[i : i + settings.batch_size], backend, settings.tta, timings)
        for i in range(0, inputs.shape[0], settings.batch_size)
    ]
    clock = time.perf_counter()
    averaged = average_windows(np.concatenate(parts), starts, padded.shape[-2:])
    chunk = np.ascontiguousarray(averaged[:, :, top : top + size[0], left : left + size[1]])
    if nearest:  # as the whole-slice protocol: argmax at the network's spacing, labels zoomed back
        labels = zoom_nearest(chunk.argmax(axis=1).astype(np.uint8), out_hw)
        uncertainty = zoom_nearest(normalized_entropy(chunk), out_hw) if settings.uncertainty else None
        probabilities = zoom_nearest(chunk, out_hw) if settings.probabilities else None
        timings["resize_back"] += time.perf_counter() - clock
        return HeadOutputs(labels, probabilities, uncertainty)
    if not (settings.probabilities or settings.uncertainty):
        labels = resized_argmax(chunk, out_hw)
        timings["resize_back"] += time.perf_counter() - clock
        return HeadOutputs(labels, None, None)
    chunk = resize_2d(chunk, out_hw, order=1)
    timings["resize_back"] += time.perf_counter() - clock
    clock = time.perf_counter()
    labels = chunk.argmax(axis=1).astype(np.uint8)
    uncertainty = normalized_entropy(chunk) if settings.uncertainty else None
    timings["argmax_entropy"] += time.perf_counter() - clock
    return HeadOutputs(labels, chunk if settings.probabilities else None, uncertainty)


def _numpy_batch_nearest(
    slices: np.ndarray,
    out_hw: tuple[int, int],
    backend: Backend,
    settings: InferenceSettings,
    timings: dict[str, float],
) -> HeadOutputs:
    """The SSL4MIS/BCP test path: order-0 zoom to the patch, argmax there, order-0 zoom of the labels
    (and of any probability/uncertainty maps) back to the slice's grid."""
    clock = time.perf_counter()
    batch = np.ascontiguousarray(zoom_nearest(slices, settings.patch_size)[:, None])
    timings["resize_to_patch"] += time.perf_counter() - clock
    chunk = _probabilities(batch, backend, settings.tta, timings)
    clock = time.perf_counter()
    labels = zoom_nearest(chunk.argmax(axis=1).astype(np.uint8), out_hw)
    uncertainty = zoom_nearest(normalized_entropy(chunk), out_hw) if settings.uncertainty else None
    probabilities = zoom_nearest(chunk, out_hw) if settings.probabilities else None
    timings["resize_back"] += time.perf_counter() - clock
    return HeadOutputs(labels, probabilities, uncertainty)


def _probabilities(batch: np.ndarray, backend: Backend, tta: bool, timings: dict[str, float]) -> np.ndarray:
    """Softmax probabilities (b, C, h, w) at patch size; with TTA, averaged over the flips."""
    flips = TTA_FLIPS if tta else ((),)
    if len(flips) > 1:
        batch = np.ascontiguousarray(np.concatenate([np.flip(batch, f) if f else batch for f in flips]))
    logits = _logits(batch, backend, timings)
    clock = time.perf_counter()
    probabilities = average_flips(softmax(logits), flips)
    timings["softmax"] += time.perf_counter() - clock
    return probabilities


def _logits(batch: np.ndarray, backend: Backend, timings: dict[str, float]) -> np.ndarray:
    """The backend's logits (b, C, h, w) for a (b, 1, h, w) batch at patch size, timed as ``network``."""
    clock = time.perf_counter()
    logits = backend.run(batch)
    timings["network"] += time.perf_counter() - clock
    return logits
