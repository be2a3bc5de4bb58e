"""Slicer node geometry <-> the mpcl runtime's (SimpleITK) geometry, as plain numpy functions.

Slicer places a volume with one 4x4 IJK-to-RAS matrix; SimpleITK and the mpcl runtime use spacing,
origin and a direction matrix in LPS (the DICOM/ITK patient frame). RAS and LPS differ by the sign of
the first two world axes, so converting means flipping x and y of the origin and of every direction
column, never touching the voxel order. Voxel order itself needs no change: a vtkImageData stores
voxel (i, j, k) at flat index i + nx * (j + ny * k), which is exactly C order of an array indexed
[k, j, i], the (z, y, x) order SimpleITK and mpcl use. Everything here is pure numpy (no slicer, no vtk,
no Qt), so CI tests it with synthetic oblique, anisotropic geometry.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Vector3 = tuple[float, float, float]
Direction = tuple[float, float, float, float, float, float, float, float, float]

# Multiplying world coordinates by this matrix converts RAS <-> LPS (it is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
ORTHOGONALITY_TOLERANCE = 1e-4


class GeometryError(ValueError):
    """A matrix or array that cannot describe a 3D voxel grid (named in the message)."""


def ijk_to_ras_from_lps(
    spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]
) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a grid given SimpleITK-style (LPS) spacing, origin and direction.

    ``direction`` is the row-major 3x3 matrix whose columns are the i, j, k axes (SimpleITK's
    ``GetDirection()``); ``spacing`` and ``origin`` are (x, y, z) as in ``GetSpacing()``/``GetOrigin()``.
    """
    spacing_array = np.asarray(spacing, dtype=np.float64)
    origin_array = np.asarray(origin, dtype=np.float64)
    direction_array = np.asarray(direction, dtype=np.float64)
    if spacing_array.shape != (3,) or origin_array.shape != (3,) or direction_array.size != 9:
        raise GeometryError(
            f"expected 3 spacings, 3 origin coordinates and 9 direction values, got {spacing_array.size}, "
            f"{origin_array.size} and {direction_array.size}"
        )
    if np.any(spacing_array <= 0) or not np.all(np.isfinite(spacing_array)):
        raise GeometryError(f"spacing must be positive and finite, got {tuple(spacing_array)}")
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction_array.reshape(3, 3) @ np.diag(spacing_array)
    matrix[:3, 3] = LPS_TO_RAS @ origin_array
    return matrix


def lps_from_ijk_to_ras(ijk_to_ras: np.ndarray) -> tuple[Vector3, Vector3, Direction]:
    """(spacing, origin, direction) in SimpleITK's LPS convention from a 4x4 IJK-to-RAS matrix.

    Spacing is the length of each axis column; the direction columns are those axes normalised.
    A sheared (non-orthogonal) or degenerate matrix is refused: SimpleITK images cannot hold it.
    """
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise GeometryError(f"IJK-to-RAS must be a finite 4x4 matrix, got shape {matrix.shape}")
    if not np.allclose(matrix[3], (0.0, 0.0, 0.0, 1.0)):
        raise GeometryError(f"IJK-to-RAS last row must be (0, 0, 0, 1), got {tuple(matrix[3])}")
    axes = LPS_TO_RAS @ matrix[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise GeometryError(f"IJK-to-RAS has a zero-length voxel axis (spacing {tuple(spacing)})")
    direction = axes / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=ORTHOGONALITY_TOLERANCE):
        raise GeometryError(
            "IJK-to-RAS axes are not orthogonal (sheared grid); resample the volume before segmenting it"
        )
    origin = LPS_TO_RAS @ matrix[:3, 3]
    return (
        tuple(float(v) for v in spacing),
        tuple(float(v) for v in origin),
        tuple(float(v) for v in direction.ravel()),
    )


def ras_of_voxel(ijk_to_ras: np.ndarray, ijk: Sequence[float]) -> np.ndarray:
    """World (RAS) position of the voxel centre at index (i, j, k)."""
    return (np.asarray(ijk_to_ras, dtype=np.float64) @ np.append(np.asarray(ijk, dtype=np.float64), 1.0))[:3]


def array_from_flat_scalars(flat: np.ndarray, dimensions_ijk: Sequence[int]) -> np.ndarray:
    """A (k, j, i) = (z, y, x) array view of vtkImageData scalars stored with i varying fastest."""
    nx, ny, nz = (int(v) for v in dimensions_ijk)
    flat = np.asarray(flat)
    if flat.ndim != 1 and not (flat.ndim == 2 and flat.shape[1] == 1):
        raise GeometryError(f"expected one scalar component per voxel, got array of shape {flat.shape}")
    if flat.shape[0] != nx * ny * nz:
        raise GeometryError(f"{flat.shape[0]} scalars do not fill a {nx} x {ny} x {nz} grid")
    return flat.reshape(nz, ny, nx)


def flat_scalars_from_array(array_kji: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The inverse of :func:`array_from_flat_scalars`: C-order flat data and the (nx, ny, nz) dimensions."""
    array = np.asarray(array_kji)
    if array.ndim != 3:
        raise GeometryError(f"expected a 3D (k, j, i) array, got shape {array.shape}")
    nz, ny, nx = array.shape
    return np.ascontiguousarray(array).ravel(), (int(nx), int(ny), int(nz))


def same_grid(first: np.ndarray, second: np.ndarray, tolerance: float = 1e-4) -> bool:
    """Whether two IJK-to-RAS matrices place voxels at the same points (to ``tolerance`` mm)."""
    return bool(np.allclose(np.asarray(first, float), np.asarray(second, float), atol=tolerance, rtol=0.0))
