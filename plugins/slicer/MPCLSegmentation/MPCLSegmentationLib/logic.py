"""The work behind the module: volume node -> mpcl-segment (child process) -> segmentation node.

:class:`SceneSegmenter` needs an MRML scene and nothing of the Slicer application, so the same code
runs in Slicer (``MPCLSegmentationLogic`` wraps it) and in CI on the ``slicer-core`` wheel. A run has
three steps so that the widget can drive the middle one with a non-blocking ``qt.QProcess``:

1. :meth:`SceneSegmenter.prepare` writes the volume (array + geometry, LPS) to a private work folder
   and builds the ``mpcl-segment`` command line;
2. the child runs: :meth:`SceneSegmenter.run` (blocking subprocess) or the widget's QProcess, both
   following its output with :class:`~MPCLSegmentationLib.process.OutputMonitor`;
3. :meth:`SceneSegmenter.finish` reads the label map (and uncertainty) back, checks it lies on the
   volume's grid, and builds the nodes; the work folder is always removed.

``mpcl`` is imported only inside these methods, so the module loads (and can offer to install the
runtime) where mpcl is missing.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .geometry import GeometryError, ijk_to_ras_from_lps, lps_from_ijk_to_ras, same_grid
from .nodes import (
    SegmentSpec,
    add_volume_node,
    fill_segmentation,
    place_beside,
    segment_specs,
    segmentations_logic_for,
    show_segmentation,
    show_uncertainty,
    volume_array,
)
from .process import (
    KILL_WAIT_SECONDS,
    OutputMonitor,
    Progress,
    RunOutcome,
    SegmentOptions,
    run_blocking,
    segment_command,
    wait_until_gone,
)
from .terminology import declared_by_class

MODEL_ATTRIBUTE, BACKEND_ATTRIBUTE, DEVICE_ATTRIBUTE = "MPCL.Model", "MPCL.Backend", "MPCL.Device"


class SegmentationError(RuntimeError):
    """A run that produced nothing; the message is one sentence for the user."""

    def __init__(self, message: str, outcome: RunOutcome | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome

    @property
    def cancelled(self) -> bool:
        return bool(self.outcome is not None and self.outcome.cancelled)


@dataclass
class SegmentationJob:
    """Everything one run needs between preparing the input and building the nodes."""

    volume_node: Any
    ijk_to_ras: np.ndarray
    shape: tuple[int, int, int]
    model: Path
    options: SegmentOptions
    specs: list[SegmentSpec]
    work_dir: Path
    input_path: Path
    output_path: Path
    uncertainty_path: Path | None
    command: list[str]
    monitor: OutputMonitor = field(default_factory=OutputMonitor)


@dataclass
class SegmentationOutput:
    """The nodes a run added (or refilled) and how the child ran."""

    segmentation_node: Any
    uncertainty_node: Any
    outcome: RunOutcome
    voxel_counts: dict[str, int]


def _runtime_missing(error: ImportError) -> SegmentationError:
    return SegmentationError(
        f"The mpcl runtime is not installed in this Python environment ({error}); "
        "install it from the module (or pip install mpcl) first."
    )


class SceneSegmenter:
    """Segments volume nodes of one MRML scene with an mpcl model package, in a child process.

    ``segmentations_logic``: Slicer's (``slicer.modules.segmentations.logic()``) in the application;
    by default one is created for the scene (slicer-core). ``python``: the interpreter that runs
    ``mpcl-segment`` (``PythonSlicer`` in Slicer; this interpreter by default). ``work_root``: where
    the private work folders go (Slicer's temporary folder in the application).
    """

    def __init__(
        self,
        scene: Any,
        segmentations_logic: Any = None,
        python: str | None = None,
        work_root: str | os.PathLike | None = None,
    ) -> None:
        self.scene = scene
        self.segmentations_logic = segmentations_logic or segmentations_logic_for(scene)
        self.python = python or sys.executable
        self.work_root = None if work_root is None else Path(work_root)

    # -- 1. input ----------------------------------------------------------------------------------
    def prepare(self, volume_node: Any, model: str | os.PathLike, options: SegmentOptions) -> SegmentationJob:
        """Validate the model package, write the volume for the child and build its command line."""
        try:
            from mpcl.errors import MPCLError
            from mpcl.io import ImageGeometry, write_image
            from mpcl.model_package import load_model_package, read_model_json
            from mpcl.segmenter import output_paths
        except ImportError as error:
            raise _runtime_missing(error) from None
        if volume_node is None:
            raise SegmentationError("Select an input volume first.")
        try:
            package = load_model_package(model)
            declared = declared_by_class(read_model_json(package.root))
        except MPCLError as error:
            raise SegmentationError(str(error)) from None
        try:
            specs = segment_specs(package.classes, declared)
        except ValueError as error:
            raise SegmentationError(f"{package.root / 'model.json'}: {error}") from None
        try:
            array, ijk_to_ras = volume_array(volume_node)
            spacing, origin, direction = lps_from_ijk_to_ras(ijk_to_ras)
        except GeometryError as error:
            message = f"Volume {volume_node.GetName()!r} cannot be segmented: {error}"
            raise SegmentationError(message) from None
        if self.work_root is not None:
            self.work_root.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix="MPCLSegmentation-", dir=self.work_root))
        try:
            input_path = work_dir / "input.nrrd"
            write_image(array, ImageGeometry(spacing, origin, direction), input_path)
            outputs = output_paths(work_dir / "segmentation.nrrd", uncertainty=options.uncertainty)
        except Exception:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise
        command = segment_command(self.python, input_path, outputs["segmentation"], package.root, options)
        return SegmentationJob(
            volume_node=volume_node,
            ijk_to_ras=ijk_to_ras,
            shape=tuple(int(n) for n in array.shape),
            model=package.root,
            options=options,
            specs=specs,
            work_dir=work_dir,
            input_path=input_path,
            output_path=outputs["segmentation"],
            uncertainty_path=outputs.get("uncertainty"),
            command=command,
            monitor=OutputMonitor(requested_device=options.device),
        )

    # -- 2. the child, blocking ------------------------------------------------------------------
    def run(
        self,
        job: SegmentationJob,
        on_progress: Callable[[Progress], None] | None = None,
        cancel_event: threading.Event | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> RunOutcome:
        """Run ``mpcl-segment`` for ``job`` and wait for it (the widget uses a QProcess instead).

        ``on_line`` receives each line the child prints for the user (the log)."""
        return run_blocking(job.command, job.monitor, on_progress, cancel_event, on_line=on_line)

    # -- 3. output --------------------------------------------------------------------------------
    def finish(
        self,
        job: SegmentationJob,
        outcome: RunOutcome,
        segmentation_node: Any = None,
        show_3d: bool = True,
    ) -> SegmentationOutput:
        """Build the nodes from a finished child's files; removes the work folder in every case.

        ``segmentation_node``: refill this node instead of adding a new one. If anything fails, nodes
        this call added are removed again, so the scene never holds half a result.
        """
        added: list[Any] = []
        try:
            if not outcome.ok:
                raise SegmentationError(outcome.message, outcome)
            labels = self._read_on_grid(job, job.output_path)
            if segmentation_node is None:
                segmentation_node = self.scene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", f"{job.volume_node.GetName()} MPCL segmentation"
                )
                added.append(segmentation_node)
                place_beside(job.volume_node, segmentation_node)  # under the volume's study
            segmentation_node.SetAndObserveTransformNodeID(job.volume_node.GetTransformNodeID())
            fill_segmentation(
                self.scene,
                segmentation_node,
                labels,
                job.ijk_to_ras,
                job.specs,
                self.segmentations_logic,
                reference_volume=job.volume_node,
            )
            show_segmentation(segmentation_node, show_3d)
            segmentation_node.SetAttribute(MODEL_ATTRIBUTE, str(job.model))
            segmentation_node.SetAttribute(BACKEND_ATTRIBUTE, outcome.backend)
            segmentation_node.SetAttribute(DEVICE_ATTRIBUTE, outcome.device)
            uncertainty_node = None
            if job.uncertainty_path is not None:
                uncertainty = self._read_on_grid(job, job.uncertainty_path).astype(np.float32, copy=False)
                uncertainty_node = add_volume_node(
                    self.scene, uncertainty, job.ijk_to_ras, f"{job.volume_node.GetName()} MPCL uncertainty"
                )
                added.append(uncertainty_node)
                place_beside(job.volume_node, uncertainty_node)
                uncertainty_node.SetAndObserveTransformNodeID(job.volume_node.GetTransformNodeID())
                show_uncertainty(uncertainty_node)
            counts = {spec.name: int(np.count_nonzero(labels == spec.value)) for spec in job.specs}
            return SegmentationOutput(segmentation_node, uncertainty_node, outcome, counts)
        except Exception as error:
            for node in added:
                self.scene.RemoveNode(node)
            if isinstance(error, SegmentationError):
                raise
            message = f"The segmentation could not be added to the scene: {error}"
            raise SegmentationError(message, outcome) from error
        finally:
            self.discard(job)

    def discard(self, job: SegmentationJob) -> bool:
        """Remove the job's work folder (input copy and outputs) once the child is gone.

        A child still running (its process group announced by the ``@mpcl pid`` line) would be writing
        into the folder: it is waited for, and if it does not go the folder is left in place (False).
        """
        pid = job.monitor.child_pid
        if pid and not wait_until_gone((), (pid,), KILL_WAIT_SECONDS):
            return False
        shutil.rmtree(job.work_dir, ignore_errors=True)
        return True

    def _read_on_grid(self, job: SegmentationJob, path: Path) -> np.ndarray:
        """A (k, j, i) array from a file the child wrote, refused unless it lies on the volume's grid."""
        import SimpleITK as sitk

        if not path.is_file():
            raise SegmentationError(f"mpcl-segment reported success but did not write {path.name}")
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        matrix = ijk_to_ras_from_lps(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
        if tuple(array.shape) != job.shape or not same_grid(matrix, job.ijk_to_ras):
            raise SegmentationError(
                f"{path.name} does not lie on the input volume's voxel grid (shape {array.shape} vs "
                f"{job.shape}); the segmentation was not added"
            )
        return array

    # -- all three --------------------------------------------------------------------------------
    def segment(
        self,
        volume_node: Any,
        model: str | os.PathLike,
        options: SegmentOptions | None = None,
        segmentation_node: Any = None,
        show_3d: bool = True,
        on_progress: Callable[[Progress], None] | None = None,
        cancel_event: threading.Event | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> SegmentationOutput:
        """Prepare, run (blocking) and finish in one call; raises SegmentationError on any failure."""
        job = self.prepare(volume_node, model, options or SegmentOptions())
        try:
            outcome = self.run(job, on_progress, cancel_event, on_line)
        except BaseException:
            self.discard(job)
            raise
        return self.finish(job, outcome, segmentation_node, show_3d)
