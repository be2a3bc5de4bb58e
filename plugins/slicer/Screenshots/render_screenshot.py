"""Render the extension's screenshot (Screenshots/1.png) headless: a real run of the module's logic.

The sample volume (``MPCLSegmentationLib.testdata``) is segmented by the module's own logic
(``SceneSegmenter``: the ``mpcl-segment`` child process, segments with SNOMED CT terminology, the
uncertainty map) in a slicer-core MRML scene, and drawn with VTK off-screen: left, the middle slice with
the segments over it; right, the segments' closed surfaces in 3D. Needs the ``slicer`` extra
(slicer-core, vtk) and the mpcl runtime::

    python plugins/slicer/Screenshots/render_screenshot.py [OUTPUT.png]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "MPCLSegmentation"))

SIZE = (1200, 560)


def segment_and_render(output: Path) -> Path:
    import slicer
    import vtk
    from MPCLSegmentationLib import testdata
    from MPCLSegmentationLib.logic import SceneSegmenter
    from MPCLSegmentationLib.nodes import add_volume_node, segmentations_logic_for, volume_array
    from MPCLSegmentationLib.process import SegmentOptions
    from vtk.util import numpy_support

    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    array, ijk_to_ras, _truth = testdata.sample_volume()
    volume = add_volume_node(scene, array, ijk_to_ras, "MPCL sample volume")
    logic = segmentations_logic_for(scene)
    with tempfile.TemporaryDirectory() as work:
        result = SceneSegmenter(scene, logic, work_root=work).segment(
            volume, testdata.default_test_model(), SegmentOptions(device="cpu")
        )
    segmentation = result.segmentation_node.GetSegmentation()

    # Left: the middle slice, grey levels, each segment blended in its colour.
    k = array.shape[0] // 2
    grey = array[k].astype(np.float64)
    grey = (grey - grey.min()) / max(float(np.ptp(grey)), 1e-9)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    ids = vtk.vtkStringArray()
    for index in range(segmentation.GetNumberOfSegments()):
        ids.InsertNextValue(segmentation.GetNthSegmentID(index))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert logic.ExportSegmentsToLabelmapNode(result.segmentation_node, ids, labelmap, volume)
    labels = volume_array(labelmap)[0][k]  # segment n -> label n + 1, on the volume's grid
    for index in range(segmentation.GetNumberOfSegments()):
        color = np.asarray(segmentation.GetNthSegment(index).GetColor())
        mask = labels == index + 1
        rgb[mask] = 0.45 * rgb[mask] + 0.55 * color
    pixels = np.ascontiguousarray(np.flipud(rgb * 255).astype(np.uint8))  # VTK rows run bottom-up
    image = vtk.vtkImageData()
    image.SetDimensions(pixels.shape[1], pixels.shape[0], 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(pixels.reshape(-1, 3), deep=True))
    slice_actor = vtk.vtkImageActor()
    slice_actor.GetMapper().SetInputData(image)
    slice_actor.InterpolateOff()

    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*SIZE)
    left, right = vtk.vtkRenderer(), vtk.vtkRenderer()
    left.SetViewport(0.0, 0.0, 0.5, 1.0)
    right.SetViewport(0.5, 0.0, 1.0, 1.0)
    for renderer in (left, right):
        renderer.SetBackground(0.1, 0.1, 0.12)
        window.AddRenderer(renderer)
    left.AddActor(slice_actor)
    left.ResetCamera()
    left.GetActiveCamera().Zoom(1.35)

    # Right: the closed surfaces the module builds for the 3D view.
    result.segmentation_node.CreateClosedSurfaceRepresentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        surface = vtk.vtkPolyData()
        result.segmentation_node.GetClosedSurfaceRepresentation(segment_id, surface)
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputData(surface)
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(segmentation.GetSegment(segment_id).GetColor())
        actor.GetProperty().SetOpacity(0.6 if index == 1 else 1.0)
        right.AddActor(actor)
    right.ResetCamera()
    camera = right.GetActiveCamera()
    camera.Elevation(25)
    camera.Azimuth(35)
    camera.Zoom(1.3)

    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    captions = (
        (left, f"Slice {k + 1} of {array.shape[0]}: " + ", ".join(names)),
        (right, "3D: closed surfaces; terminology SNOMED CT"),
    )
    for renderer, text in captions:
        caption = vtk.vtkTextActor()
        caption.SetInput(text)
        caption.GetTextProperty().SetFontSize(20)
        caption.GetTextProperty().SetColor(0.95, 0.95, 0.95)
        caption.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
        caption.GetPositionCoordinate().SetValue(0.025, 0.03)
        renderer.AddViewProp(caption)
    headings = (
        (left, "MPCL Segmentation: synthetic sample volume, test model"),
        (right, result.outcome.message.split(" Device")[0]),
    )
    for renderer, text in headings:
        heading = vtk.vtkTextActor()
        heading.SetInput(text)
        heading.GetTextProperty().SetFontSize(20)
        heading.GetTextProperty().SetColor(1.0, 1.0, 1.0)
        heading.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
        heading.GetPositionCoordinate().SetValue(0.025, 0.93)
        renderer.AddViewProp(heading)

    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    writer = vtk.vtkPNGWriter()
    output.parent.mkdir(parents=True, exist_ok=True)
    writer.SetFileName(str(output))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    return output


if __name__ == "__main__":
    print(segment_and_render(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "1.png"))
