"""Segmenter: build once, predict many; geometry-exact segmentation of new scans.

    from mpcl import Segmenter
    seg = Segmenter.from_pretrained("runs/quickstart/model")  # backend chosen automatically
    result = seg("scan.nii.gz")                              # or a DICOM folder, .nrrd, .mha, a SimpleITK
    result.save("scan_seg.nii.gz")                           # image, a nibabel image, or (array, spacing)
    seg.segment_many(paths, "out/")

The Segmenter reads the scan, hands its voxels to the one inference core (``mpcl.inference``: the
package's normalisation, slices along the through-plane axis, resize to the patch, the backend, softmax,
resize back, argmax, the package's post-processing; for a model of a planned dataset also its crop,
slicing axis and target spacing) and puts the labels back on the scan's exact grid (size, spacing,
origin, direction). Training validation, ``mpcl-eval`` and the export's Dice gate run
the same core, so a model is scored the way it is deployed.

With the torch backend on a CUDA GPU and triton installed (``fused_kernels``; the backend declares it in
``capabilities``), the per-batch work runs as two fused Triton kernels (``mpcl.kernels``): raw slices go
to the GPU, are normalised and resized there, and only labels (and the maps asked for) come back.
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
from mpcl.inference import InferenceSettings, predict_volume, prepare_volume
from mpcl.inputs import case_name, load_input
from mpcl.io import ImageGeometry, atomic_outputs, write_image, write_segmentation_nrrd, write_vector_image
from mpcl.kernels import FUSED_KERNEL_MODES
from mpcl.model_package import ClassLabel, ModelPackage, load_model_package

log = logging.getLogger("mpcl.segment")

ProgressCallback = Callable[[float, str], None]
OUTPUT_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")


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

    def __repr__(self) -> str:
        """One line a person can read: no arrays, just what the result holds."""
        names = {label.value: name for name, label in self.labels.items()}
        counts = np.bincount(self.label_map.ravel(), minlength=1)
        classes = ", ".join(
            f"{names.get(value, value)}: {int(count)}" for value, count in enumerate(counts) if count
        )
        maps = ["labels"] + [
            key for key in ("probabilities", "uncertainty") if getattr(self, key) is not None
        ]
        spacing = ", ".join(f"{value:g}" for value in self.geometry.spacing)
        return (
            f"SegmentationResult(name={self.name!r}, shape (z, y, x)={tuple(self.label_map.shape)}, "
            f"spacing (x, y, z)=({spacing}) mm, voxels per class {{{classes}}}, "
            f"backend={self.backend!r}, maps={maps})"
        )

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
    ask for one variant. torch runs the fp32 checkpoint and TensorRT its engine's precision; a precision
    or device a backend cannot run is refused with a ConfigError, never silently replaced.
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
        capabilities = self.backend.capabilities
        self.fused = capabilities.fused_kernels
        reason = capabilities.fused_reason or f"the {self.backend.name} backend has none"
        if self.fused and self.package.resize != "linear":
            self.fused, reason = False, "the package resizes with nearest-neighbour zoom, which they lack"
        if self.fused and self.package.planned.target_spacing is not None:
            self.fused, reason = False, "the package resamples slices to a target spacing, which they do not"
        if fused_kernels == "on" and not self.fused:
            raise ConfigError(f"fused_kernels='on' needs the torch backend on a CUDA GPU: {reason}")
        log.info(
            "pre/post-processing: %s",
            "fused Triton kernels on " + self.backend.device if self.fused else f"numpy ({reason})",
        )
        self.batch_size = int(batch_size)
        self.tta = tta
        self.postprocess = postprocess

    def __repr__(self) -> str:
        package = self.package
        name = f"{package.name!r} at {str(package.root)!r}" if package.name else repr(str(package.root))
        return (
            f"Segmenter(package={name}, classes={package.class_names}, "
            f"backend={self.backend.name!r} ({self.backend.describe()}), device={self.backend.device!r}, "
            f"batch_size={self.batch_size}, tta={self.tta}, postprocess={self.postprocess})"
        )

    def settings(
        self, tta: bool | None = None, probabilities: bool = False, uncertainty: bool = False
    ) -> InferenceSettings:
        """What the inference core runs for one call: the package's patch size, resize, normalisation and
        post-processing (unless ``postprocess`` is off), this Segmenter's batch size, TTA and kernels."""
        return InferenceSettings.for_package(
            self.package,
            postprocess=self.postprocess,
            batch_size=self.batch_size,
            tta=self.tta if tta is None else tta,
            probabilities=probabilities,
            uncertainty=uncertainty,
            fused=self.fused,
        )

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
        geometry, name = loaded.geometry, loaded.name
        report(0.05, f"{name}: normalising")
        settings = self.settings(tta, want_probabilities, want_uncertainty)
        data, affine, crop_box = prepare_volume(loaded.array, settings, timings)
        del loaded  # the raw volume is no longer needed: only the normalised copy stays in memory

        def progress(fraction: float, message: str) -> None:
            _check_cancel(cancel_event, name)
            report(0.1 + 0.86 * fraction, f"{name}: {message}")

        log.debug("%s: shape %s, spacing %s", name, data.shape, geometry.spacing)
        prediction = predict_volume(
            data,
            geometry.spacing,
            self.backend,
            settings,
            affine=affine,
            crop_box=crop_box,
            timings=timings,
            progress=progress,
        )
        result = SegmentationResult(
            prediction.labels,
            geometry,
            self.package.labels,
            prediction.probabilities,
            prediction.uncertainty,
            name,
            self.backend.name,
            timings,
        )
        report(1.0, f"{result.name}: done")
        return result

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
