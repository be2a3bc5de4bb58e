"""The one inference core: a (z, y, x) volume and a backend in, labels (and maps) on the volume's grid out.

Deployment (``Segmenter``), training validation, ``mpcl-eval`` and the export's Dice gate all segment
through :func:`segment_volume`, so what is scored is what is deployed: a backend only runs the network
(``mpcl.backends``; a torch network in training becomes one with ``TorchBackend.from_module``) and every
step around it is here, in numpy:

1. normalise the whole volume (when ``InferenceSettings.normalization`` is set; training's volumes arrive
   normalised by the data loader with the same ``normalize_intensity``);
2. take 2D slices along the through-plane (coarsest-spaced) axis;
3. resize each to the patch: corner-aligned bilinear (``resize="linear"``) or scipy's order-0 zoom
   (``"nearest"``, ``zoom_nearest``: the SSL4MIS/BCP test protocol);
4. run the backend on batches of slices (with ``tta``, also on their flips, averaged after softmax);
5. softmax, resize back to the slice's own size, argmax (``nearest``: argmax at patch size, labels zoomed
   back with order 0). When only labels are asked for, ``linear`` does the last two steps with
   ``resized_argmax``, which interpolates just the pixels on class boundaries and, without test-time
   flips, takes the softmax just at their source pixels (same labels, far less work);
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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpcl.backends import Backend
from mpcl.errors import ConfigError, InputError
from mpcl.kernels.reference import HeadOutputs, NormalizationAffine, average_flips, normalization_affine
from mpcl.model_package import ModelPackage, Postprocessing
from mpcl.postprocessing import apply_postprocessing, normalized_entropy, softmax
from mpcl.preprocessing import (
    normalize_intensity,
    resize_2d,
    resized_argmax,
    through_plane_axis,
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
    the backend's fused kernels (only for a backend whose ``capabilities.fused_kernels`` is True, and only
    with ``linear`` resizing). ``probabilities`` / ``uncertainty``: also return those maps.
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

    @classmethod
    def for_package(
        cls, package: ModelPackage, *, postprocess: bool = True, **options: Any
    ) -> InferenceSettings:
        """The package's patch size, resize, normalisation and (with ``postprocess``) clean-ups;
        ``options`` set the other fields (``batch_size``, ``tta``, ``probabilities``, ...)."""
        return cls(
            patch_size=package.patch_size,
            resize=package.resize,
            normalization=package.normalization,
            postprocessing=package.postprocessing if postprocess else None,
            **options,
        )


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
) -> tuple[np.ndarray, NormalizationAffine | None]:
    """Step 1: the volume to slice, and the affine the fused kernels apply (None on the numpy path).

    Without ``settings.normalization`` the volume is used as it is (float32). On the fused path only the
    statistics are computed here; the kernels normalise the raw slices on the device. Call it separately
    from :func:`predict_volume` to drop the raw volume before the slice loop.
    """
    clock = time.perf_counter()
    normalization = settings.normalization
    affine = None
    if normalization is None:
        data = np.asarray(volume, dtype=np.float32)
        if settings.fused:  # already normalised: the kernels apply the identity
            affine = normalization_affine(data, "none")
    else:
        scheme = str(normalization["scheme"])
        params = {key: value for key, value in normalization.items() if key != "scheme"}
        if settings.fused:
            data = np.asarray(volume, dtype=np.float32)
            affine = normalization_affine(data, scheme, params)
        else:
            data = normalize_intensity(volume, scheme, params)
    if timings is not None:
        timings["normalize"] = timings.get("normalize", 0.0) + time.perf_counter() - clock
    return data, affine


def predict_volume(
    data: np.ndarray,
    spacing: tuple[float, float, float],
    backend: Backend,
    settings: InferenceSettings,
    *,
    affine: NormalizationAffine | None = None,
    timings: dict[str, float] | None = None,
    progress: Progress | None = None,
) -> Prediction:
    """Steps 2-6 on a volume from :func:`prepare_volume`; ``spacing`` is in (x, y, z) order (mm).

    ``progress(fraction, message)`` is called before each batch, after the last one and before
    post-processing; an exception it raises (e.g. :class:`mpcl.errors.Cancelled`) stops the work.
    """
    if settings.fused and affine is None:
        raise InputError("the fused kernels need the normalisation affine from prepare_volume")
    timings = {} if timings is None else timings
    for key in TIMING_KEYS:
        timings.setdefault(key, 0.0)
    report = progress or (lambda fraction, message: None)
    shape = data.shape
    axis = through_plane_axis(spacing)
    log.debug("shape %s, spacing %s, slicing array axis %d", shape, spacing, axis)
    slices = np.moveaxis(data, axis, 0)
    count, out_hw = slices.shape[0], (int(slices.shape[1]), int(slices.shape[2]))

    labels = np.empty(shape, np.uint8)
    label_slices = np.moveaxis(labels, axis, 0)  # views: writing them fills the (z, y, x) arrays
    probabilities = None  # (C, z, y, x), allocated once the first batch says how many classes there are
    uncertainty = np.empty(shape, np.float32) if settings.uncertainty else None
    flips = TTA_FLIPS if settings.tta else ((),)
    for start in range(0, count, settings.batch_size):
        report(start / count, f"slices {start}/{count}")
        stop = min(start + settings.batch_size, count)
        if settings.fused:
            head = backend.segment_slices(
                slices[start:stop],
                affine,
                settings.patch_size,
                flips,
                settings.probabilities,
                settings.uncertainty,
                timings,
            )
        else:
            head = _numpy_batch(slices[start:stop], out_hw, backend, settings, timings)
        label_slices[start:stop] = head.labels
        if settings.probabilities:
            if probabilities is None:
                probabilities = np.empty((head.probabilities.shape[1], *shape), np.float32)
            np.moveaxis(probabilities, axis + 1, 1)[:, start:stop] = head.probabilities.transpose(1, 0, 2, 3)
        if uncertainty is not None:
            np.moveaxis(uncertainty, axis, 0)[start:stop] = head.uncertainty
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
    timings: dict[str, float] | None = None,
    progress: Progress | None = None,
) -> Prediction:
    """All six steps: :func:`prepare_volume` then :func:`predict_volume`."""
    timings = {} if timings is None else timings
    data, affine = prepare_volume(volume, settings, timings)
    return predict_volume(data, spacing, backend, settings, affine=affine, timings=timings, progress=progress)


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
