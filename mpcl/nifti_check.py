"""Check a NIfTI file's voxel data ourselves, because ITK's reader is silent about two faults.

SimpleITK reads a ``.nii``/``.nii.gz`` whose voxel data was cut short with the missing voxels as zeros,
and turns NaN/inf voxels into 0. Both would be segmented as if they were a real scan. This module
streams the voxel bytes once (decompressing if needed), counts them against what the header promises and
checks floating-point voxels are finite. The same check verifies a NIfTI file we have just written,
since ITK's writer only prints a warning when the disk fills up.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_CHUNK_BYTES = 1 << 22


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _header(path: str) -> tuple[int, int, np.dtype] | str:
    """(voxel offset, expected voxel bytes, on-disk dtype) from the header, or what is wrong with it."""
    import nibabel

    try:
        header = nibabel.load(path).header
        shape = header.get_data_shape()
        dtype = header.get_data_dtype()
        offset = int(header.get("vox_offset", 352))
    except (OSError, EOFError, ValueError, zlib.error, nibabel.filebasedimages.ImageFileError) as error:
        return f"its NIfTI header cannot be read ({error})"
    return offset, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, dtype


def nifti_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with the voxel data of a NIfTI file (truncated, non-finite), or None if nothing."""
    path = str(path)
    parsed = _header(path)
    if isinstance(parsed, str):
        return parsed
    offset, expected, dtype = parsed
    check_finite = dtype.kind in "fc"
    found, finite = 0, True
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            skipped = len(handle.read(offset))
            if skipped < offset:
                return f"is truncated (it ends inside its header, before the voxel data at byte {offset})"
            leftover = b""
            while found < expected:
                block = handle.read(min(_CHUNK_BYTES, expected - found))
                if not block:
                    break
                found += len(block)
                if check_finite:
                    block = leftover + block
                    usable = len(block) - len(block) % dtype.itemsize
                    values = np.frombuffer(block[:usable], dtype=dtype)
                    finite = finite and bool(np.isfinite(values).all())
                    leftover = block[usable:]
    except (OSError, EOFError, zlib.error) as error:
        return f"is truncated or corrupt ({error}; {found} of {expected} bytes of voxel data read)"
    if found < expected:
        return f"is truncated (expected {expected} bytes of voxel data, found {found})"
    if not finite:
        return "contains non-finite voxel values (NaN or inf)"
    return None
