"""Turn whatever a user hands the Segmenter into a (z, y, x) float32 array plus its geometry.

Accepted: a path to a NIfTI / NRRD / MHA (any format SimpleITK reads) file, a DICOM series folder, a
SimpleITK image, a nibabel image, or ``(array, spacing)`` with the array in SimpleITK axis order (z, y, x)
and the spacing in (x, y, z) order (or ``(array, ImageGeometry)``). Every refusal is one sentence naming
the input: unreadable file, 4D or multi-component image, empty or ambiguous DICOM folder, non-finite
voxels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from mpcl.errors import InputError
from mpcl.io import ImageGeometry, check_direction, itk_reason, read_image, sitk_to_array

IMAGE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".img", ".hdr")


@dataclass(frozen=True)
class LoadedImage:
    """An input ready for preprocessing: ``array`` is (z, y, x) float32, ``name`` names the case."""

    array: np.ndarray
    geometry: ImageGeometry
    name: str


NNUNET_CHANNEL_SUFFIX = "_0000"  # nnU-Net raw images are CASE_0000.nii.gz (channel 0); labels are CASE


def case_name(path: str | os.PathLike) -> str:
    """File name without its image suffix (``case_001.nii.gz`` -> ``case_001``) and without nnU-Net's
    channel suffix (``la_003_0000.nii.gz`` -> ``la_003``, so the segmentation is named like its label
    file); folders keep their name."""
    name = Path(path).name
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            stem = name[: -len(suffix)]
            if stem.endswith(NNUNET_CHANNEL_SUFFIX) and len(stem) > len(NNUNET_CHANNEL_SUFFIX):
                stem = stem[: -len(NNUNET_CHANNEL_SUFFIX)]
            return stem
    return name


def _is_nibabel_image(source: Any) -> bool:
    return all(hasattr(source, attribute) for attribute in ("affine", "dataobj", "header"))


def _describe_series(folder: Path, series_id: str) -> str:
    """'UID (MR, cine SAX, 12 files)': enough for a user to pick the right series."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id)
    details = []
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        reader.ReadImageInformation()
        for tag in ("0008|0060", "0008|103e"):  # modality, series description
            if reader.HasMetaDataKey(tag) and reader.GetMetaData(tag).strip():
                details.append(reader.GetMetaData(tag).strip())
    except RuntimeError:
        pass
    details.append(f"{len(files)} files")
    return f"{series_id} ({', '.join(details)})"


def _slice_headers(files: Sequence[str]) -> list[dict[str, str]]:
    """Size, position and orientation of each DICOM file, read from headers only (no pixel data)."""
    headers = []
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            headers.append({"file": name})
            continue
        header = {"file": name, "size": "x".join(str(v) for v in reader.GetSize()[:2])}
        for key, tag in (("position", "0020|0032"), ("orientation", "0020|0037")):
            if reader.HasMetaDataKey(tag):
                header[key] = reader.GetMetaData(tag).strip()
        headers.append(header)
    return headers


def _numbers(text: str, count: int) -> np.ndarray | None:
    try:
        values = np.array([float(v) for v in text.split("\\")])
    except ValueError:
        return None
    return values if values.size == count and np.isfinite(values).all() else None


def check_dicom_slices(folder: Path, series_id: str, files: Sequence[str], spacing: bool = True) -> None:
    """Refuse a series whose slices differ in size or (``spacing``) are not evenly spaced (a missing or
    duplicated file): ITK would stack them at one assumed spacing and misplace every slice after it."""
    headers = _slice_headers(files)
    sizes = sorted({h.get("size", "unreadable") for h in headers})
    if len(sizes) > 1:
        raise InputError(
            f"{folder}: DICOM series {series_id} mixes slice sizes {sizes}; its files are not one volume"
        )
    if not spacing or len(headers) < 3:
        return
    orientation = _numbers(headers[0].get("orientation", ""), 6)
    positions = [_numbers(h.get("position", ""), 3) for h in headers]
    if orientation is None or any(position is None for position in positions):
        return  # no geometry to check against; ITK falls back to its own defaults
    normal = np.cross(orientation[:3], orientation[3:])
    heights = np.sort(np.array([float(np.dot(position, normal)) for position in positions]))
    steps = np.diff(heights)
    step = float(np.median(steps))
    tolerance = max(0.01, 0.01 * abs(step))
    irregular = np.flatnonzero(np.abs(steps - step) > tolerance)
    if step <= tolerance or irregular.size:
        where = irregular[0] if irregular.size else int(np.argmin(steps))
        raise InputError(
            f"{folder}: DICOM series {series_id} is not evenly spaced: slices at {heights[where]:.2f} and "
            f"{heights[where + 1]:.2f} mm are {steps[where]:.2f} mm apart where the series steps "
            f"{step:.2f} mm (a missing or duplicated slice file?); to accept it as it is, read it "
            "yourself (e.g. SimpleITK) and pass the image, or use --allow-slice-gaps"
        )


def dicom_series_image(
    folder: Path, series_id: str | None = None, allow_slice_gaps: bool = False
) -> tuple[sitk.Image, str]:
    """One DICOM series of a folder as a SimpleITK image, and its UID; refuses an empty folder, an
    ambiguous one (listing its series), mixed slice sizes and, unless ``allow_slice_gaps``, uneven
    slice spacing."""
    series = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not series:
        raise InputError(f"{folder}: no DICOM series found in this folder")
    if series_id is None:
        if len(series) > 1:
            listed = "; ".join(_describe_series(folder, s) for s in series)
            raise InputError(
                f"{folder}: holds {len(series)} DICOM series ({listed}); choose one with "
                "dicom_series=<series UID> (CLI: --series <UID>)"
            )
        series_id = series[0]
    elif series_id not in series:
        raise InputError(f"{folder}: has no DICOM series {series_id!r}; it holds {series}")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id)
    check_dicom_slices(folder, series_id, files, spacing=not allow_slice_gaps)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute(), series_id
    except RuntimeError as error:
        raise InputError(f"{folder}: DICOM series {series_id} cannot be read ({itk_reason(error)})") from None


def read_dicom_folder(folder: Path, series_id: str | None = None) -> tuple[np.ndarray, ImageGeometry]:
    """Read one DICOM series from a folder (see :func:`dicom_series_image`) as an array and geometry."""
    image, series_id = dicom_series_image(folder, series_id)
    return sitk_to_array(image, f"{folder} (DICOM series {series_id})")


def _from_nibabel(image: Any, where: str) -> tuple[np.ndarray, ImageGeometry]:
    """nibabel stores (x, y, z) arrays and a RAS affine; ITK/SimpleITK use (z, y, x) arrays and LPS."""
    data = np.asanyarray(image.dataobj)
    if data.dtype.fields is not None:
        raise InputError(f"{where}: has structured (e.g. RGB) voxels; expected a scalar image")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise InputError(f"{where}: is a {data.ndim}D image; expected a 3D volume")
    affine = np.asarray(image.affine, dtype=np.float64)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    matrix = ras_to_lps @ affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    if not np.isfinite(matrix).all() or (spacing == 0).any():
        raise InputError(f"{where}: its affine {affine[:3, :3].tolist()} has a zero or non-finite axis")
    direction = matrix / spacing
    origin = ras_to_lps @ affine[:3, 3]
    geometry = ImageGeometry(
        tuple(float(v) for v in spacing),
        tuple(float(v) for v in origin),
        tuple(float(v) for v in direction.ravel()),
    )
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0)), dtype=np.float32), geometry


def _spacing(value: Any, where: str) -> tuple[float, float, float]:
    try:
        spacing = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        spacing = ()
    if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise InputError(f"{where}: spacing must be three positive numbers in (x, y, z) order, got {value!r}")
    return spacing  # type: ignore[return-value]


def _from_array(array: Any, spatial: Any, where: str = "array") -> tuple[np.ndarray, ImageGeometry]:
    data = np.asarray(array)
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool) or np.iscomplexobj(data):
        raise InputError(f"{where}: expected a real-valued numeric array, got dtype {data.dtype}")
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise InputError(f"{where}: is a {data.ndim}D array; expected a 3D volume in (z, y, x) order")
    geometry = (
        spatial if isinstance(spatial, ImageGeometry) else ImageGeometry(spacing=_spacing(spatial, where))
    )
    return data.astype(np.float32, copy=False), geometry


def load_input(
    source: Any, spacing: Sequence[float] | None = None, dicom_series: str | None = None
) -> LoadedImage:
    """Read ``source`` into a :class:`LoadedImage` (see the module docstring for what is accepted).

    Numpy input is in SimpleITK axis order (z, y, x) with ``spacing`` in (x, y, z) order: pass
    ``(array, spacing)`` or ``array`` with ``spacing=``.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        name = case_name(path)
        if not path.exists():
            raise InputError(f"{path}: file or folder does not exist")
        array, geometry = read_dicom_folder(path, dicom_series) if path.is_dir() else read_image(path)
        where = str(path)
    elif isinstance(source, sitk.Image):
        name = where = "SimpleITK image"
        array, geometry = sitk_to_array(source, where)
    elif _is_nibabel_image(source):
        filename = source.get_filename() if hasattr(source, "get_filename") else None
        name = case_name(filename) if filename else "nibabel image"
        where = filename or "nibabel image"
        array, geometry = _from_nibabel(source, where)
    elif isinstance(source, tuple | list) and len(source) == 2 and spacing is None:
        name = where = "array"
        array, geometry = _from_array(source[0], source[1])
    elif isinstance(source, np.ndarray):
        if spacing is None:
            raise InputError(
                "array: a numpy array needs its spacing; pass (array, (sx, sy, sz)) with the array in "
                "(z, y, x) order and the spacing in (x, y, z) order"
            )
        name = where = "array"
        array, geometry = _from_array(source, spacing)
    else:
        raise InputError(
            f"cannot segment a {type(source).__name__}; give a path, a DICOM folder, a SimpleITK image, "
            "a nibabel image or (array, spacing)"
        )
    if array.size == 0:
        raise InputError(f"{where}: the image is empty (shape {array.shape})")
    check_direction(geometry.direction, where)
    if not np.isfinite(array).all():
        raise InputError(f"{where}: contains non-finite voxel values (NaN or inf)")
    return LoadedImage(array, geometry, name)
