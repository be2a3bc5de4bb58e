"""Reading and writing medical images with their geometry, and atomic file writes.

Geometry travels with the array: readers return the voxel array in SimpleITK axis order (z, y, x) plus
an ``ImageGeometry`` whose spacing/origin are (x, y, z); writers take both back, so nothing in between
has to guess. Every write goes to a temporary file in the target folder and is renamed into place, so a
crash never leaves a half-written output.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
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
    return sitk_to_array(image, str(path))


def sitk_to_array(image: sitk.Image, where: str) -> tuple[np.ndarray, ImageGeometry]:
    """A scalar 2D or 3D SimpleITK image as a (z, y, x) float32 array and its geometry; ``where`` names
    the source in errors (a 2D image becomes a one-slice volume)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{where}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "expected a scalar (grey-level) image"
        )
    if image.GetDimension() == 2:
        image = sitk.JoinSeries([image])
    if image.GetDimension() != 3:
        raise InputError(f"{where}: is a {image.GetDimension()}D image; expected a 3D volume")
    array = np.array(sitk.GetArrayViewFromImage(image), dtype=np.float32)  # one copy, even for int16
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


@contextmanager
def atomic_outputs(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Like :func:`atomic_output` for several files that belong together (labels, probabilities, ...).

    All are written to temporary files first and renamed only when every write succeeded, so a failure
    leaves none of them on disk.
    """
    with ExitStack() as stack:
        yield [stack.enter_context(atomic_output(path)) for path in paths]


def write_vector_image(array: np.ndarray, geometry: ImageGeometry, path: str | os.PathLike) -> Path:
    """Write a (C, z, y, x) array as one image with C components per voxel (e.g. class probabilities)."""
    if array.ndim != 4:
        raise InputError(f"{path}: expected a 4D (C, z, y, x) array to write, got shape {array.shape}")
    image = geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(array, 0, -1)), True))
    return write_atomically(
        path, lambda temporary: sitk.WriteImage(image, str(temporary), useCompression=True)
    )


def write_segmentation_nrrd(
    labels: np.ndarray,
    geometry: ImageGeometry,
    segments: Sequence[tuple[str, int, tuple[int, int, int]]],
    path: str | os.PathLike,
) -> Path:
    """Write a label map as a 3D Slicer segmentation (``.seg.nrrd``) with named, coloured segments.

    ``segments`` are (name, label value, 0-255 RGB colour) of the foreground classes. The header follows
    Slicer's segmentation storage format (one shared layer, ``SegmentN_*`` key/value fields), so Slicer
    (and ``slicerio``) show the class names and colours.
    """
    if labels.ndim != 3:
        raise InputError(f"{path}: expected a 3D (z, y, x) label array to write, got shape {labels.shape}")
    if not str(path).lower().endswith(".seg.nrrd"):
        raise InputError(f"{path}: a Slicer segmentation file must end in .seg.nrrd")
    image = geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(labels, dtype=np.uint8)))
    size_x, size_y, size_z = image.GetSize()
    extent = f"0 {size_x - 1} 0 {size_y - 1} 0 {size_z - 1}"
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    for index, (name, value, color) in enumerate(segments):
        prefix = f"Segment{index}_"
        fields = {
            "ID": f"Segment_{value}",
            "Name": name,
            "NameAutoGenerated": "0",
            "Color": " ".join(f"{channel / 255:.6g}" for channel in color),
            "ColorAutoGenerated": "0",
            "Extent": extent,
            "Layer": "0",
            "LabelValue": str(int(value)),
        }
        for key, text in fields.items():
            image.SetMetaData(prefix + key, text)
    return write_atomically(
        path, lambda temporary: sitk.WriteImage(image, str(temporary), useCompression=True)
    )
