"""Numpy preprocessing shared by training, evaluation and every inference backend.

One implementation on purpose: an exported model can only agree with training if both call the same
normalisation and the same resize. Resizing is corner-aligned (the first and last pixel centres map onto
each other), which is scipy.ndimage.zoom's convention and the SSL4MIS evaluation protocol's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

from mpcl.errors import InputError

# Per-volume schemes: their parameters (percentile bounds) are optional, their statistics come from each
# volume. ``ct`` uses the dataset's foreground statistics instead (``CT_PARAMETERS``, measured by mpcl-plan),
# the same numbers for every scan, so Hounsfield units keep their meaning across scans.
NORMALIZATION_SCHEMES = ("none", "minmax", "zscore", "percentile")
DATASET_SCHEMES = ("ct",)
ALL_SCHEMES = NORMALIZATION_SCHEMES + DATASET_SCHEMES
CT_PARAMETERS = ("clip_lower", "clip_upper", "mean", "std")


class NormalizationAffine(NamedTuple):
    """``(clip(x, lower, upper) - offset) / divisor``: a whole-volume normalisation applied per voxel.

    Every scheme has this form, so statistics (one pass over the volume) and their application (per
    voxel, e.g. fused with the resize in a GPU kernel) can be split without changing the numbers.
    """

    lower: float
    upper: float
    offset: float
    divisor: float


IDENTITY = NormalizationAffine(-np.inf, np.inf, 0.0, 1.0)
ZEROS = NormalizationAffine(0.0, 0.0, 0.0, 1.0)  # clipping to [0, 0] maps everything to 0


def normalization_affine(
    volume: np.ndarray, scheme: str = "minmax", params: Mapping | None = None
) -> NormalizationAffine:
    """The statistics of one whole volume's normalisation (not slice by slice), as training used it.

    Schemes: ``none``; ``minmax`` to [0, 1]; ``zscore`` (mean 0, std 1 over the volume); ``percentile``
    (clip to the ``lower``/``upper`` percentiles, default 0.5/99.5, then min-max), robust for CT/MR outliers;
    ``ct`` (clip to ``clip_lower``/``clip_upper``, then subtract ``mean`` and divide by ``std``: fixed
    dataset statistics, given in ``params``, so nothing is measured on the volume).
    """
    params = dict(params or {})
    data = np.asarray(volume, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        raise InputError("image contains non-finite values (NaN or inf); cannot normalise it")
    if scheme == "none":
        return IDENTITY
    if scheme == "ct":
        return ct_affine(params)
    if scheme == "zscore":
        std = float(data.std())
        return NormalizationAffine(-np.inf, np.inf, float(data.mean()), std if std > 0 else 1.0)
    if scheme == "percentile":
        lower, upper = (
            float(v) for v in np.percentile(data, [params.get("lower", 0.5), params.get("upper", 99.5)])
        )
        low, high = lower, upper  # after clipping, the volume's min and max are the bounds themselves
    elif scheme == "minmax":
        lower, upper = -np.inf, np.inf
        low, high = float(data.min()), float(data.max())
    else:
        raise InputError(f"unknown normalisation scheme {scheme!r}; expected one of {ALL_SCHEMES}")
    if high <= low:
        return ZEROS
    return NormalizationAffine(lower, upper, low, high - low)


def ct_statistics_problem(lower: float, upper: float, mean: float, std: float) -> str | None:
    """What makes four ``ct`` statistics unusable, as the end of a sentence, or None: the one rule that
    the config, ``model.json`` and :func:`ct_affine` each check, with their own error types."""
    if not all(np.isfinite([lower, upper, mean, std])) or lower >= upper or std <= 0:
        return f"needs finite clip_lower < clip_upper and std > 0, got clip [{lower}, {upper}], std {std}"
    return None


def ct_affine(params: Mapping) -> NormalizationAffine:
    """The ``ct`` scheme's affine from its four dataset statistics (``CT_PARAMETERS``)."""
    missing = [key for key in CT_PARAMETERS if key not in params]
    if missing:
        raise InputError(f"the ct normalisation needs {list(CT_PARAMETERS)}; missing {missing}")
    lower, upper, mean, std = (float(params[key]) for key in CT_PARAMETERS)
    problem = ct_statistics_problem(lower, upper, mean, std)
    if problem:
        raise InputError(f"the ct normalisation {problem}")
    return NormalizationAffine(lower, upper, mean, std)


def apply_normalization(data: np.ndarray, affine: NormalizationAffine) -> np.ndarray:
    """Apply an affine from :func:`normalization_affine` in float32, with one volume-sized copy at most."""
    lower, upper, offset, divisor = (np.float32(v) for v in affine)
    values = np.array(data, dtype=np.float32, copy=True)
    if np.isfinite(lower) or np.isfinite(upper):
        np.clip(values, lower, upper, out=values)
    values -= offset
    values /= divisor
    return values


def normalize_intensity(
    volume: np.ndarray, scheme: str = "minmax", params: Mapping | None = None
) -> np.ndarray:
    """Normalise one whole volume as training did: :func:`normalization_affine` then apply it."""
    return apply_normalization(volume, normalization_affine(volume, scheme, params))


def _axis_coordinates(n_in: int, n_out: int) -> np.ndarray:
    """Source coordinates of each output sample along one axis (corner-aligned)."""
    if n_out == 1 or n_in == 1:
        return np.zeros(n_out, dtype=np.float64)
    return np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1))


def _axis_neighbours(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output sample along one axis: the two source indices and the float32 weight of the second."""
    coords = _axis_coordinates(n_in, n_out)
    low = np.floor(coords).astype(np.int64)
    return low, np.minimum(low + 1, n_in - 1), (coords - low).astype(np.float32)


def _resize_axis_linear(data: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    low, high, frac = _axis_neighbours(data.shape[axis], n_out)
    shape = [1] * data.ndim
    shape[axis] = n_out
    frac = frac.reshape(shape)
    result = np.take(data, low, axis=axis)  # a * (1 - f) + b * f, in place: fewer fresh arrays
    result *= 1 - frac
    upper = np.take(data, high, axis=axis)
    upper *= frac
    result += upper
    return result


def _resize_axis_nearest(data: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    coords = _axis_coordinates(data.shape[axis], n_out)
    return np.take(data, np.floor(coords + 0.5).astype(np.int64), axis=axis)


def resize_2d(data: np.ndarray, out_hw: tuple[int, int], order: int = 1) -> np.ndarray:
    """Resize the last two axes of ``data`` to ``out_hw``; leading axes (batch, channel) are kept.

    ``order=1`` is bilinear (images, probabilities), ``order=0`` nearest (label maps).
    """
    if data.ndim < 2:
        raise InputError(f"resize_2d needs at least 2 dimensions, got shape {data.shape}")
    if order not in (0, 1):
        raise InputError(f"resize order must be 0 (nearest) or 1 (linear), got {order}")
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    if data.shape[-2:] == (out_h, out_w):
        return data.copy()
    resize_axis = _resize_axis_linear if order == 1 else _resize_axis_nearest
    work = np.asarray(data, dtype=np.float32) if order == 1 else data  # read only: no copy needed
    work = resize_axis(work, data.ndim - 2, out_h)
    return resize_axis(work, data.ndim - 1, out_w)


def _zoom_axis_nearest(data: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """``_resize_axis_nearest``, then 0 where a coordinate lands past the last source sample by rounding
    error: scipy's ``zoom`` (mode "constant") samples outside the input there."""
    result = _resize_axis_nearest(data, axis, n_out)
    beyond = _axis_coordinates(data.shape[axis], n_out) > data.shape[axis] - 1
    if beyond.any():
        index = [slice(None)] * data.ndim
        index[axis] = beyond
        result[tuple(index)] = 0
    return result


def zoom_nearest(data: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Resize the last two axes as ``scipy.ndimage.zoom(x, out / in, order=0)`` does, bit for bit: the
    SSL4MIS/BCP test scripts' resize of slices to the patch and of predicted labels back. Unlike
    ``resize_2d(order=0)``, a border sample whose coordinate lands past the last source pixel by
    floating-point rounding is 0, as in scipy (mode "constant")."""
    if data.ndim < 2:
        raise InputError(f"zoom_nearest needs at least 2 dimensions, got shape {data.shape}")
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    work = data
    if work.shape[-2] != out_h:
        work = _zoom_axis_nearest(work, data.ndim - 2, out_h)
    if work.shape[-1] != out_w:
        work = _zoom_axis_nearest(work, data.ndim - 1, out_w)
    return work.copy() if work is data else work


def _first_argmax(scores: list[np.ndarray]) -> np.ndarray:
    """``np.stack(scores).argmax(axis=0)`` as uint8 (ties to the lowest index; at most 256 classes), with
    one contiguous pass per class.

    numpy's argmax over a short strided class axis walks memory with a stride per pixel, while these
    whole-array comparisons make one contiguous pass per class, and label maps have only a handful of
    classes. The running maximum and the winner are updated in place: fresh arrays per class cost page
    faults that matter at these sizes.
    """
    best, winner = np.array(scores[0], dtype=np.float32), np.zeros(scores[0].shape, dtype=np.uint8)
    better = np.empty(scores[0].shape, dtype=bool)
    for index, score in enumerate(scores[1:], start=1):
        np.greater(score, best, out=better)
        np.copyto(best, score, where=better)
        np.copyto(winner, index, where=better)
    return winner


def resized_argmax(
    scores: np.ndarray,
    out_hw: tuple[int, int],
    to_probabilities: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """``resize_2d(p, out_hw, order=1).argmax(axis=1)`` as uint8, without resizing every channel.

    ``scores``: (b, C, h, w), the probabilities ``p`` themselves or, with ``to_probabilities`` (e.g.
    ``softmax`` over axis 1 of an (n, C) array), logits. An output pixel is a convex combination of its
    four source pixels; where all four have the same argmax class, that class also wins the combination
    (each term of the sum is at least the other classes', and float32 rounding is monotone), so only
    pixels whose sources disagree, the class boundaries, are interpolated, with the reference's
    operations in its order. A per-pixel map that keeps the argmax (softmax) is therefore needed only
    at those boundaries' source pixels, which is where ``to_probabilities`` is applied.
    Results equal the full resize's argmax except where two classes tie to within float32 rounding.
    """
    if scores.ndim != 4:
        raise InputError(f"resized_argmax needs (batch, classes, h, w) scores, got {scores.shape}")
    data = np.asarray(scores, dtype=np.float32)
    (batch, classes, h, w), (out_h, out_w) = data.shape, (int(out_hw[0]), int(out_hw[1]))
    if classes > 256:
        raise InputError(f"resized_argmax returns uint8 labels, so at most 256 classes, got {classes}")
    y0, y1, fy = _axis_neighbours(h, out_h)
    x0, x1, fx = _axis_neighbours(w, out_w)
    coarse = _first_argmax(list(data.transpose(1, 0, 2, 3)))  # (b, h, w) uint8
    # mixed[i, j]: the source cell with corners (i, j) and (i + 1, j + 1), edge-clamped, has two classes
    # (at the last row or column the clamped corners repeat the cell's own, so fewer pairs are compared)
    mixed = np.zeros(coarse.shape, dtype=bool)
    mixed[:, :-1, :] |= coarse[:, :-1, :] != coarse[:, 1:, :]
    mixed[:, :, :-1] |= coarse[:, :, :-1] != coarse[:, :, 1:]
    mixed[:, :-1, :-1] |= coarse[:, :-1, :-1] != coarse[:, 1:, 1:]
    cell = (y0[:, None] * w + x0[None, :]).ravel()  # each output pixel's source cell, flat
    labels = np.take(coarse.reshape(batch, h * w), cell, axis=1).reshape(batch, out_h, out_w)
    flat = np.flatnonzero(np.take(mixed.reshape(batch, h * w), cell, axis=1))  # cheaper than a 3D nonzero
    b, within = np.divmod(flat, out_h * out_w)
    y, x = np.divmod(within, out_w)
    if b.size:
        pixels = data.reshape(batch, classes, h * w)
        if to_probabilities is not None:  # only at the corners of mixed cells (edge-clamped like them)
            corners = mixed.copy()
            corners[:, 1:, :] |= mixed[:, :-1, :]
            corners[:, :, 1:] |= mixed[:, :, :-1]
            corners[:, 1:, 1:] |= mixed[:, :-1, :-1]
            cb, cpixel = np.divmod(np.flatnonzero(corners), h * w)
            converted = np.empty_like(pixels)  # left undefined away from the corners: never read
            converted[cb, :, cpixel] = to_probabilities(pixels[cb, :, cpixel])
            pixels = converted
        top, bottom = y0[y] * w, y1[y] * w

        def source(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:  # (n, C) at each boundary pixel
            return pixels[b, :, rows + columns]

        wy, wx = fy[y][:, None], fx[x][:, None]
        left = source(top, x0[x]) * (1 - wy) + source(bottom, x0[x]) * wy  # along y first, as resize_2d
        right = source(top, x1[x]) * (1 - wy) + source(bottom, x1[x]) * wy
        labels[b, y, x] = _first_argmax(list((left * (1 - wx) + right * wx).T))
    return labels


def through_plane_axis(spacing_xyz: tuple[float, float, float]) -> int:
    """Array axis (in (z, y, x) order) along which 2D slices are taken: the coarsest-spaced one.

    Short-axis cine MRI and most clinical scans are acquired as thick slices; the coarsest axis is the
    acquisition's through-plane axis whatever the direction matrix says. Ties go to the array's first
    axis (SimpleITK's z), which is how isotropic data such as ACDC's h5 volumes are sliced.
    """
    array_spacing = (spacing_xyz[2], spacing_xyz[1], spacing_xyz[0])
    return int(np.argmax(np.asarray(array_spacing) > max(array_spacing) - 1e-6 * max(array_spacing)))
