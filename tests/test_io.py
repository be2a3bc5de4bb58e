"""Tests for mpcl.io: geometry-preserving image round trips, readable errors, atomic writes."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import SimpleITK as sitk

from mpcl.errors import InputError, OutputError
from mpcl.io import ImageGeometry, atomic_output, read_image, write_atomically, write_image


def _oblique_direction() -> tuple[float, ...]:
    """A proper rotation (det +1) about a tilted axis: no entry is 0 or 1."""
    def rx(a):
        return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])

    def ry(a):
        return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])

    def rz(a):
        return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])

    rotation = rz(math.radians(50)) @ ry(math.radians(-35)) @ rx(math.radians(20))
    assert np.allclose(rotation @ rotation.T, np.eye(3)) and np.linalg.det(rotation) == pytest.approx(1.0)
    assert np.all(np.abs(rotation) > 0.05)
    return tuple(float(v) for v in rotation.ravel())


GEOMETRY = ImageGeometry(spacing=(0.7, 1.3, 4.5), origin=(-12.5, 33.25, 7.0), direction=_oblique_direction())


def _volume() -> np.ndarray:
    return np.random.default_rng(0).normal(100.0, 30.0, size=(5, 6, 7)).astype(np.float32)


def test_round_trip_mha_is_exact(tmp_path):
    array = _volume()
    path = write_image(array, GEOMETRY, tmp_path / "case.mha")
    assert path == tmp_path / "case.mha"
    read_back, geometry = read_image(path)
    assert read_back.dtype == np.float32
    assert read_back.shape == (5, 6, 7)
    np.testing.assert_array_equal(read_back, array)
    assert geometry.spacing == GEOMETRY.spacing
    assert geometry.origin == GEOMETRY.origin
    assert geometry.direction == GEOMETRY.direction


def test_round_trip_nifti_keeps_geometry(tmp_path):
    """NIfTI stores geometry as float32 (sform/qform), so it is exact only to float32 precision."""
    array = _volume()
    read_back, geometry = read_image(write_image(array, GEOMETRY, tmp_path / "case.nii.gz"))
    np.testing.assert_array_equal(read_back, array)
    np.testing.assert_allclose(geometry.spacing, GEOMETRY.spacing, rtol=1e-6, atol=0)
    np.testing.assert_allclose(geometry.origin, GEOMETRY.origin, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(geometry.direction, GEOMETRY.direction, rtol=0, atol=1e-6)
    # the array axis order is (z, y, x): SimpleITK's size is (x, y, z)
    image = sitk.ReadImage(str(tmp_path / "case.nii.gz"))
    assert image.GetSize() == (7, 6, 5)


def test_integer_array_round_trip(tmp_path):
    labels = np.random.default_rng(1).integers(0, 4, size=(3, 4, 5)).astype(np.uint8)
    read_back, _ = read_image(write_image(labels, ImageGeometry(), tmp_path / "label.nii.gz"))
    assert read_back.dtype == np.float32  # readers always give float32
    np.testing.assert_array_equal(read_back, labels.astype(np.float32))


def test_write_refuses_non_3d_array(tmp_path):
    with pytest.raises(InputError, match="3D"):
        write_image(np.zeros((4, 4), np.float32), ImageGeometry(), tmp_path / "flat.nii.gz")
    assert not (tmp_path / "flat.nii.gz").exists()


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_2d_image_is_read_as_one_slice_volume(tmp_path, suffix):
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 2.0))
    image.SetOrigin((3.0, -4.0))
    path = tmp_path / f"flat{suffix}"
    sitk.WriteImage(image, str(path))
    volume, geometry = read_image(path)
    assert volume.shape == (1, 3, 4)
    np.testing.assert_array_equal(volume[0], array)
    assert geometry.spacing[:2] == (0.5, 2.0)
    assert geometry.origin[:2] == (3.0, -4.0)
    assert len(geometry.direction) == 9


def test_vector_image_is_refused(tmp_path):
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 3), np.float32), isVector=True), str(path))
    with pytest.raises(InputError, match="components") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_corrupt_file_raises_input_error_naming_it(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(np.random.default_rng(2).integers(0, 256, size=512, dtype=np.uint8).tobytes())
    with pytest.raises(InputError) as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert "cannot be read" in str(info.value)


def test_missing_file_raises_input_error_naming_it(tmp_path):
    path = tmp_path / "nowhere" / "absent.nii.gz"
    with pytest.raises(InputError, match="does not exist") as info:
        read_image(path)
    assert str(path) in str(info.value)


class _WriterFailed(RuntimeError):
    pass


def _failing_writer(temporary):
    temporary.write_bytes(b"half a file")
    raise _WriterFailed("disk full")


def test_failed_write_leaves_no_target_and_no_temporary(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(_WriterFailed):
        write_atomically(target, _failing_writer)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_target(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old content")
    with pytest.raises(_WriterFailed):
        write_atomically(target, _failing_writer)
    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_successful_write_replaces_the_old_target(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old content")
    seen = []

    def write(temporary):
        seen.append(temporary)
        assert temporary.parent == tmp_path  # same folder, so the rename is atomic
        assert temporary != target
        assert temporary.name.endswith("out.bin")  # keeps the suffix for writers choosing by extension
        assert target.read_bytes() == b"old content"  # untouched while writing
        temporary.write_bytes(b"new content")

    assert write_atomically(target, write) == target
    assert target.read_bytes() == b"new content"
    assert not seen[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_write_image_failure_keeps_old_image(tmp_path, monkeypatch):
    target = tmp_path / "case.nii.gz"
    old = _volume()
    write_image(old, GEOMETRY, target)

    def broken_write(*args, **kwargs):
        raise RuntimeError("simulated writer crash")

    monkeypatch.setattr(sitk, "WriteImage", broken_write)
    with pytest.raises(OutputError, match="case.nii.gz: cannot be written .*simulated"):
        write_image(np.zeros_like(old), GEOMETRY, target)
    monkeypatch.undo()
    np.testing.assert_array_equal(read_image(target)[0], old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz"]


def test_atomic_output_creates_missing_parent_folders(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    with atomic_output(target) as temporary:
        temporary.write_text("hello")
        assert not target.exists()
    assert target.read_text() == "hello"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_written_file_permissions_follow_umask(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    if umask & 0o066 == 0o066:
        pytest.skip("umask already hides the file from group and others; cannot tell the difference")
    target = write_atomically(tmp_path / "out.txt", lambda temporary: temporary.write_text("x"))
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_two_file_formats_are_refused_and_leave_nothing(tmp_path):
    # .mhd/.hdr write a second data file beside the header, which a rename cannot move atomically
    with pytest.raises(InputError, match=r"case.mhd: two-file formats"):
        write_image(_volume(), ImageGeometry(), tmp_path / "case.mhd")
    assert list(tmp_path.iterdir()) == []
