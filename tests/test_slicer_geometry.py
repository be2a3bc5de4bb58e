"""Slicer node geometry <-> runtime geometry: pure functions of the Slicer module, no slicer-core needed.

The reference is SimpleITK (what the runtime reads and writes): a voxel's world position computed from
the IJK-to-RAS matrix must be SimpleITK's physical point with x and y negated (LPS -> RAS), on oblique,
anisotropic and left-handed grids, and array axis order (k, j, i) must address the same voxel in
SimpleITK, in vtkImageData's flat layout and in the module.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mpcl.io import ImageGeometry
from tests.segment_helpers import GEOMETRY

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "slicer" / "MPCLSegmentation"
if str(PLUGIN) not in sys.path:
    sys.path.insert(0, str(PLUGIN))

from MPCLSegmentationLib.geometry import (  # noqa: E402
    GeometryError,
    array_from_flat_scalars,
    flat_scalars_from_array,
    ijk_to_ras_from_lps,
    lps_from_ijk_to_ras,
    ras_of_voxel,
    same_grid,
)


def _left_handed(geometry: ImageGeometry) -> ImageGeometry:
    """The same grid with its k axis reversed (determinant -1), as some DICOM series are stored."""
    direction = np.asarray(geometry.direction).reshape(3, 3).copy()
    direction[:, 2] *= -1
    return ImageGeometry(geometry.spacing, geometry.origin, tuple(direction.ravel()))


GEOMETRIES = {
    "oblique_anisotropic": GEOMETRY,
    "left_handed": _left_handed(GEOMETRY),
    "axial_identity": ImageGeometry((0.5, 0.5, 3.0), (-100.0, 80.0, 12.5)),
}
SIZE_XYZ = (48, 40, 6)


@pytest.mark.parametrize("name", GEOMETRIES)
def test_voxel_positions_match_simpleitk(name):
    geometry = GEOMETRIES[name]
    image = geometry.apply_to(sitk.Image(SIZE_XYZ, sitk.sitkUInt8))
    matrix = ijk_to_ras_from_lps(geometry.spacing, geometry.origin, geometry.direction)
    corners = itertools.product(*((0, n - 1) for n in SIZE_XYZ))
    for ijk in [*corners, (17, 3, 2), (5, 31, 4)]:
        lps = np.asarray(image.TransformIndexToPhysicalPoint(tuple(int(v) for v in ijk)))
        np.testing.assert_allclose(ras_of_voxel(matrix, ijk), lps * (-1, -1, 1), atol=1e-9)


def test_known_matrix_for_an_axial_grid():
    """Hand-computed: LPS origin (10, 20, 30), spacing (2, 3, 4) -> RAS axes -x, -y, +z."""
    matrix = ijk_to_ras_from_lps((2.0, 3.0, 4.0), (10.0, 20.0, 30.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    expected = np.array([[-2, 0, 0, -10], [0, -3, 0, -20], [0, 0, 4, 30], [0, 0, 0, 1]], float)
    np.testing.assert_array_equal(matrix, expected)


@pytest.mark.parametrize("name", GEOMETRIES)
def test_round_trip(name):
    geometry = GEOMETRIES[name]
    spacing, origin, direction = lps_from_ijk_to_ras(
        ijk_to_ras_from_lps(geometry.spacing, geometry.origin, geometry.direction)
    )
    np.testing.assert_allclose(spacing, geometry.spacing, atol=1e-12)
    np.testing.assert_allclose(origin, geometry.origin, atol=1e-12)
    np.testing.assert_allclose(direction, geometry.direction, atol=1e-12)


def test_axis_order_kji_is_simpleitk_and_vtk_order():
    array = np.arange(6 * 5 * 4, dtype=np.int32).reshape(6, 5, 4)  # (k, j, i): nz=6, ny=5, nx=4
    flat, dimensions = flat_scalars_from_array(array)
    assert dimensions == (4, 5, 6)
    image = sitk.GetImageFromArray(array)
    assert image.GetSize() == dimensions
    for i, j, k in [(0, 0, 0), (3, 0, 0), (0, 4, 0), (1, 2, 5), (3, 4, 5)]:
        vtk_point_id = i + dimensions[0] * (j + dimensions[1] * k)  # vtkImageData::ComputePointId
        assert flat[vtk_point_id] == array[k, j, i] == image.GetPixel(i, j, k)
    np.testing.assert_array_equal(array_from_flat_scalars(flat, dimensions), array)


def test_refuses_grids_simpleitk_cannot_hold():
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(GeometryError, match="not orthogonal"):
        lps_from_ijk_to_ras(sheared)
    flat = np.diag([1.0, 0.0, 1.0, 1.0])
    with pytest.raises(GeometryError, match="zero-length"):
        lps_from_ijk_to_ras(flat)
    projective = np.eye(4)
    projective[3, 0] = 1.0
    with pytest.raises(GeometryError, match="last row"):
        lps_from_ijk_to_ras(projective)
    with pytest.raises(GeometryError, match="spacing must be positive"):
        ijk_to_ras_from_lps((1.0, -1.0, 1.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(GeometryError, match="do not fill"):
        array_from_flat_scalars(np.zeros(10), (4, 5, 6))
    with pytest.raises(GeometryError, match="one scalar component"):
        array_from_flat_scalars(np.zeros((120, 3)), (4, 5, 6))


def test_same_grid_tolerance():
    matrix = ijk_to_ras_from_lps(GEOMETRY.spacing, GEOMETRY.origin, GEOMETRY.direction)
    nudged = matrix.copy()
    nudged[0, 3] += 1e-6
    assert same_grid(matrix, nudged)
    nudged[0, 3] += 0.01
    assert not same_grid(matrix, nudged)
