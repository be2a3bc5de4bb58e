"""Reading and writing medical images with their geometry, and atomic file writes.

Geometry travels with the array: readers return the voxel array in SimpleITK axis order (z, y, x) plus
an ``ImageGeometry`` whose spacing/origin are (x, y, z); writers take both back, so nothing in between
has to guess. Every write goes to a temporary file in the target folder and is renamed into place, so a
crash never leaves a half-written output.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mpcl.errors import InputError

TWO_FILE_FORMATS = (".mhd", ".hdr", ".img")  # header + data files: cannot be renamed into place atomically


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
IDENTITY_DIRECTION_3D: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class ImageGeometry:
    """Physical placement of a 3D voxel grid, in SimpleITK (x, y, z) order."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = IDENTITY_DIRECTION_3D

    @classmethod
    def of(cls, image: sitk.Image) -> ImageGeometry:
        return cls(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, ImageGeometry]:
    """Read a 3D scalar image (NIfTI, NRRD, MHA, ...) as a float32 (z, y, x) array and its geometry.

    A 2D image is returned as a one-slice volume. 4D or multi-component images are refused.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file does not exist")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise InputError(f"{path}: cannot be read as an image ({first_line})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "expected a scalar (grey-level) image"
        )
    if image.GetDimension() == 2:
        image = sitk.JoinSeries([image])
    if image.GetDimension() != 3:
        raise InputError(f"{path}: is a {image.GetDimension()}D image; expected a 3D volume")
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    return array, ImageGeometry.of(image)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the final suffixes so that writers choosing a format by extension work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix="-" + path.name, dir=path.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    os.chmod(temporary_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs follow the umask
    try:
        yield temporary_path
        os.replace(temporary_path, path)
    finally:
        if temporary_path.exists():
            temporary_path.unlink()


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(temporary_path)`` and move the result onto ``path``."""
    with atomic_output(path) as temporary:
        write(temporary)
    return Path(path)


def write_image(array: np.ndarray, geometry: ImageGeometry, path: str | os.PathLike) -> Path:
    """Write a (z, y, x) array with the given geometry, atomically; the format follows the extension."""
    if array.ndim != 3:
        raise InputError(f"{path}: expected a 3D (z, y, x) array to write, got shape {array.shape}")
    if str(path).lower().endswith(TWO_FILE_FORMATS):
        raise InputError(
            f"{path}: two-file formats ({', '.join(TWO_FILE_FORMATS)}) cannot be written atomically; "
            "use .nii.gz, .nrrd or .mha"
        )
    image = geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array)))
    return write_atomically(
        path, lambda temporary: sitk.WriteImage(image, str(temporary), useCompression=True)
    )
