"""The Slicer module's logic on real Slicer libraries: the slicer-core wheel's MRML scene and nodes.

Installed by the ``slicer`` test extra (CI installs it, so these run there); without it the module is
skipped. Each test builds volume nodes from arrays with oblique direction and anisotropic spacing, runs
the logic (which runs ``mpcl-segment`` in a child process) and checks the segmentation node against
the runtime's own output or against a ground truth known by construction.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer_core = pytest.importorskip(
    "slicer_core", reason="needs the slicer-core wheel (pip install -e .[slicer])"
)
slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):  # PyPI's unrelated "slicer" package (a shap dependency) shadows it
    pytest.skip("the installed 'slicer' module is not slicer-core's", allow_module_level=True)
slicerio = pytest.importorskip("slicerio", reason="needs slicerio (pip install -e .[slicer])")

import vtk  # noqa: E402  (slicer-core depends on vtk)
from vtk.util import numpy_support  # noqa: E402

from mpcl import Segmenter  # noqa: E402
from tests.segment_helpers import GEOMETRY, auto_cpu_backend, phantom_volume, sitk_image  # noqa: E402

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "slicer" / "MPCLSegmentation"
if str(PLUGIN) not in sys.path:
    sys.path.insert(0, str(PLUGIN))

from MPCLSegmentationLib import testdata  # noqa: E402
from MPCLSegmentationLib.geometry import ijk_to_ras_from_lps, lps_from_ijk_to_ras  # noqa: E402
from MPCLSegmentationLib.logic import (  # noqa: E402
    BACKEND_ATTRIBUTE,
    DEVICE_ATTRIBUTE,
    SceneSegmenter,
    SegmentationError,
)
from MPCLSegmentationLib.nodes import (  # noqa: E402
    add_volume_node,
    numpy_matrix,
    segment_table,
    vtk_matrix,
    write_segmentation_file,
)
from MPCLSegmentationLib.process import SegmentOptions  # noqa: E402

pytestmark = pytest.mark.slow  # each test drives the Slicer module's logic on a real segmentation (1-5 s)

CPU = SegmentOptions(device="cpu")


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()  # adds the default colour tables, as in the application
    colors.SetMRMLScene(scene)
    scene.colors_logic = colors  # keep it alive as long as the scene
    return scene


@pytest.fixture
def segmenter(scene, tmp_path):
    return SceneSegmenter(scene, python=sys.executable, work_root=tmp_path / "work")


def _counts(scene, class_name):
    return scene.GetNumberOfNodesByClass(class_name)


def _segment_voxels(segmentation_node, segment_id):
    """A segment's own binary labelmap, (k, j, i), and its image-to-world matrix (Slicer's public API)."""
    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    nx, ny, nz = image.GetDimensions()
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nz, ny, nx)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return voxels, numpy_matrix(matrix), image.GetExtent()


def _volume_matrix(volume_node):
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return numpy_matrix(matrix)


def test_logic_matches_the_runtime_on_an_oblique_anisotropic_volume(scene, segmenter, package_dir, tmp_path):
    array = phantom_volume()
    ijk_to_ras = ijk_to_ras_from_lps(GEOMETRY.spacing, GEOMETRY.origin, GEOMETRY.direction)
    volume = add_volume_node(scene, array, ijk_to_ras, "phantom")

    output = segmenter.segment(volume, package_dir, SegmentOptions(device="cpu", uncertainty=True))

    reference = Segmenter.from_pretrained(package_dir, "auto", "cpu")(
        sitk_image(array, GEOMETRY), uncertainty=True
    )
    foreground = [label for label in reference.labels.values() if label.value]
    rows = segment_table(output.segmentation_node)
    assert [row[1] for row in rows] == [label.name for label in foreground]
    assert [row[3] for row in rows] == [label.value for label in foreground]
    for (segment_id, _name, color, _value), label in zip(rows, foreground, strict=True):
        np.testing.assert_allclose(color, np.asarray(label.color) / 255.0)
        voxels, matrix, extent = _segment_voxels(output.segmentation_node, segment_id)
        assert extent == (0, array.shape[2] - 1, 0, array.shape[1] - 1, 0, array.shape[0] - 1)
        np.testing.assert_allclose(matrix, ijk_to_ras, atol=1e-6)  # the segment lies on the volume's grid
        np.testing.assert_array_equal(voxels > 0, reference.label_map == label.value)
        assert output.voxel_counts[label.name] == int(np.count_nonzero(reference.label_map == label.value))
    assert output.segmentation_node.GetNodeReference("referenceImageGeometryRef") is volume

    uncertainty = output.uncertainty_node
    np.testing.assert_allclose(_volume_matrix(uncertainty), ijk_to_ras, atol=1e-9)
    values = numpy_support.vtk_to_numpy(uncertainty.GetImageData().GetPointData().GetScalars())
    np.testing.assert_allclose(values.reshape(array.shape), reference.uncertainty, atol=1e-5)
    display = uncertainty.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeIron"
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)

    backend = auto_cpu_backend()
    assert output.outcome.ok and (output.outcome.backend, output.outcome.device) == (backend, "cpu")
    assert output.segmentation_node.GetAttribute(DEVICE_ATTRIBUTE) == "cpu"
    assert output.segmentation_node.GetAttribute(BACKEND_ATTRIBUTE) == backend
    assert output.segmentation_node.GetSegmentation().ContainsRepresentation("Closed surface")  # 3D display
    assert _counts(scene, "vtkMRMLLabelMapVolumeNode") == 0  # the temporary import node is gone
    assert list((tmp_path / "work").iterdir()) == []  # the work folder is removed


@pytest.mark.parametrize("tta", [False, True])
def test_known_segmentation_of_the_sample_volume(scene, segmenter, tta):
    array, ijk_to_ras, truth = testdata.sample_volume()
    volume = add_volume_node(scene, array, ijk_to_ras, "sample")
    output = segmenter.segment(volume, testdata.default_test_model(), SegmentOptions(device="cpu", tta=tta))
    rows = segment_table(output.segmentation_node)
    assert [row[1] for row in rows] == list(testdata.CLASS_NAMES[1:])
    for segment_id, name, color, value in rows:
        np.testing.assert_allclose(color, np.asarray(testdata.CLASS_COLORS[name]) / 255.0)
        voxels, matrix, _ = _segment_voxels(output.segmentation_node, segment_id)
        np.testing.assert_array_equal(voxels > 0, truth == value)
        np.testing.assert_allclose(matrix, ijk_to_ras, atol=1e-6)
        assert output.voxel_counts[name] == int(np.count_nonzero(truth == value)) > 0


def test_seg_nrrd_written_by_the_logic_opens_with_names_and_geometry(scene, segmenter, tmp_path):
    array, ijk_to_ras, truth = testdata.sample_volume()
    volume = add_volume_node(scene, array, ijk_to_ras, "sample")
    output = segmenter.segment(volume, testdata.default_test_model(), CPU, show_3d=False)
    path = write_segmentation_file(scene, output.segmentation_node, tmp_path / "out" / "sample.seg.nrrd")

    segmentation = slicerio.read_segmentation(str(path))
    segments = segmentation["segments"]
    assert [s["name"] for s in segments] == list(testdata.CLASS_NAMES[1:])
    assert [s["labelValue"] for s in segments] == [1, 2, 3]
    assert not any(s["nameAutoGenerated"] for s in segments)
    for segment in segments:
        expected = np.asarray(testdata.CLASS_COLORS[segment["name"]]) / 255.0
        np.testing.assert_allclose(segment["color"], expected, atol=1e-5)
    np.testing.assert_array_equal(segmentation["voxels"], truth.transpose(2, 1, 0))  # slicerio is (i, j, k)
    expected_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras  # RAS -> LPS, written out by hand
    np.testing.assert_allclose(segmentation["ijkToLPS"], expected_lps, atol=1e-5)
    assert sorted(p.name for p in path.parent.iterdir()) == ["sample.seg.nrrd"]  # no temporary left
    with pytest.raises(ValueError, match=r"\.seg\.nrrd"):
        write_segmentation_file(scene, output.segmentation_node, tmp_path / "out" / "sample.nrrd")


def test_runtime_seg_nrrd_loads_in_slicers_reader(scene, tmp_path):
    """The runtime's own .seg.nrrd writer (mpcl.io) is read by Slicer's segmentation storage node."""
    array, ijk_to_ras, truth = testdata.sample_volume()
    spacing, origin, direction = lps_from_ijk_to_ras(ijk_to_ras)
    image = sitk_image(array.astype(np.float32), type(GEOMETRY)(spacing, origin, direction))
    result = Segmenter.from_pretrained(testdata.default_test_model(), "onnxruntime", "cpu")(image)
    path = result.save(tmp_path / "runtime.seg.nrrd")

    slicer.vtkSlicerSegmentationsModuleLogic().SetMRMLScene(scene)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    rows = segment_table(node)
    assert [(row[1], row[3]) for row in rows] == [(n, v) for v, n in enumerate(testdata.CLASS_NAMES) if v]
    for segment_id, name, color, value in rows:
        np.testing.assert_allclose(color, np.asarray(testdata.CLASS_COLORS[name]) / 255.0, atol=1e-5)
        voxels, matrix, _ = _segment_voxels(node, segment_id)
        np.testing.assert_array_equal(voxels > 0, truth == value)
        np.testing.assert_allclose(matrix, ijk_to_ras, atol=1e-5)


def test_volume_under_a_transform_and_refilling_a_segmentation(scene, segmenter):
    array, ijk_to_ras, truth = testdata.sample_volume()
    volume = add_volume_node(scene, array, ijk_to_ras, "sample")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    shift = np.eye(4)
    shift[:3, 3] = (5.0, -3.0, 12.0)
    transform.SetMatrixTransformToParent(vtk_matrix(shift))
    volume.SetAndObserveTransformNodeID(transform.GetID())

    first = segmenter.segment(
        volume, testdata.default_test_model(), SegmentOptions(device="cpu", uncertainty=True)
    )
    again = segmenter.segment(volume, testdata.default_test_model(), CPU, first.segmentation_node)
    assert again.segmentation_node is first.segmentation_node
    assert _counts(scene, "vtkMRMLSegmentationNode") == 1
    assert first.segmentation_node.GetTransformNodeID() == transform.GetID()
    assert first.uncertainty_node.GetTransformNodeID() == transform.GetID()
    rows = segment_table(again.segmentation_node)
    assert [row[1] for row in rows] == list(testdata.CLASS_NAMES[1:])
    for segment_id, _name, _color, value in rows:  # labels are not resampled through the transform
        voxels, matrix, _ = _segment_voxels(again.segmentation_node, segment_id)
        np.testing.assert_array_equal(voxels > 0, truth == value)
        np.testing.assert_allclose(matrix, ijk_to_ras, atol=1e-6)


def test_failures_leave_the_scene_unchanged(scene, segmenter, tmp_path):
    array, ijk_to_ras, _ = testdata.sample_volume()
    volume = add_volume_node(scene, array, ijk_to_ras, "sample")
    before = {name: _counts(scene, name) for name in ("vtkMRMLSegmentationNode", "vtkMRMLScalarVolumeNode")}

    with pytest.raises(SegmentationError, match="model.json"):
        segmenter.segment(volume, tmp_path, CPU)  # not a model package
    with pytest.raises(SegmentationError, match="refused to run: no usable backend.*no TensorRT engine"):
        segmenter.segment(volume, testdata.default_test_model(), SegmentOptions(backend="tensorrt"))

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(SegmentationError) as cancelled:
        segmenter.segment(volume, testdata.default_test_model(), CPU, cancel_event=cancel)
    assert cancelled.value.cancelled and "cancelled" in str(cancelled.value)

    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    image = vtk.vtkImageData()
    image.SetDimensions(4, 4, 2)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    vector.SetAndObserveImageData(image)
    with pytest.raises(SegmentationError, match="3 components per voxel"):
        segmenter.segment(vector, testdata.default_test_model(), CPU)

    after = {name: _counts(scene, name) for name in before}
    after["vtkMRMLScalarVolumeNode"] -= 1  # the vector volume added above is a scalar volume subclass
    assert after == before
    assert list((tmp_path / "work").iterdir()) == []


def test_input_written_for_the_child_matches_slicers_own_nrrd_writer(scene, segmenter, tmp_path):
    """Cross-check of the RAS -> LPS conversion against Slicer's volume writer, not against itself."""
    array, ijk_to_ras, _ = testdata.sample_volume()
    volume = add_volume_node(scene, array, ijk_to_ras, "sample")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "slicer.nrrd"))
    assert storage.WriteData(volume)
    job = segmenter.prepare(volume, testdata.default_test_model(), CPU)
    try:
        ours, slicers = sitk.ReadImage(str(job.input_path)), sitk.ReadImage(str(tmp_path / "slicer.nrrd"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(slicers))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), array)
        for getter in ("GetSpacing", "GetOrigin", "GetDirection"):
            np.testing.assert_allclose(getattr(ours, getter)(), getattr(slicers, getter)(), atol=1e-6)
        assert job.command[1] == "-c" and job.command[3] == "mpcl.cli_segment"  # through the bootstrap
        assert str(job.input_path) in job.command
    finally:
        segmenter.discard(job)
    assert not job.work_dir.exists()


def test_fill_segmentation_edge_cases(scene):
    from MPCLSegmentationLib.nodes import SegmentSpec, fill_segmentation, segmentations_logic_for

    logic = segmentations_logic_for(scene)
    _, ijk_to_ras, truth = testdata.sample_volume()
    specs = [SegmentSpec(1, "a", (255, 0, 0)), SegmentSpec(3, "c", (0, 0, 255))]  # value 2 not named
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(ValueError, match=r"value\(s\) \[2\]"):
        fill_segmentation(scene, node, truth, ijk_to_ras, specs, logic)
    assert node.GetSegmentation().GetNumberOfSegments() == 0  # refused before touching the node

    sparse = np.where(truth == 2, 0, truth)
    ids = fill_segmentation(scene, node, sparse, ijk_to_ras, specs, logic)
    assert [row[1:] for row in segment_table(node)] == [("a", (1.0, 0.0, 0.0), 1), ("c", (0.0, 0.0, 1.0), 3)]
    for segment_id, value in zip(ids, (1, 3), strict=True):  # value 3 is not shifted onto value 2's slot
        voxels, _, _ = _segment_voxels(node, segment_id)
        np.testing.assert_array_equal(voxels > 0, sparse == value)

    ids = fill_segmentation(scene, node, np.zeros_like(truth), ijk_to_ras, specs, logic)  # nothing found
    assert [row[1] for row in segment_table(node)] == ["a", "c"]
    assert all(not _segment_voxels(node, segment_id)[0].any() for segment_id in ids)


RV_ENTRY = (
    "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure"
    "~SCT^53085002^Right ventricle~^^~Anatomic codes - DICOM master list~^^~^^"
)


def test_segments_carry_snomed_terminology_that_slicer_reads(scene, segmenter, tmp_path):
    array, ijk_to_ras, _ = testdata.sample_volume()
    volume = add_volume_node(scene, array, ijk_to_ras, "sample")
    output = segmenter.segment(volume, testdata.default_test_model(), CPU, show_3d=False)
    segmentation = output.segmentation_node.GetSegmentation()
    expected = {  # the test model's class names -> Slicer's DICOM master list codes
        "left ventricle": ("87878005", "Left ventricle"),
        "myocardium": ("74281007", "Myocardium"),
        "right ventricle": ("53085002", "Right ventricle"),
    }
    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    for name, (code, meaning) in expected.items():
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))
        entry = slicer.vtkSlicerTerminologyEntry()
        assert terminologies.DeserializeTerminologyEntry(segment.GetTerminology(), entry)
        assert entry.GetTerminologyContextName() == "Segmentation category and type - DICOM master list"
        category, kind = entry.GetCategoryObject(), entry.GetTypeObject()
        assert (category.GetCodingSchemeDesignator(), category.GetCodeValue()) == ("SCT", "123037004")
        assert (kind.GetCodingSchemeDesignator(), kind.GetCodeValue(), kind.GetCodeMeaning()) == (
            "SCT",
            code,
            meaning,
        )
        assert segment.GetName() == name  # the class name stays the segment's name

    path = write_segmentation_file(scene, output.segmentation_node, tmp_path / "sample.seg.nrrd")
    written = {s["name"]: s["terminology"] for s in slicerio.read_segmentation(str(path))["segments"]}
    assert {name: tuple(t["type"]) for name, t in written.items()} == {
        name: ("SCT", code, meaning) for name, (code, meaning) in expected.items()
    }


def test_model_json_terminology_and_unknown_class_names(scene, segmenter, tmp_path):
    import json
    import shutil

    package = tmp_path / "model"
    shutil.copytree(testdata.default_test_model(), package)
    model_json = json.loads((package / "model.json").read_text())
    model_json["classes"][1]["name"] = "blood pool"  # unknown name, no terminology: generic
    model_json["classes"][3]["terminology"] = RV_ENTRY.replace("Right ventricle", "Right ventricle (RV)")
    (package / "model.json").write_text(json.dumps(model_json))
    array, ijk_to_ras, _ = testdata.sample_volume()
    volume = add_volume_node(scene, array, ijk_to_ras, "sample")
    output = segmenter.segment(volume, package, CPU, show_3d=False)
    segmentation = output.segmentation_node.GetSegmentation()
    terminology = {
        segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegment(i).GetTerminology()
        for i in range(segmentation.GetNumberOfSegments())
    }
    assert "~SCT^91723000^Anatomical structure~" in terminology["blood pool"]
    assert "~SCT^74281007^Myocardium~" in terminology["myocardium"]
    assert terminology["right ventricle"] == RV_ENTRY.replace("Right ventricle", "Right ventricle (RV)")

    model_json["classes"][3]["terminology"] = "SCT^53085002^Right ventricle"  # a code, not an entry
    (package / "model.json").write_text(json.dumps(model_json))
    with pytest.raises(SegmentationError, match="model.json.*terminology entry"):
        segmenter.segment(volume, package, CPU)


def test_new_nodes_are_placed_under_the_volumes_study(scene, segmenter):
    subject_hierarchy_logic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    subject_hierarchy_logic.SetMRMLScene(scene)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient 1")
    study = hierarchy.CreateStudyItem(patient, "Cardiac MRI")
    other_study = hierarchy.CreateStudyItem(patient, "Follow-up")
    array, ijk_to_ras, _ = testdata.sample_volume()
    volume = add_volume_node(scene, array, ijk_to_ras, "sample")
    hierarchy.CreateItem(study, volume)

    output = segmenter.segment(
        volume, testdata.default_test_model(), SegmentOptions(device="cpu", uncertainty=True), show_3d=False
    )
    for node in (output.segmentation_node, output.uncertainty_node):
        item = hierarchy.GetItemByDataNode(node)
        assert item and hierarchy.GetItemParent(item) == study, node.GetName()

    # a segmentation the user chose to refill stays where the user keeps it
    chosen = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chosen")
    hierarchy.CreateItem(other_study, chosen)
    segmenter.segment(volume, testdata.default_test_model(), CPU, chosen, show_3d=False)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(chosen)) == other_study  # left alone

    # a volume outside the subject hierarchy (slicer-core adds no item by itself): nothing fails
    loose = add_volume_node(scene, array, ijk_to_ras, "loose")
    assert not hierarchy.GetItemByDataNode(loose)
    output = segmenter.segment(loose, testdata.default_test_model(), CPU, show_3d=False)
    assert output.outcome.ok and not hierarchy.GetItemByDataNode(output.segmentation_node)


def test_label_values_above_255_do_not_wrap(scene):
    from MPCLSegmentationLib.nodes import SegmentSpec, fill_segmentation, segmentations_logic_for

    logic = segmentations_logic_for(scene)
    _, ijk_to_ras, truth = testdata.sample_volume()
    labels = np.select([truth == 1, truth == 2, truth == 3], [1, 256, 300], 0).astype(np.int32)
    specs = [SegmentSpec(1, "one", (255, 0, 0)), SegmentSpec(256, "big", (0, 255, 0))]
    specs.append(SegmentSpec(300, "bigger", (0, 0, 255), RV_ENTRY))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ids = fill_segmentation(scene, node, labels, ijk_to_ras, specs, logic)
    assert [row[3] for row in segment_table(node)] == [1, 256, 300]
    for segment_id, value in zip(ids, (1, 256, 300), strict=True):  # uint8 would make 256 -> 0, 300 -> 44
        voxels, _, _ = _segment_voxels(node, segment_id)
        np.testing.assert_array_equal(voxels > 0, labels == value)
        assert (voxels > 0).any()
    assert node.GetSegmentation().GetSegment(ids[2]).GetTerminology() == RV_ENTRY
    with pytest.raises(ValueError, match="negative"):
        fill_segmentation(scene, node, labels - 1, ijk_to_ras, specs, logic)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")
def test_work_folder_outlives_a_child_that_is_still_running(scene, segmenter, monkeypatch):
    import subprocess

    from MPCLSegmentationLib import logic as logic_module

    array, ijk_to_ras, _ = testdata.sample_volume()
    volume = add_volume_node(scene, array, ijk_to_ras, "sample")
    job = segmenter.prepare(volume, testdata.default_test_model(), CPU)
    # a child (own process group, as the bootstrap makes it) that is still writing into the folder
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.0)"], start_new_session=True)
    job.monitor.child_pid = child.pid
    monkeypatch.setattr(logic_module, "KILL_WAIT_SECONDS", 0.1)
    assert segmenter.discard(job) is False and job.work_dir.is_dir()  # left in place, not pulled away
    monkeypatch.setattr(logic_module, "KILL_WAIT_SECONDS", 30.0)
    threading.Thread(target=child.wait, daemon=True).start()  # reap it, as its parent would
    assert segmenter.discard(job) is True and not job.work_dir.exists()  # removed once it is gone
    assert child.poll() is not None
