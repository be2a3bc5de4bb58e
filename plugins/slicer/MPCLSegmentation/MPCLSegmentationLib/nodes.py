"""MRML nodes <-> numpy: volumes in and out, label maps into named, coloured segments, .seg.nrrd out.

Works on whatever MRML scene it is given, the running Slicer's or a bare ``vtkMRMLScene`` from the
``slicer-core`` wheel (tests), because nodes are created through ``scene.AddNewNodeByClass`` and only
vtk is imported at module level. The segmentations module logic must exist for the scene (it registers
the labelmap/surface converters): pass Slicer's own, or let :func:`segmentations_logic_for` make one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import vtk
from vtk.util import numpy_support

from .geometry import GeometryError, array_from_flat_scalars, flat_scalars_from_array
from .terminology import terminology_for_class

# Colour tables for the uncertainty map, in order of preference: Slicer's file-based Viridis exists in
# the application; Iron and Rainbow are created by the colours logic everywhere.
UNCERTAINTY_COLOR_NODE_IDS = (
    "vtkMRMLColorTableNodeFileViridis.txt",
    "vtkMRMLColorTableNodeIron",
    "vtkMRMLColorTableNodeRainbow",
)
BINARY_LABELMAP = "Binary labelmap"


@dataclass(frozen=True)
class SegmentSpec:
    """One foreground class as a segment: the label value in the map, its name, 0-255 RGB colour and
    Slicer terminology entry (see :mod:`.terminology`; "" leaves Slicer's default)."""

    value: int
    name: str
    color: tuple[int, int, int]
    terminology: str = ""

    @property
    def segment_id(self) -> str:
        """Stable IDs (as the mpcl runtime's .seg.nrrd writer uses), so scripts can find segments."""
        return f"Segment_{self.value}"

    @property
    def color_float(self) -> tuple[float, float, float]:
        return (self.color[0] / 255.0, self.color[1] / 255.0, self.color[2] / 255.0)


def segment_specs(classes: Iterable[Any], declared: Mapping[str, Any] | None = None) -> list[SegmentSpec]:
    """SegmentSpecs of the foreground classes of a model package (objects with name, value, color).

    ``declared``: class name -> the ``"terminology"`` model.json gives it (see
    :func:`.terminology.declared_by_class`); the other classes get theirs from their names.
    """
    declared = declared or {}
    specs = []
    for label in classes:
        if label.value:
            name = str(label.name)
            terminology, _source = terminology_for_class(name, declared.get(name))
            color = tuple(int(v) for v in label.color)
            specs.append(SegmentSpec(int(label.value), name, color, terminology.entry()))
    return specs


def label_dtype(max_value: int) -> np.dtype:
    """The smallest unsigned integer type that holds label values up to ``max_value`` (no wrapping)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"label value {max_value} does not fit a 32-bit label map")


def vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def numpy_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def volume_array(volume_node: Any) -> tuple[np.ndarray, np.ndarray]:
    """A scalar volume node's voxels as a (k, j, i) array (a view, not a copy) and its IJK-to-RAS matrix.

    The node's own parent transform is not applied: outputs are placed under the same transform.
    """
    name = volume_node.GetName() if volume_node is not None else None
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise GeometryError(f"volume {name!r} has no voxel data")
    if image.GetNumberOfScalarComponents() != 1:
        raise GeometryError(
            f"volume {name!r} has {image.GetNumberOfScalarComponents()} components per voxel; "
            "select a scalar (grey-level) volume"
        )
    extent = image.GetExtent()
    if (extent[0], extent[2], extent[4]) != (0, 0, 0):
        raise GeometryError(f"volume {name!r} image data does not start at voxel (0, 0, 0) (extent {extent})")
    array = array_from_flat_scalars(
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()), image.GetDimensions()
    )
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return array, numpy_matrix(matrix)


def image_data(array_kji: np.ndarray) -> vtk.vtkImageData:
    """A vtkImageData holding a deep copy of a (k, j, i) array (origin 0, spacing 1: the node places it)."""
    flat, dimensions = flat_scalars_from_array(array_kji)
    image = vtk.vtkImageData()
    image.SetDimensions(*dimensions)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True))
    return image


def add_volume_node(
    scene: Any,
    array_kji: np.ndarray,
    ijk_to_ras: np.ndarray,
    name: str,
    class_name: str = "vtkMRMLScalarVolumeNode",
) -> Any:
    """A new volume node in ``scene`` holding ``array_kji`` placed by ``ijk_to_ras``."""
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))
    node.SetAndObserveImageData(image_data(array_kji))
    return node


def segmentations_logic_for(scene: Any) -> Any:
    """A segmentations module logic bound to ``scene``, for when Slicer's own is not there (slicer-core).

    Without one, no labelmap representation can be created and every ``AddEmptySegment`` fails.
    """
    import slicer  # the slicer-core wheel or the application: both provide the class

    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    return logic


def fill_segmentation(
    scene: Any,
    segmentation_node: Any,
    labels_kji: np.ndarray,
    ijk_to_ras: np.ndarray,
    specs: Sequence[SegmentSpec],
    segmentations_logic: Any,
    reference_volume: Any = None,
) -> list[str]:
    """Replace the segments of ``segmentation_node`` with one segment per spec, from a label map.

    Every class gets its segment (named and coloured from the model package) even when no voxel has its
    label, so a missing structure shows up as an empty segment instead of silently disappearing. The
    label map is imported through a temporary labelmap volume node on the volume's exact grid, which
    Slicer's import maps label value -> segment in the order of the IDs given.
    """
    labels = np.asarray(labels_kji)
    if labels.ndim != 3:
        raise GeometryError(f"expected a 3D (k, j, i) label map, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.array_equal(labels, np.round(labels)):
            raise ValueError(f"label map of type {labels.dtype} holds non-integer values")
    if labels.size and labels.min() < 0:
        raise ValueError(f"label map holds negative value {labels.min()}; labels must be 0 or positive")
    known = {spec.value for spec in specs}
    if any(value <= 0 for value in known):
        raise ValueError(f"segment label values must be positive, got {sorted(known)}")
    present = {int(v) for v in np.unique(labels)} - {0}
    unknown = sorted(present - known)
    if unknown:
        raise ValueError(f"label map holds value(s) {unknown} that the model package does not name")
    segmentation = segmentation_node.GetSegmentation()
    segmentation.RemoveAllSegments()
    segmentation.SetSourceRepresentationName(BINARY_LABELMAP)
    if reference_volume is not None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    added_ids: dict[int, str] = {}
    for spec in sorted(specs, key=lambda spec: spec.value):
        added = segmentation.AddEmptySegment(spec.segment_id, spec.name, spec.color_float)
        if not added:
            raise RuntimeError(
                "could not add a segment to the segmentation node; the segmentations module logic is "
                "missing for this scene"
            )
        segment = segmentation.GetSegment(added)
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        if spec.terminology:
            segment.SetTerminology(spec.terminology)
        added_ids[spec.value] = added
    # Import maps label value v to the v-th ID: pad the ID list so values skipped by the package
    # (if any) do not shift the classes after them.
    ids_by_value = vtk.vtkStringArray()
    for value in range(1, max(added_ids, default=0) + 1):
        ids_by_value.InsertNextValue(added_ids.get(value, ""))
    # A type wide enough for every value (a uint8 cast would turn 256 into 0 and 300 into 44).
    dtype = label_dtype(max([*known, *present], default=0))
    labelmap_node = add_volume_node(
        scene,
        labels.astype(dtype, copy=False),
        ijk_to_ras,
        "MPCL temporary labelmap",
        "vtkMRMLLabelMapVolumeNode",
    )
    # Same parent transform as the segmentation, or Slicer would resample the labels on import.
    labelmap_node.SetAndObserveTransformNodeID(segmentation_node.GetTransformNodeID())
    try:
        if present and not segmentations_logic.ImportLabelmapToSegmentationNode(
            labelmap_node, segmentation_node, ids_by_value
        ):
            raise RuntimeError("Slicer could not import the label map into the segmentation node")
    finally:
        scene.RemoveNode(labelmap_node)
    return list(added_ids.values())


def place_beside(reference_node: Any, node: Any) -> int:
    """Put ``node`` in the subject hierarchy folder that holds ``reference_node`` (for a volume loaded
    from DICOM: its study), so results stay with the patient and study they belong to.

    Returns the parent item ID, or 0 when the reference node has no subject hierarchy item (nothing is
    moved then). Works with the application's scene and with a bare slicer-core scene.
    """
    scene = reference_node.GetScene() if reference_node is not None else None
    if scene is None or node is None:
        return 0
    from slicer import vtkMRMLSubjectHierarchyNode

    hierarchy = vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return 0
    reference_item = hierarchy.GetItemByDataNode(reference_node)
    if not reference_item:
        return 0
    parent = hierarchy.GetItemParent(reference_item)
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:
        hierarchy.CreateItem(parent, node)
    return parent


def show_segmentation(segmentation_node: Any, show_3d: bool = True) -> None:
    """Display the segments in the slice views, and as surfaces in 3D when ``show_3d``."""
    segmentation_node.CreateDefaultDisplayNodes()
    display = segmentation_node.GetDisplayNode()
    if display is not None:
        display.SetVisibility(True)
        display.SetVisibility2DFill(True)
        display.SetVisibility3D(bool(show_3d))
    if show_3d:
        segmentation_node.CreateClosedSurfaceRepresentation()


def show_uncertainty(volume_node: Any, color_node_ids: Sequence[str] = UNCERTAINTY_COLOR_NODE_IDS) -> str:
    """Give an uncertainty (0 certain .. 1 uniform) volume a colour map over its fixed 0..1 range.

    Returns the colour node ID used (the first of ``color_node_ids`` present in the scene), or "".
    """
    volume_node.CreateDefaultDisplayNodes()
    display = volume_node.GetDisplayNode()
    scene = volume_node.GetScene()
    chosen = next((cid for cid in color_node_ids if scene is not None and scene.GetNodeByID(cid)), "")
    if display is not None:
        if chosen:
            display.SetAndObserveColorNodeID(chosen)
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(0.0, 1.0)
    return chosen


def segment_table(segmentation_node: Any) -> list[tuple[str, str, tuple[float, float, float], int]]:
    """(id, name, colour 0-1, label value) of every segment, in display order."""
    segmentation = segmentation_node.GetSegmentation()
    rows = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        rows.append((segment_id, segment.GetName(), tuple(segment.GetColor()), int(segment.GetLabelValue())))
    return rows


def write_segmentation_file(scene: Any, segmentation_node: Any, path: str | os.PathLike) -> Path:
    """Write the segmentation as a ``.seg.nrrd`` with Slicer's own writer, atomically.

    The file is written under a temporary name in the target folder and renamed into place, so a
    failed write never leaves a half-written segmentation behind.
    """
    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise ValueError(f"{path}: a Slicer segmentation file must end in .seg.nrrd")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".seg.nrrd", dir=path.parent)
    os.close(handle)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    try:
        storage.SetFileName(temporary)
        storage.SetUseCompression(True)
        if not storage.WriteData(segmentation_node):
            raise OSError(f"{path}: Slicer could not write the segmentation")
        os.replace(temporary, path)
    finally:
        scene.RemoveNode(storage)
        if os.path.exists(temporary):
            os.remove(temporary)
    return path
