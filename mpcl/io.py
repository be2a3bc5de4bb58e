"""Reading and writing medical images with their geometry, and atomic file writes.

Geometry travels with the array: readers return the voxel array in SimpleITK axis order (z, y, x) plus
an ``ImageGeometry`` whose spacing/origin are (x, y, z); writers take both back, so nothing in between
has to guess. Every write goes to a temporary file in the target folder, is read back and checked, and
only then renamed into place, so a crash or a full disk never leaves a half-written output under its
final name. Temporaries are named ``.mpcl-partial-<pid>-...-<final name>``: obviously ours, and removed by
the next write to the same name once the process that made them is gone.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mpcl.errors import InputError, OutputError
from mpcl.nifti_check import is_nifti, nifti_problem

TWO_FILE_FORMATS = (".mhd", ".hdr", ".img")  # header + data files: cannot be renamed into place atomically


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def follow_umask(path: str | os.PathLike, mode: int = 0o666) -> None:
    """Give ``path`` the permissions a plain ``open()`` (``mode`` 0o666) or ``mkdir()`` (0o777) would have
    given it under the process umask. ``tempfile.mkstemp``/``mkdtemp`` make 0600 files and 0700
    folders; an output written through one and renamed into place should look like any other output."""
    os.chmod(path, mode & ~_UMASK)


TEMPORARY_PREFIX = ".mpcl-partial-"
# How a failed write is told to a person: the errno's meaning in the words of someone saving a file.
_WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file is larger than this process may write (file-size limit)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a file stands where a folder is needed",
    errno.EISDIR: "a folder stands where the file should go",
}
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
        raise InputError(f"{path}: cannot be read as an image ({itk_reason(error)})") from None
    if is_nifti(path):
        problem = nifti_problem(path)
        if problem:
            raise InputError(f"{path}: {problem}")
    return sitk_to_array(image, str(path))


def itk_reason(error: Exception) -> str:
    """The sentence of an ITK exception that says what is wrong, without file/line/object prefixes."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    for line in lines:
        if "ITK ERROR:" in line:
            reason = line.split("ITK ERROR:", 1)[1].strip()
            head, _, rest = reason.partition("): ")
            return rest if rest and "(0x" in head else reason
    return lines[-1] if lines else "unreadable"


def check_direction(direction: Sequence[float], where: str) -> None:
    """Refuse a direction matrix that is not a rotation/reflection: a shear or a zero axis would place
    the segmentation somewhere else in the patient than the scan."""
    matrix = np.asarray(direction, dtype=np.float64)
    size = int(round(np.sqrt(matrix.size)))
    if size * size != matrix.size or not np.isfinite(matrix).all():
        raise InputError(f"{where}: its direction {tuple(direction)} is not a finite square matrix")
    matrix = matrix.reshape(size, size)
    if abs(abs(np.linalg.det(matrix)) - 1) > 1e-3 or not np.allclose(
        matrix.T @ matrix, np.eye(size), atol=1e-3
    ):
        raise InputError(
            f"{where}: its direction matrix {np.round(matrix, 4).tolist()} is not orthonormal (sheared, "
            "scaled or singular axes), so voxel positions in the patient are ill-defined"
        )


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
    check_direction(image.GetDirection(), where)
    array = np.array(sitk.GetArrayViewFromImage(image), dtype=np.float32)  # one copy, even for int16
    return array, ImageGeometry.of(image)


def write_failure_reason(error: OSError) -> str | None:
    """Why a write failed, in plain words, when the cause is the disk or permissions (else None)."""
    return _WRITE_FAILURES.get(error.errno or -1)


def output_error(path: str | os.PathLike, error: OSError) -> OutputError:
    """One sentence for a failed write, naming the final path (not our temporary) and the cause."""
    reason = write_failure_reason(error) or error.strerror or str(error)
    return OutputError(f"{path}: cannot be written ({reason}); nothing was left under this name")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete our temporaries for ``path`` left by processes that no longer run (killed mid-write)."""
    for candidate in path.parent.glob(f"{TEMPORARY_PREFIX}*-{path.name}"):
        pid_text = candidate.name[len(TEMPORARY_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _process_alive(int(pid_text)):
            candidate.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the final suffixes so that writers choosing a format by extension work. An
    ``OSError`` in the block (full disk, read-only folder) becomes an :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        handle, temporary = tempfile.mkstemp(
            prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-", suffix="-" + path.name, dir=path.parent
        )
    except OSError as error:
        raise output_error(path, error) from None
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        follow_umask(temporary_path)  # mkstemp makes 0600 files; outputs follow the umask
        yield temporary_path
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
        os.replace(temporary_path, path)
    except OSError as error:
        raise output_error(path, error) from None
    finally:
        temporary_path.unlink(missing_ok=True)


def check_writable_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove a file can be made in it, before any long work starts."""
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "is a file", str(folder))
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = "it is a file, not a folder" if error.errno == errno.ENOTDIR else None
        reason = reason or write_failure_reason(error) or error.strerror or str(error)
        raise OutputError(f"{folder}: cannot write into this folder ({reason})") from None
    return folder


def check_writable_file(path: str | os.PathLike) -> Path:
    """Refuse, before any work, an output file that is a folder or whose folder cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name for this output")
    check_writable_folder(path.parent)
    return path


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(temporary_path)`` and move the result onto ``path``."""
    with atomic_output(path) as temporary:
        write(temporary)
    return Path(path)


def save_sitk_image(image: sitk.Image, path: str | os.PathLike) -> None:
    """Write ``image`` to exactly ``path`` and read it back; a short or unreadable file is an OSError.

    ITK's NIfTI writer reports a full disk only as a printed warning, so the file is checked: a NIfTI
    file's voxel bytes are counted against its header, other formats are read back and their size compared.
    """
    try:
        sitk.WriteImage(image, str(path), useCompression=True)
    except RuntimeError as error:
        raise OSError(errno.EIO, f"the image writer failed: {itk_reason(error)}") from None
    if is_nifti(path):
        problem = nifti_problem(path)
    else:
        try:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            problem = None if reader.GetSize() == image.GetSize() else "the size read back differs"
        except RuntimeError:
            problem = "it cannot be read back"
    if problem:
        raise OSError(errno.EIO, f"the written file is incomplete: {problem}; is the disk full?")


def write_image(
    array: np.ndarray, geometry: ImageGeometry, path: str | os.PathLike, *, atomic: bool = True
) -> Path:
    """Write a (z, y, x) array with the given geometry, checked; the format follows the extension.

    ``atomic=False`` writes straight to ``path``: for callers that already hold a temporary from
    :func:`atomic_outputs`, so each output has exactly one temporary.
    """
    if array.ndim != 3:
        raise InputError(f"{path}: expected a 3D (z, y, x) array to write, got shape {array.shape}")
    if str(path).lower().endswith(TWO_FILE_FORMATS):
        raise InputError(
            f"{path}: two-file formats ({', '.join(TWO_FILE_FORMATS)}) cannot be written atomically; "
            "use .nii.gz, .nrrd or .mha"
        )
    image = geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array)))
    return _write(image, path, atomic)


def _write(image: sitk.Image, path: str | os.PathLike, atomic: bool) -> Path:
    """Write atomically, or (``atomic=False``, inside :func:`atomic_outputs`) straight to ``path``,
    leaving OSErrors to the enclosing atomic block, which names the final file."""
    if atomic:
        return write_atomically(path, lambda temporary: save_sitk_image(image, temporary))
    save_sitk_image(image, path)
    return Path(path)


@contextmanager
def atomic_outputs(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Like :func:`atomic_output` for several files that belong together (labels, probabilities, ...).

    All are written to temporary files first and renamed only when every write succeeded, so a failure
    leaves none of them on disk.
    """
    with ExitStack() as stack:
        yield [stack.enter_context(atomic_output(path)) for path in paths]


def write_vector_image(
    array: np.ndarray, geometry: ImageGeometry, path: str | os.PathLike, *, atomic: bool = True
) -> Path:
    """Write a (C, z, y, x) array as one image with C components per voxel (e.g. class probabilities)."""
    if array.ndim != 4:
        raise InputError(f"{path}: expected a 4D (C, z, y, x) array to write, got shape {array.shape}")
    image = geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(array, 0, -1)), True))
    return _write(image, path, atomic)


def write_segmentation_nrrd(
    labels: np.ndarray,
    geometry: ImageGeometry,
    segments: Sequence[tuple[str, int, tuple[int, int, int]]],
    path: str | os.PathLike,
    *,
    atomic: bool = True,
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
    return _write(image, path, atomic)
