"""Tests for mpcl.training.data.acdc on a tiny fake SSL4MIS tree, plus a few real files when present."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from mpcl.errors import InputError
from mpcl.training.config import ACDC_PATIENTS_TO_SLICES, DataConfig
from mpcl.training.data.acdc import (
    ACDC_CLASS_NAMES,
    LazyVolumes,
    labeled_slice_count,
    load_acdc,
    read_h5_case,
)
from mpcl.training.data.loading import load_data

REAL_ACDC = Path(__file__).resolve().parents[2] / "shared/data/acdc"


def _write_h5(path: Path, **datasets) -> None:
    with h5py.File(path, "w") as handle:
        for key, value in datasets.items():
            handle.create_dataset(key, data=value)


def _slice_name(i: int) -> str:
    # deliberately not sorted, so "list order" differs from name order
    return f"patient{(i * 7) % 13 + 1:03d}_frame01_slice_{i}"


def make_fake_acdc(root: Path, n_slices: int = 6, n_val: int = 2, n_test: int = 1, hw=(8, 10)) -> dict:
    """Fake SSL4MIS ACDC tree: data/slices/*.h5 (image HxW float32, label HxW uint8), data/*.h5 volumes."""
    rng = np.random.default_rng(n_slices)
    slices_dir = root / "data" / "slices"
    slices_dir.mkdir(parents=True)
    names = [_slice_name(i) for i in range(n_slices)]
    images, labels = {}, {}
    for i, name in enumerate(names):
        image = rng.random(hw).astype(np.float32)
        label = rng.integers(0, 4, size=hw).astype(np.uint8)
        image[0, 0] = i  # makes every slice recognisable
        images[name], labels[name] = image, label
        _write_h5(slices_dir / f"{name}.h5", image=image, label=label)
    volumes = [f"patient{900 + i:03d}_frame01" for i in range(n_val + n_test)]
    for j, name in enumerate(volumes):
        depth = 3 + j
        _write_h5(root / "data" / f"{name}.h5",
                  image=rng.random((depth, *hw)).astype(np.float32),
                  label=rng.integers(0, 4, size=(depth, *hw)).astype(np.uint8))
    (root / "train_slices.list").write_text("\n".join(names) + "\n")
    (root / "val.list").write_text("\n".join(volumes[:n_val]) + "\n")
    (root / "test.list").write_text("\n".join(volumes[n_val:]) + "\n")
    return {"names": names, "images": images, "labels": labels,
            "val": volumes[:n_val], "test": volumes[n_val:]}


def _config(root: Path, **kwargs) -> DataConfig:
    return DataConfig(kind="acdc", root=str(root), **kwargs)


def test_labeled_slices_are_the_first_lines_in_list_order(tmp_path):
    fake = make_fake_acdc(tmp_path, n_slices=6)
    data = load_acdc(_config(tmp_path, labeled_slices=2))
    assert [s.name for s in data.labeled] == fake["names"][:2]
    assert [s.name for s in data.unlabeled] == fake["names"][2:]
    for item in data.labeled:
        assert item.image.dtype == np.float32 and item.image.shape == (8, 10)
        assert item.label is not None and item.label.dtype == np.uint8
        np.testing.assert_array_equal(item.image, fake["images"][item.name])
        np.testing.assert_array_equal(item.label, fake["labels"][item.name])
    for item in data.unlabeled:
        assert item.label is None
        np.testing.assert_array_equal(item.image, fake["images"][item.name])
    assert data.class_names == ACDC_CLASS_NAMES
    assert data.num_classes == 4
    assert data.normalization == {"scheme": "minmax"}
    assert len(data.val_volumes) == 2 and len(data.test_volumes) == 1


def test_unlabelled_slice_labels_are_never_read(tmp_path):
    """An unlabelled slice may lack 'label' or carry a bad one: it is never read."""
    fake = make_fake_acdc(tmp_path, n_slices=4)
    path = tmp_path / "data" / "slices" / f"{fake['names'][3]}.h5"
    _write_h5(path, image=np.zeros((8, 10), np.float32))
    data = load_acdc(_config(tmp_path, labeled_slices=3))
    assert [s.name for s in data.unlabeled] == [fake["names"][3]]
    assert data.unlabeled[0].label is None


def test_labeled_patients_mapping():
    assert ACDC_PATIENTS_TO_SLICES[3] == 68
    assert ACDC_PATIENTS_TO_SLICES[7] == 136
    assert labeled_slice_count(DataConfig(labeled_patients=3)) == ACDC_PATIENTS_TO_SLICES[3] == 68
    assert labeled_slice_count(DataConfig(labeled_patients=7)) == 136
    assert labeled_slice_count(DataConfig()) == 68  # the default protocol: 3 patients
    assert labeled_slice_count(DataConfig(labeled_slices=5, labeled_patients=7)) == 5  # explicit wins


def test_labeled_patients_3_loads_68_slices(tmp_path):
    fake = make_fake_acdc(tmp_path, n_slices=70, n_val=1, n_test=1, hw=(4, 4))
    data = load_acdc(_config(tmp_path, labeled_patients=3))
    assert len(data.labeled) == ACDC_PATIENTS_TO_SLICES[3] == 68
    assert [s.name for s in data.labeled] == fake["names"][:68]
    assert [s.name for s in data.unlabeled] == fake["names"][68:]


@pytest.mark.parametrize("count", [0, 7])
def test_labeled_count_outside_the_list_raises(tmp_path, count):
    make_fake_acdc(tmp_path, n_slices=6)
    with pytest.raises(InputError, match=f"asked for {count} labelled slices") as info:
        load_acdc(_config(tmp_path, labeled_slices=count))
    assert "train_slices.list" in str(info.value)


def test_load_data_dispatches_to_acdc(tmp_path):
    make_fake_acdc(tmp_path, n_slices=3)
    data = load_data(_config(tmp_path, labeled_slices=1))
    assert len(data.labeled) == 1 and len(data.unlabeled) == 2


def test_missing_data_root(tmp_path):
    root = tmp_path / "no_such_acdc"
    with pytest.raises(InputError, match="does not exist") as info:
        load_acdc(_config(root, labeled_slices=1))
    assert str(root) in str(info.value)


def test_list_naming_a_missing_slice(tmp_path):
    fake = make_fake_acdc(tmp_path, n_slices=4)
    missing = tmp_path / "data" / "slices" / f"{fake['names'][2]}.h5"
    missing.unlink()
    with pytest.raises(InputError, match="does not exist") as info:
        load_acdc(_config(tmp_path, labeled_slices=1))
    assert str(missing) in str(info.value)


def test_labelled_slice_without_label_key(tmp_path):
    fake = make_fake_acdc(tmp_path, n_slices=4)
    path = tmp_path / "data" / "slices" / f"{fake['names'][1]}.h5"
    _write_h5(path, image=np.zeros((8, 10), np.float32))
    with pytest.raises(InputError, match="missing key") as info:
        load_acdc(_config(tmp_path, labeled_slices=2))
    assert str(path) in str(info.value)
    assert "label" in str(info.value)


@pytest.mark.parametrize("bad_value", [4, 255])
def test_label_values_outside_class_range(tmp_path, bad_value):
    fake = make_fake_acdc(tmp_path, n_slices=4)
    path = tmp_path / "data" / "slices" / f"{fake['names'][0]}.h5"
    label = np.zeros((8, 10), np.uint8)
    label[3, 3] = bad_value
    _write_h5(path, image=np.zeros((8, 10), np.float32), label=label)
    with pytest.raises(InputError, match="outside the class range 0..3") as info:
        load_acdc(_config(tmp_path, labeled_slices=2))
    assert str(path) in str(info.value)


def test_negative_label_values(tmp_path):
    path = tmp_path / "neg.h5"
    _write_h5(path, image=np.zeros((4, 4), np.float32), label=np.full((4, 4), -1, np.int16))
    with pytest.raises(InputError, match="outside the class range") as info:
        read_h5_case(path, 4, ndim=2, with_label=True)
    assert str(path) in str(info.value)


def test_fractional_label_values_are_refused_not_truncated(tmp_path):
    path = tmp_path / "frac.h5"
    _write_h5(path, image=np.zeros((4, 4), np.float32), label=np.full((4, 4), 2.7, np.float32))
    with pytest.raises(InputError, match="non-integer values") as info:
        read_h5_case(path, 4, ndim=2, with_label=True)
    assert str(path) in str(info.value)


def test_image_label_shape_mismatch(tmp_path):
    fake = make_fake_acdc(tmp_path, n_slices=4)
    path = tmp_path / "data" / "slices" / f"{fake['names'][1]}.h5"
    _write_h5(path, image=np.zeros((8, 10), np.float32), label=np.zeros((10, 8), np.uint8))
    with pytest.raises(InputError, match="differs from 'image' shape") as info:
        load_acdc(_config(tmp_path, labeled_slices=2))
    assert str(path) in str(info.value)


def test_slice_with_wrong_number_of_dimensions(tmp_path):
    fake = make_fake_acdc(tmp_path, n_slices=3)
    path = tmp_path / "data" / "slices" / f"{fake['names'][2]}.h5"
    _write_h5(path, image=np.zeros((2, 8, 10), np.float32))
    with pytest.raises(InputError, match="expected 2 dimensions") as info:
        load_acdc(_config(tmp_path, labeled_slices=1))
    assert str(path) in str(info.value)


def test_non_finite_image(tmp_path):
    fake = make_fake_acdc(tmp_path, n_slices=3)
    path = tmp_path / "data" / "slices" / f"{fake['names'][0]}.h5"
    image = np.zeros((8, 10), np.float32)
    image[1, 1] = np.nan
    _write_h5(path, image=image, label=np.zeros((8, 10), np.uint8))
    with pytest.raises(InputError, match="NaN") as info:
        load_acdc(_config(tmp_path, labeled_slices=1))
    assert str(path) in str(info.value)


def test_corrupt_slice_file(tmp_path):
    fake = make_fake_acdc(tmp_path, n_slices=3)
    path = tmp_path / "data" / "slices" / f"{fake['names'][2]}.h5"
    path.write_bytes(b"this is not an HDF5 file" * 20)
    with pytest.raises(InputError, match="not a readable HDF5 file") as info:
        load_acdc(_config(tmp_path, labeled_slices=1))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("list_name", ["train_slices.list", "val.list", "test.list"])
def test_missing_list_file(tmp_path, list_name):
    make_fake_acdc(tmp_path, n_slices=3)
    (tmp_path / list_name).unlink()
    with pytest.raises(InputError, match="list file does not exist") as info:
        load_acdc(_config(tmp_path, labeled_slices=1))
    assert str(tmp_path / list_name) in str(info.value)


def test_val_list_naming_a_missing_volume(tmp_path):
    fake = make_fake_acdc(tmp_path, n_slices=3)
    path = tmp_path / "data" / f"{fake['val'][1]}.h5"
    path.unlink()
    with pytest.raises(InputError, match="volume named in the split list does not exist") as info:
        load_acdc(_config(tmp_path, labeled_slices=1))
    assert str(path) in str(info.value)


def test_validation_volumes_are_read_lazily(tmp_path):
    fake = make_fake_acdc(tmp_path, n_slices=3, n_val=2)
    data = load_acdc(_config(tmp_path, labeled_slices=1))
    assert isinstance(data.val_volumes, LazyVolumes)
    corrupt = tmp_path / "data" / f"{fake['val'][1]}.h5"
    corrupt.write_bytes(b"\x00garbage" * 64)  # made corrupt AFTER load_acdc returned
    assert len(data.val_volumes) == 2  # no read needed
    first = data.val_volumes[0]
    assert first.name == fake["val"][0]
    assert first.image.shape == (3, 8, 10) and first.image.dtype == np.float32
    assert first.label is not None and first.label.shape == (3, 8, 10) and first.label.dtype == np.uint8
    with pytest.raises(InputError, match="not a readable HDF5 file") as info:
        data.val_volumes[1]
    assert str(corrupt) in str(info.value)
    with pytest.raises(InputError):
        data.val_volumes[0:2]  # slicing reads every volume in the slice
    assert [v.name for v in data.val_volumes[0:1]] == [fake["val"][0]]
    assert data.test_volumes[-1].name == fake["test"][0]


def test_lazy_volumes_reread_each_time(tmp_path):
    fake = make_fake_acdc(tmp_path, n_slices=2, n_val=1, n_test=0)
    volumes = LazyVolumes(tmp_path, fake["val"], num_classes=4)
    before = volumes[0]
    path = tmp_path / "data" / f"{fake['val'][0]}.h5"
    _write_h5(path, image=np.ones((2, 8, 10), np.float32), label=np.ones((2, 8, 10), np.uint8))
    after = volumes[0]
    assert before.image.shape == (3, 8, 10)
    assert after.image.shape == (2, 8, 10)
    np.testing.assert_array_equal(after.label, 1)


@pytest.mark.skipif(not REAL_ACDC.is_dir(), reason=f"real ACDC data not found at {REAL_ACDC}")
def test_real_acdc_files():
    """Reads two real training slices and one real validation volume (no copy, no full load)."""
    names = (REAL_ACDC / "train_slices.list").read_text().split()[:2]
    assert len(names) == 2
    for name in names:
        image, label = read_h5_case(REAL_ACDC / "data" / "slices" / f"{name}.h5", 4, ndim=2, with_label=True)
        assert image.ndim == 2 and image.dtype == np.float32
        assert label is not None and label.shape == image.shape and label.dtype == np.uint8
        assert int(label.max()) <= 3
        assert -1e-4 <= float(image.min()) and float(image.max()) <= 1 + 1e-4  # min-max scaled per volume
    val_name = (REAL_ACDC / "val.list").read_text().split()[0]
    volumes = LazyVolumes(REAL_ACDC, [val_name], num_classes=4)
    assert len(volumes) == 1
    volume = volumes[0]
    assert volume.name == val_name
    assert volume.image.ndim == 3 and volume.image.dtype == np.float32
    assert volume.label is not None and volume.label.shape == volume.image.shape
    assert volume.label.dtype == np.uint8
    assert set(np.unique(volume.label).tolist()) <= {0, 1, 2, 3}
    assert int(volume.label.max()) > 0  # a validation volume has foreground
