"""Segmenter: build once, predict many; geometry-exact segmentation of new scans.

    from mpcl import Segmenter
    seg = Segmenter.from_pretrained("runs/acdc/model")      # backend chosen automatically
    result = seg("scan.nii.gz")                              # or a DICOM folder, .nrrd, .mha, a SimpleITK
    result.save("scan_seg.nii.gz")                           # image, a nibabel image, or (array, spacing)
    seg.segment_many(paths, "out/")

The pipeline is the training evaluation's (``mpcl.training.evaluate.predict_probabilities``) in numpy:
normalise the whole volume as in training, take 2D slices along the through-plane (coarsest-spaced) axis,
resize each to the patch (corner-aligned bilinear), run the backend on batches of slices, softmax, resize
the probabilities back to the slice's own size, argmax. When only labels are asked for, the last two
steps are ``resized_argmax``, which interpolates just the pixels on class boundaries and, without
test-time flips, takes the softmax just at their source pixels (same labels; its time is reported as
``resize_back``). Only a batch of slices is ever held at patch or
probability resolution, so memory grows with the volume (input + normalised copy + uint8 labels), not
with the number of classes, unless full probabilities are asked for.

With the torch backend on a CUDA GPU and triton installed (``fused_kernels``), the same per-batch work
runs as two fused Triton kernels (``mpcl.kernels``): raw slices go to the GPU, are normalised and resized
there, and only labels (and the maps asked for) come back; the numpy functions above are their reference.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import SimpleITK as sitk

from mpcl.backends import Backend, select_backend
from mpcl.errors import Cancelled, ConfigError, InputError
from mpcl.inputs import case_name, load_input
from mpcl.io import ImageGeometry, atomic_outputs, write_image, write_segmentation_nrrd, write_vector_image
from mpcl.kernels import FUSED_KERNEL_MODES
from mpcl.kernels.reference import HeadOutputs, NormalizationAffine, average_flips, normalization_affine
from mpcl.model_package import ClassLabel, ModelPackage, load_model_package
from mpcl.postprocessing import apply_postprocessing, normalized_entropy, softmax
from mpcl.preprocessing import (
    normalize_intensity,
    resize_2d,
    resized_argmax,
    through_plane_axis,
    zoom_nearest,
)

log = logging.getLogger("mpcl.segment")

ProgressCallback = Callable[[float, str], None]
OUTPUT_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


class CancelEvent(Protocol):
    """Anything with ``is_set()``, e.g. ``threading.Event``."""

    def is_set(self) -> bool: ...


def output_suffix(path: str | os.PathLike) -> str:
    """The image suffix of an output path, or an InputError naming the supported ones."""
    lower = str(path).lower()
    for suffix in OUTPUT_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    raise InputError(f"{path}: unsupported output format; use one of {', '.join(OUTPUT_SUFFIXES)}")


def output_paths(
    segmentation: str | os.PathLike, probabilities: bool = False, uncertainty: bool = False
) -> dict[str, Path]:
    """The files written for one case: the label map, plus ``<name>_probabilities`` / ``_uncertainty``.

    The extra maps use the label map's format (plain ``.nrrd`` when the labels are a ``.seg.nrrd``).
    """
    segmentation = Path(segmentation)
    suffix = output_suffix(segmentation)
    stem = segmentation.name[: -len(suffix)]
    extra_suffix = ".nrrd" if suffix == ".seg.nrrd" else suffix
    paths = {"segmentation": segmentation}
    if probabilities:
        paths["probabilities"] = segmentation.with_name(f"{stem}_probabilities{extra_suffix}")
    if uncertainty:
        paths["uncertainty"] = segmentation.with_name(f"{stem}_uncertainty{extra_suffix}")
    return paths


def refuse_input_as_output(source: Any, paths: Iterable[Path]) -> None:
    """An output may never replace the scan it is computed from, whatever ``overwrite`` says."""
    if not isinstance(source, str | os.PathLike):
        return
    source_path = Path(source).resolve()
    for path in paths:
        if Path(path).resolve() == source_path or (
            path.exists() and source_path.exists() and os.path.samefile(path, source_path)
        ):
            raise InputError(f"{path}: is the input scan itself; choose another output name")


def refuse_existing(paths: Iterable[Path], overwrite: bool) -> None:
    if overwrite:
        return
    for path in paths:
        if path.exists():
            raise InputError(
                f"{path}: output already exists; pass overwrite=True (CLI: --overwrite) to replace it"
            )


@dataclass
class SegmentationResult:
    """A label map on the input's exact grid, with optional probabilities and uncertainty.

    ``label_map`` is (z, y, x) uint8 (SimpleITK axis order), ``probabilities`` (C, z, y, x) float32,
    ``uncertainty`` (z, y, x) float32 normalised entropy (0 certain, 1 uniform). ``labels`` maps each
    class name to its ClassLabel (name, value, colour). ``timings`` says where the seconds went.
    """

    label_map: np.ndarray
    geometry: ImageGeometry
    labels: dict[str, ClassLabel]
    probabilities: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    name: str = ""
    backend: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def to_sitk(self) -> sitk.Image:
        """The label map as a SimpleITK image with the input's spacing, origin and direction."""
        return self.geometry.apply_to(sitk.GetImageFromArray(self.label_map))

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the label map (.nii.gz, .nii, .nrrd, .mha, or .seg.nrrd with named segments), atomically."""
        return self.save_all(path, overwrite=overwrite)["segmentation"]

    def save_all(
        self,
        segmentation: str | os.PathLike,
        *,
        probabilities: str | os.PathLike | bool | None = None,
        uncertainty: str | os.PathLike | bool | None = None,
        overwrite: bool = False,
    ) -> dict[str, Path]:
        """Write the label map and (``True`` = default name, or a path) probabilities / uncertainty.

        All files are written to temporary names and renamed together, so a failure leaves none of them.
        """
        paths = output_paths(segmentation, probabilities is True, uncertainty is True)
        for key, value in (("probabilities", probabilities), ("uncertainty", uncertainty)):
            if value not in (None, False, True):
                output_suffix(value)
                paths[key] = Path(value)
        if "probabilities" in paths and self.probabilities is None:
            raise InputError("probabilities were not computed; call the Segmenter with probabilities=True")
        if "uncertainty" in paths and self.uncertainty is None:
            raise InputError("uncertainty was not computed; call the Segmenter with uncertainty=True")
        for path in paths.values():
            if path.is_dir():
                raise InputError(f"{path}: is a folder; give an output file name")
        refuse_existing(paths.values(), overwrite)
        keys = list(paths)
        with atomic_outputs([paths[key] for key in keys]) as temporaries:
            for key, temporary in zip(keys, temporaries, strict=True):
                self._write(key, temporary)
        return paths

    def _write(self, key: str, path: Path) -> None:
        if key == "probabilities":
            write_vector_image(self.probabilities, self.geometry, path, atomic=False)
        elif key == "uncertainty":
            write_image(self.uncertainty, self.geometry, path, atomic=False)
        elif str(path).lower().endswith(".seg.nrrd"):
            segments = [
                (label.name, label.value, label.color) for label in self.labels.values() if label.value
            ]
            write_segmentation_nrrd(self.label_map, self.geometry, segments, path, atomic=False)
        else:
            write_image(self.label_map, self.geometry, path, atomic=False)


class _Progress:
    """Fans progress out to an optional tqdm bar and an optional ``progress_callback(fraction, message)``."""

    def __init__(
        self, callback: ProgressCallback | None, bar: Any = None, start: float = 0.0, span: float = 1.0
    ):
        self.callback, self.bar, self.start, self.span = callback, bar, start, span

    def __call__(self, fraction: float, message: str) -> None:
        if self.callback is not None:
            self.callback(min(1.0, self.start + self.span * fraction), message)
        if self.bar is not None:
            self.bar.n = round(self.start + self.span * fraction, 4)
            self.bar.set_postfix_str(message, refresh=False)
            self.bar.refresh()


def _progress_bar(enabled: bool, description: str):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional for the runtime; progress then goes to the callback only
        return None
    return tqdm(total=1.0, desc=description, unit="", bar_format="{l_bar}{bar}| {elapsed} {postfix}")


def _check_cancel(cancel_event: CancelEvent | None, name: str) -> None:
    if cancel_event is not None and cancel_event.is_set():
        raise Cancelled(f"{name}: segmentation cancelled; nothing was written")


class Segmenter:
    """A model package loaded on a backend, ready to segment any number of scans.

    Construction reads and validates the package and loads the network once; calls never re-read it.
    ``backend`` is ``auto`` (fastest available, logged), ``onnxruntime``, ``openvino`` (CPU, optional
    extra), ``torch`` or ``tensorrt``;
    ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. ``tta`` averages the probabilities over
    horizontal/vertical flips (4 network passes); ``postprocess`` applies the package's clean-ups.
    ``fused_kernels`` (``auto``, ``on``, ``off``): run preprocessing and the output head as fused Triton
    kernels; ``auto`` does where it can (torch backend, CUDA, triton installed), ``on`` refuses to run
    otherwise. The log says which path runs. ``precision`` (ONNX Runtime and OpenVINO: ``auto``, ``fp32``,
    ``fp16``, ``int8``; OpenVINO also ``bf16``): ``auto`` runs the package's int8 model on CPU and fp16 on
    CUDA when it has them (both were checked against the fp32 model's Dice by ``mpcl-export``), and on
    OpenVINO first bf16 where ``mpcl-export --bf16`` checked it and the CPU has native bf16; the others
    ask for one variant.
    """

    def __init__(
        self,
        package: ModelPackage | str | os.PathLike,
        backend: str = "auto",
        device: str = "auto",
        *,
        batch_size: int = 8,
        tta: bool = False,
        postprocess: bool = True,
        threads: int | None = None,
        fused_kernels: str = "auto",
        precision: str = "auto",
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        if fused_kernels not in FUSED_KERNEL_MODES:
            raise InputError(f"fused_kernels must be one of {FUSED_KERNEL_MODES}, got {fused_kernels!r}")
        self.package = package if isinstance(package, ModelPackage) else load_model_package(package)
        self.backend: Backend = select_backend(
            self.package, backend, device, threads=threads, fused_kernels=fused_kernels, precision=precision
        )
        self.fused = bool(getattr(self.backend, "fused_kernels", False))
        reason = getattr(self.backend, "fused_reason", None) or f"the {self.backend.name} backend has none"
        if self.fused and self.package.resize != "linear":
            self.fused, reason = False, "the package resizes with nearest-neighbour zoom, which they lack"
        if fused_kernels == "on" and not self.fused:
            raise ConfigError(f"fused_kernels='on' needs the torch backend on a CUDA GPU: {reason}")
        log.info(
            "pre/post-processing: %s",
            "fused Triton kernels on " + self.backend.device if self.fused else f"numpy ({reason})",
        )
        self.batch_size = int(batch_size)
        self.tta = tta
        self.postprocess = postprocess

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, backend: str = "auto", device: str = "auto", **options):
        """Load a model package folder (or its model.json); see the class docstring for the options."""
        return cls(load_model_package(path), backend, device, **options)

    @property
    def labels(self) -> dict[str, ClassLabel]:
        return self.package.labels

    # -- one volume ----------------------------------------------------------------------------
    def __call__(
        self,
        image: Any,
        spacing: Sequence[float] | None = None,
        *,
        dicom_series: str | None = None,
        tta: bool | None = None,
        probabilities: bool = False,
        uncertainty: bool = False,
        progress: bool = False,
        progress_callback: ProgressCallback | None = None,
        cancel_event: CancelEvent | None = None,
    ) -> SegmentationResult:
        """Segment one scan: a path (NIfTI/NRRD/MHA/... file or DICOM series folder), a SimpleITK
        image, a nibabel image, or ``(array, spacing)``.

        Numpy arrays are in SimpleITK axis order (z, y, x) and ``spacing`` in (x, y, z) order (mm), e.g.
        ``seg((sitk.GetArrayFromImage(img), img.GetSpacing()))``. The result has the input's exact size,
        spacing, origin and direction. ``progress`` shows a tqdm bar; ``progress_callback(fraction,
        message)`` is called as work advances; setting ``cancel_event`` stops the run with
        :class:`mpcl.errors.Cancelled`.
        """
        bar = _progress_bar(progress, "segment")
        try:
            report = _Progress(progress_callback, bar)
            return self._segment(
                image, spacing, dicom_series, tta, probabilities, uncertainty, report, cancel_event
            )
        finally:
            if bar is not None:
                bar.close()

    predict = __call__

    def _segment(
        self, image, spacing, dicom_series, tta, want_probabilities, want_uncertainty, report, cancel_event
    ) -> SegmentationResult:
        name = case_name(image) if isinstance(image, str | os.PathLike) else "input"
        _check_cancel(cancel_event, name)
        report(0.0, f"{name}: reading")
        started = time.perf_counter()
        loaded = load_input(image, spacing, dicom_series)
        timings = {"read": time.perf_counter() - started}
        report(0.05, f"{loaded.name}: normalising")
        started = time.perf_counter()
        package = self.package
        affine = None
        if self.fused:  # statistics only: the kernels normalise the raw slices on the device
            normalized = np.asarray(loaded.array, dtype=np.float32)
            scheme, params = package.normalization_scheme, package.normalization_params
            affine = normalization_affine(normalized, scheme, params)
        else:
            normalized = normalize_intensity(
                loaded.array, package.normalization_scheme, package.normalization_params
            )
        timings["normalize"] = time.perf_counter() - started
        geometry, name = loaded.geometry, loaded.name
        del loaded  # the raw volume is no longer needed: only the normalised copy stays in memory
        result = self._predict_normalized(
            normalized,
            geometry,
            name,
            self.tta if tta is None else tta,
            want_probabilities,
            want_uncertainty,
            report,
            cancel_event,
            timings,
            affine,
        )
        report(1.0, f"{result.name}: done")
        return result

    def _predict_normalized(
        self,
        normalized: np.ndarray,
        geometry: ImageGeometry,
        name: str,
        tta: bool,
        want_probabilities: bool,
        want_uncertainty: bool,
        report: _Progress,
        cancel_event: CancelEvent | None,
        timings: dict[str, float],
        affine: NormalizationAffine | None = None,
    ) -> SegmentationResult:
        """Slice-wise inference on a normalised (z, y, x) volume; see the module docstring.

        With ``affine`` the volume holds raw float32 intensities and the fused kernels normalise them
        (their time goes to ``resize_to_patch`` and ``argmax_entropy``; ``softmax``/``resize_back`` stay 0).
        """
        package, shape = self.package, normalized.shape
        axis = through_plane_axis(geometry.spacing)
        log.debug("%s: shape %s, spacing %s, slicing array axis %d", name, shape, geometry.spacing, axis)
        slices = np.moveaxis(normalized, axis, 0)
        count, out_hw = slices.shape[0], slices.shape[1:]

        labels = np.empty(shape, np.uint8)
        label_slices = np.moveaxis(labels, axis, 0)  # views: writing them fills the (z, y, x) arrays
        probabilities = np.empty((package.num_classes, *shape), np.float32) if want_probabilities else None
        uncertainty = np.empty(shape, np.float32) if want_uncertainty else None
        for key in ("resize_to_patch", "network", "softmax", "resize_back", "argmax_entropy"):
            timings[key] = 0.0
        for start in range(0, count, self.batch_size):
            _check_cancel(cancel_event, name)
            stop = min(start + self.batch_size, count)
            if affine is None:
                head = self._numpy_batch(
                    slices[start:stop], out_hw, tta, want_probabilities, want_uncertainty, timings
                )
            else:
                head = self.backend.segment_slices(
                    slices[start:stop],
                    affine,
                    package.patch_size,
                    TTA_FLIPS if tta else ((),),
                    want_probabilities,
                    want_uncertainty,
                    timings,
                )
            label_slices[start:stop] = head.labels
            if probabilities is not None:
                chunk = head.probabilities.transpose(1, 0, 2, 3)
                np.moveaxis(probabilities, axis + 1, 1)[:, start:stop] = chunk
            if uncertainty is not None:
                np.moveaxis(uncertainty, axis, 0)[start:stop] = head.uncertainty
            report(0.1 + 0.85 * stop / count, f"{name}: slices {stop}/{count}")
        _check_cancel(cancel_event, name)
        if self.postprocess and package.postprocessing.enabled:
            clock = time.perf_counter()
            report(0.96, f"{name}: post-processing")
            labels = apply_postprocessing(labels, package.postprocessing, axis)
            timings["postprocess"] = time.perf_counter() - clock
        return SegmentationResult(
            labels, geometry, package.labels, probabilities, uncertainty, name, self.backend.name, timings
        )

    def _numpy_batch(
        self,
        slices: np.ndarray,
        out_hw: tuple[int, int],
        tta: bool,
        want_probabilities: bool,
        want_uncertainty: bool,
        timings: dict[str, float],
    ) -> HeadOutputs:
        """Normalised (b, H, W) slices to labels (and maps) on their own grid, in numpy."""
        if self.package.resize == "nearest":
            return self._numpy_batch_nearest(
                slices, out_hw, tta, want_probabilities, want_uncertainty, timings
            )
        clock = time.perf_counter()
        batch = np.ascontiguousarray(resize_2d(slices, self.package.patch_size, order=1)[:, None])
        timings["resize_to_patch"] += time.perf_counter() - clock
        if not (want_probabilities or want_uncertainty):  # labels only: resize just the class boundaries
            if tta:
                scores, to_probabilities = self._probabilities(batch, tta, timings), None
            else:  # and softmax just at their source pixels
                scores, to_probabilities = self._logits(batch, timings), softmax
            clock = time.perf_counter()
            labels = resized_argmax(scores, out_hw, to_probabilities)
            timings["resize_back"] += time.perf_counter() - clock
            return HeadOutputs(labels, None, None)
        chunk = self._probabilities(batch, tta, timings)
        clock = time.perf_counter()
        chunk = resize_2d(chunk, out_hw, order=1)  # (b, C, H, W) on the slice's own grid
        timings["resize_back"] += time.perf_counter() - clock
        clock = time.perf_counter()
        labels = chunk.argmax(axis=1)
        uncertainty = normalized_entropy(chunk) if want_uncertainty else None
        timings["argmax_entropy"] += time.perf_counter() - clock
        return HeadOutputs(labels, chunk if want_probabilities else None, uncertainty)

    def _numpy_batch_nearest(
        self,
        slices: np.ndarray,
        out_hw: tuple[int, int],
        tta: bool,
        want_probabilities: bool,
        want_uncertainty: bool,
        timings: dict[str, float],
    ) -> HeadOutputs:
        """The SSL4MIS/BCP test path: order-0 zoom to the patch, argmax there, order-0 zoom of the labels
        (and of any probability/uncertainty maps) back to the slice's grid."""
        clock = time.perf_counter()
        batch = np.ascontiguousarray(zoom_nearest(slices, self.package.patch_size)[:, None])
        timings["resize_to_patch"] += time.perf_counter() - clock
        chunk = self._probabilities(batch, tta, timings)
        clock = time.perf_counter()
        labels = zoom_nearest(chunk.argmax(axis=1).astype(np.uint8), out_hw)
        uncertainty = zoom_nearest(normalized_entropy(chunk), out_hw) if want_uncertainty else None
        probabilities = zoom_nearest(chunk, out_hw) if want_probabilities else None
        timings["resize_back"] += time.perf_counter() - clock
        return HeadOutputs(labels, probabilities, uncertainty)

    def _probabilities(self, batch: np.ndarray, tta: bool, timings: dict[str, float]) -> np.ndarray:
        """Softmax probabilities (b, C, h, w) at patch size; with TTA, averaged over the flips."""
        flips = TTA_FLIPS if tta else ((),)
        if len(flips) > 1:
            batch = np.ascontiguousarray(np.concatenate([np.flip(batch, f) if f else batch for f in flips]))
        logits = self._logits(batch, timings)
        clock = time.perf_counter()
        probabilities = average_flips(softmax(logits), flips)
        timings["softmax"] += time.perf_counter() - clock
        return probabilities

    def _logits(self, batch: np.ndarray, timings: dict[str, float]) -> np.ndarray:
        """The backend's logits (b, C, h, w) for a (b, 1, h, w) batch at patch size, timed as ``network``."""
        clock = time.perf_counter()
        logits = self.backend.run(batch)
        timings["network"] += time.perf_counter() - clock
        return logits

    # -- files -----------------------------------------------------------------------------------
    def segment_to_files(
        self,
        source: Any,
        segmentation: str | os.PathLike,
        *,
        probabilities: bool = False,
        uncertainty: bool = False,
        overwrite: bool = False,
        dicom_series: str | None = None,
        tta: bool | None = None,
        progress_callback: ProgressCallback | None = None,
        cancel_event: CancelEvent | None = None,
    ) -> tuple[SegmentationResult, dict[str, Path]]:
        """Segment ``source`` and write its outputs (see :func:`output_paths`); nothing partial on failure.

        Existing outputs are refused before any work unless ``overwrite``.
        """
        paths = output_paths(segmentation, probabilities, uncertainty)
        refuse_input_as_output(source, paths.values())
        refuse_existing(paths.values(), overwrite)
        report = _Progress(progress_callback)
        result = self._segment(
            source, None, dicom_series, tta, probabilities, uncertainty, report, cancel_event
        )
        _check_cancel(cancel_event, result.name)
        clock = time.perf_counter()
        written = result.save_all(
            paths["segmentation"],
            probabilities=paths.get("probabilities"),
            uncertainty=paths.get("uncertainty"),
            overwrite=overwrite,
        )
        result.timings["write"] = time.perf_counter() - clock
        return result, written

    def segment_many(
        self,
        inputs: Sequence[str | os.PathLike],
        out_dir: str | os.PathLike,
        *,
        suffix: str = ".nii.gz",
        probabilities: bool = False,
        uncertainty: bool = False,
        overwrite: bool = False,
        tta: bool | None = None,
        progress: bool = True,
        progress_callback: ProgressCallback | None = None,
        cancel_event: CancelEvent | None = None,
    ) -> list[Path]:
        """Segment several scans into ``out_dir/<case><suffix>``, with a progress bar over cases.

        All output names are checked first (duplicates, existing files without ``overwrite``), so a batch
        is refused before any work rather than half-way. Returns the label-map paths in input order.
        """
        output_suffix(f"x{suffix}")
        targets = [Path(out_dir) / f"{case_name(path)}{suffix}" for path in inputs]
        duplicates = sorted({t.name for t in targets if [u.name for u in targets].count(t.name) > 1})
        if duplicates:
            raise InputError(f"several inputs would write the same output(s) {duplicates}; rename them")
        for target in targets:
            refuse_existing(output_paths(target, probabilities, uncertainty).values(), overwrite)
        bar = None
        if progress:
            try:
                from tqdm import tqdm

                bar = tqdm(total=len(targets), desc="segment", unit="case")
            except ImportError:
                bar = None
        written = []
        try:
            for index, (source, target) in enumerate(zip(inputs, targets, strict=True)):
                report = _Progress(progress_callback, None, index / len(targets), 1 / len(targets))
                result, paths = self.segment_to_files(
                    source,
                    target,
                    probabilities=probabilities,
                    uncertainty=uncertainty,
                    overwrite=overwrite,
                    tta=tta,
                    progress_callback=report,
                    cancel_event=cancel_event,
                )
                written.append(paths["segmentation"])
                if bar is not None:
                    bar.set_postfix_str(result.name)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return written
