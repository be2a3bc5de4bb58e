"""Tests for mpcl.training.data.nifti_folder on a tiny nnU-Net-style folder made in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mpcl.errors import InputError
from mpcl.training.config import DataConfig
from mpcl.training.data.loading import load_data
from mpcl.training.data.nifti_folder import class_names_from_dataset_json, load_nifti_folder

# (x, y, z) spacing with the thick axis along x: slices must be cut along array axis 2 (the x axis).
SPACING = (6.0, 1.0, 1.0)
ORIGIN = (10.0, -20.0, 5.0)
SHAPE_ZYX = (7, 9, 4)  # 4 slices along x, each (z, y) = (7, 9)
NNUNET_LABELS = {"background": 0, "a": 1, "b": 2}


def _write(array: np.ndarray, path: Path, spacing=SPACING, origin=ORIGIN) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _case_image(index: int, shape=SHAPE_ZYX) -> np.ndarray:
    rng = np.random.default_rng(index)
    image = rng.normal(100.0, 20.0, size=shape).astype(np.float32)
    image[..., 0] += 1000.0 * index  # x slice 0 is recognisable; min-max keeps the ordering
    return image


def _case_label(index: int, shape=SHAPE_ZYX) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[:, :, index % shape[2]] = 1  # one full x slice per case
    label[0, 0, :] = 2
    return label


def make_nnunet_folder(
    root: Path,
    n_cases: int = 4,
    n_unlabelled: int = 0,
    dataset_json: dict | None = None,
) -> list[str]:
    cases = [f"case_{i:03d}" for i in range(n_cases)]
    for i, case in enumerate(cases):
        _write(_case_image(i), root / "imagesTr" / f"{case}_0000.nii.gz")
        _write(_case_label(i), root / "labelsTr" / f"{case}.nii.gz")
    for j in range(n_unlabelled):
        _write(_case_image(100 + j), root / "imagesUnlabelled" / f"extra_{j:03d}_0000.nii.gz")
    (root / "dataset.json").write_text(json.dumps(
        dataset_json if dataset_json is not None else {"name": "toy", "labels": NNUNET_LABELS}
    ))
    return cases


def _config(root: Path, **kwargs) -> DataConfig:
    return DataConfig(kind="nifti_folder", root=str(root), **kwargs)


def test_slices_follow_the_thick_x_axis(tmp_path):
    cases = make_nnunet_folder(tmp_path, n_cases=3)
    data = load_nifti_folder(_config(tmp_path, val_cases=1))
    assert data.class_names == ["background", "a", "b"]
    # 2 training cases x 4 slices along x, each slice (z, y) = (7, 9)
    assert len(data.labeled) == 2 * SHAPE_ZYX[2]
    assert data.unlabeled == []
    for item in data.labeled:
        assert item.image.shape == (SHAPE_ZYX[0], SHAPE_ZYX[1])
        assert item.image.dtype == np.float32
        assert item.label is not None and item.label.dtype == np.uint8
        assert item.label.shape == item.image.shape
        assert item.image.flags["C_CONTIGUOUS"] and item.label.flags["C_CONTIGUOUS"]
    assert [s.name for s in data.labeled[:4]] == [f"{cases[0]}_slice_{x}" for x in range(4)]
    # the slice content is the x-slice of the array: case 1 has label 1 exactly on x index 1
    case1 = [s for s in data.labeled if s.name.startswith(cases[1])]
    expected_label = _case_label(1)
    for x, item in enumerate(case1):
        np.testing.assert_array_equal(item.label, expected_label[:, :, x])
    assert np.all(case1[1].label[1:] == 1) and np.all(case1[0].label[1:] == 0)
    # minmax is per volume: x slice 0 holds the volume's bright voxels
    assert float(case1[0].image.min()) > float(case1[1].image.max())


def test_validation_volumes_are_the_last_cases_with_geometry(tmp_path):
    cases = make_nnunet_folder(tmp_path, n_cases=4)
    data = load_nifti_folder(_config(tmp_path, val_cases=2))
    assert [v.name for v in data.val_volumes] == cases[2:]
    assert not any(s.name.startswith((cases[2], cases[3])) for s in data.labeled + data.unlabeled)
    volume = data.val_volumes[0]
    assert volume.image.shape == SHAPE_ZYX and volume.label is not None and volume.label.shape == SHAPE_ZYX
    assert float(volume.image.min()) == pytest.approx(0.0, abs=1e-6)
    assert float(volume.image.max()) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(volume.spacing, SPACING)
    np.testing.assert_allclose(volume.origin, ORIGIN)
    assert volume.array_spacing == pytest.approx((1.0, 1.0, 6.0))
    np.testing.assert_array_equal(volume.label, _case_label(2))
    assert data.test_volumes == []


def test_labeled_cases_limit_and_rest_unlabelled(tmp_path):
    cases = make_nnunet_folder(tmp_path, n_cases=4)
    data = load_nifti_folder(_config(tmp_path, val_cases=1, labeled_cases=1))
    assert {s.name.rsplit("_slice_", 1)[0] for s in data.labeled} == {cases[0]}
    assert {s.name.rsplit("_slice_", 1)[0] for s in data.unlabeled} == {cases[1], cases[2]}
    assert len(data.labeled) == 4 and len(data.unlabeled) == 8
    assert all(s.label is None for s in data.unlabeled)


def test_unlabelled_labels_are_not_read(tmp_path):
    """A training case beyond labeled_cases may have a broken label: it is never opened."""
    cases = make_nnunet_folder(tmp_path, n_cases=3)
    (tmp_path / "labelsTr" / f"{cases[1]}.nii.gz").write_bytes(b"broken")
    data = load_nifti_folder(_config(tmp_path, val_cases=1, labeled_cases=1))
    assert len(data.unlabeled) == 4


def test_unlabelled_folder_is_read(tmp_path):
    make_nnunet_folder(tmp_path, n_cases=2, n_unlabelled=2)
    data = load_nifti_folder(_config(tmp_path, val_cases=1))
    assert len(data.labeled) == 4
    expected = [f"extra_{j:03d}_slice_{x}" for j in range(2) for x in range(4)]
    assert [s.name for s in data.unlabeled] == expected
    assert all(s.label is None and s.image.shape == (7, 9) for s in data.unlabeled)


def test_test_set_is_read_when_present(tmp_path):
    make_nnunet_folder(tmp_path, n_cases=2)
    _write(_case_image(50), tmp_path / "imagesTs" / "case_900_0000.nii.gz")
    _write(_case_label(50), tmp_path / "labelsTs" / "case_900.nii.gz")
    _write(_case_image(51), tmp_path / "imagesTs" / "case_901_0000.nii.gz")  # no label: skipped
    data = load_nifti_folder(_config(tmp_path, val_cases=1))
    assert [v.name for v in data.test_volumes] == ["case_900"]


def test_msd_style_dataset_json(tmp_path):
    msd_labels = {"0": "background", "1": "liver", "2": "tumour"}
    make_nnunet_folder(tmp_path, n_cases=2, dataset_json={"labels": msd_labels})
    assert class_names_from_dataset_json(tmp_path) == ["background", "liver", "tumour"]
    data = load_nifti_folder(_config(tmp_path, val_cases=1))
    assert data.class_names == ["background", "liver", "tumour"]
    assert len(data.labeled) == 4


def test_nnunet_labels_out_of_order_are_sorted_by_value(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"b": 2, "background": 0, "a": 1}}))
    assert class_names_from_dataset_json(tmp_path) == ["background", "a", "b"]


def test_dataset_json_with_gaps_is_refused(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 2}}))
    with pytest.raises(InputError, match="not 0..N-1") as info:
        class_names_from_dataset_json(tmp_path)
    assert "dataset.json" in str(info.value)


def test_invalid_dataset_json(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON") as info:
        class_names_from_dataset_json(tmp_path)
    assert str(tmp_path / "dataset.json") in str(info.value)


def test_class_names_from_config_override_dataset_json(tmp_path):
    make_nnunet_folder(tmp_path, n_cases=2)
    data = load_data(_config(tmp_path, val_cases=1, class_names=["bg", "x", "y"]))
    assert data.class_names == ["bg", "x", "y"]


@pytest.mark.parametrize(
    ("spacing", "origin", "shape"),
    [
        ((6.0, 1.0, 2.0), ORIGIN, SHAPE_ZYX),  # different spacing
        (SPACING, (10.0, -20.0, 9.0), SHAPE_ZYX),  # different origin
        (SPACING, ORIGIN, (7, 9, 5)),  # different size
    ],
)
def test_label_geometry_must_match_image(tmp_path, spacing, origin, shape):
    cases = make_nnunet_folder(tmp_path, n_cases=3)
    label_path = tmp_path / "labelsTr" / f"{cases[1]}.nii.gz"
    _write(np.zeros(shape, np.uint8), label_path, spacing=spacing, origin=origin)
    with pytest.raises(InputError, match="does not match") as info:
        load_nifti_folder(_config(tmp_path, val_cases=1))
    assert str(label_path) in str(info.value)
    assert f"{cases[1]}_0000.nii.gz" in str(info.value)


@pytest.mark.parametrize("bad_value", [3, 7])
def test_label_values_out_of_range(tmp_path, bad_value):
    cases = make_nnunet_folder(tmp_path, n_cases=2)
    label_path = tmp_path / "labelsTr" / f"{cases[0]}.nii.gz"
    label = _case_label(0)
    label[2, 2, 2] = bad_value
    _write(label, label_path)
    with pytest.raises(InputError, match=r"outside the class range 0\.\.2") as info:
        load_nifti_folder(_config(tmp_path, val_cases=1))
    assert str(label_path) in str(info.value)


def test_non_integer_label_values_are_refused(tmp_path):
    cases = make_nnunet_folder(tmp_path, n_cases=2)
    label_path = tmp_path / "labelsTr" / f"{cases[1]}.nii.gz"  # a validation case
    label = _case_label(1).astype(np.float32)
    label[1, 1, 1] = 0.5
    _write(label, label_path)
    with pytest.raises(InputError, match="outside the class range") as info:
        load_nifti_folder(_config(tmp_path, val_cases=1))
    assert str(label_path) in str(info.value)


def test_missing_label_file(tmp_path):
    cases = make_nnunet_folder(tmp_path, n_cases=3)
    (tmp_path / "labelsTr" / f"{cases[2]}.nii.gz").unlink()
    with pytest.raises(InputError, match="no label for case") as info:
        load_nifti_folder(_config(tmp_path, val_cases=1))
    assert cases[2] in str(info.value)
    assert "labelsTr" in str(info.value)


def test_missing_root(tmp_path):
    root = tmp_path / "absent"
    with pytest.raises(InputError, match="does not exist") as info:
        load_nifti_folder(_config(root))
    assert str(root) in str(info.value)


def test_no_class_names(tmp_path):
    make_nnunet_folder(tmp_path, n_cases=2)
    (tmp_path / "dataset.json").unlink()
    with pytest.raises(InputError, match="class names unknown") as info:
        load_nifti_folder(_config(tmp_path, val_cases=1))
    assert str(tmp_path) in str(info.value)


def test_no_images(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": NNUNET_LABELS}))
    with pytest.raises(InputError, match="no images found") as info:
        load_nifti_folder(_config(tmp_path))
    assert "imagesTr" in str(info.value)


def test_too_few_cases_for_validation(tmp_path):
    make_nnunet_folder(tmp_path, n_cases=2)
    with pytest.raises(InputError, match="cannot leave 2 for validation"):
        load_nifti_folder(_config(tmp_path, val_cases=2))


def test_thick_z_volume_is_sliced_along_array_axis_0(tmp_path):
    """Control for the x-thick tests: the same folder with thick z is cut along the first array axis."""
    for i, case in enumerate(["case_000", "case_001"]):
        _write(_case_image(i), tmp_path / "imagesTr" / f"{case}_0000.nii.gz", spacing=(1.0, 1.0, 5.0))
        _write(_case_label(i), tmp_path / "labelsTr" / f"{case}.nii.gz", spacing=(1.0, 1.0, 5.0))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": NNUNET_LABELS}))
    data = load_nifti_folder(_config(tmp_path, val_cases=1))
    assert len(data.labeled) == SHAPE_ZYX[0]
    assert all(s.image.shape == (SHAPE_ZYX[1], SHAPE_ZYX[2]) for s in data.labeled)
