"""The built-in cardiac phantom: deterministic, anatomically sane, and heterogeneous inside each class."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import ndimage

from mpcl.training.data.base import SegmentationData, Slice2D, Volume
from mpcl.training.data.phantom import (
    CLASS_NAMES,
    LV,
    MYO,
    RV,
    PhantomSpec,
    make_phantom_data,
    make_phantom_volume,
    phantom_volume_seed,
)

SEEDS = range(6)
EIGHT = np.ones((3, 3), dtype=bool)  # 8-connected one-pixel dilation


def mid_slices(depth: int) -> range:
    """Slices away from base and apex, where every class and both sub-regions must be present."""
    return range(depth // 4, depth - depth // 4)


@pytest.fixture(scope="module")
def volumes() -> list[tuple[Volume, np.ndarray]]:
    return [make_phantom_volume(seed) for seed in SEEDS]


def test_same_seed_gives_byte_identical_arrays():
    (a, sub_a), (b, sub_b) = make_phantom_volume(11), make_phantom_volume(11)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    assert sub_a.tobytes() == sub_b.tobytes()


def test_different_seeds_differ_in_image_and_anatomy():
    (a, _), (b, _) = make_phantom_volume(1), make_phantom_volume(2)
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.label, b.label)


def test_generation_does_not_touch_global_rng():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    make_phantom_volume(0)
    assert np.random.rand() == expected


def test_shapes_dtypes_and_value_ranges(volumes):
    spec = PhantomSpec()
    for vol, sub in volumes:
        shape = (spec.slices_per_volume, *spec.size)
        assert vol.image.shape == vol.label.shape == sub.shape == shape
        assert vol.image.dtype == np.float32 and vol.label.dtype == np.uint8 and sub.dtype == np.uint8
        assert vol.image.min() == 0.0 and vol.image.max() == 1.0  # min-max over the volume
        assert set(np.unique(vol.label)) <= {0, 1, 2, 3}
        assert set(np.unique(sub)) <= {0, 1}
        assert not sub[vol.label == 0].any()
        assert vol.spacing == spec.spacing
        for z in mid_slices(vol.image.shape[0]):
            assert set(np.unique(vol.label[z])) == {0, 1, 2, 3}, f"{vol.name} slice {z}"


def test_custom_size_and_depth_are_honoured():
    spec = PhantomSpec(size=[48, 64], slices_per_volume=4, spacing=[1.0, 1.0, 5.0])
    vol, sub = make_phantom_volume(3, spec)
    assert vol.image.shape == vol.label.shape == sub.shape == (4, 48, 64)
    assert vol.spacing == (1.0, 1.0, 5.0)
    for z in mid_slices(4):
        assert set(np.unique(vol.label[z])) == {0, 1, 2, 3}


@pytest.mark.parametrize("size,depth", [((128, 128), 8), ((48, 48), 4)])
def test_lv_is_enclosed_by_myocardium_and_rv_touches_only_myocardium(size, depth):
    spec = PhantomSpec(size=size, slices_per_volume=depth)
    for seed in SEEDS:
        vol, _ = make_phantom_volume(seed, spec)
        for z in mid_slices(depth):
            label = vol.label[z]
            lv, rv = label == LV, label == RV
            grown_lv = ndimage.binary_dilation(lv, EIGHT)
            assert np.isin(label[grown_lv], [MYO, LV]).all(), f"seed {seed} slice {z}: LV leaks"
            grown_rv = ndimage.binary_dilation(rv, EIGHT)
            assert (grown_rv & (label == MYO)).any(), f"seed {seed} slice {z}: RV detached"
            assert not (grown_rv & lv).any(), f"seed {seed} slice {z}: RV touches LV"


def test_lv_shrinks_from_base_to_apex(volumes):
    for vol, _ in volumes:
        area = (vol.label == LV).sum(axis=(1, 2))
        assert np.all(np.diff(area) <= 0), area
        assert area[-1] < 0.5 * area[0], area


def _subregion_gaps(vol: Volume, sub: np.ndarray) -> list[tuple[int, int, float, float]]:
    """(slice, class, mean(sub 1) - mean(sub 0), smaller sub-region fraction) on mid slices."""
    out = []
    for z in mid_slices(vol.image.shape[0]):
        for cls in (RV, MYO, LV):
            mask = vol.label[z] == cls
            bright, dark = mask & (sub[z] == 1), mask & (sub[z] == 0)
            fraction = min(bright.sum(), dark.sum()) / mask.sum()
            gap = float(vol.image[z][bright].mean() - vol.image[z][dark].mean()) if fraction > 0 else 0.0
            out.append((z, cls, gap, fraction))
    return out


def test_every_class_has_two_distinct_intensity_subregions(volumes):
    for vol, sub in volumes:
        for z, cls, gap, fraction in _subregion_gaps(vol, sub):
            where = f"{vol.name} slice {z} class {CLASS_NAMES[cls]}"
            assert fraction >= 0.05, f"{where}: sub-region fraction {fraction:.3f}"
            assert gap >= 0.1, f"{where}: sub-region gap {gap:.3f} on the noisy image"


def test_noise_free_subregions_differ_by_at_least_015():
    for seed in SEEDS:
        noisy, sub_noisy = make_phantom_volume(seed)
        clean, sub_clean = make_phantom_volume(seed, PhantomSpec(noise_std=0.0))
        # Noise is drawn last, so the anatomy is the same and only the noise differs.
        assert np.array_equal(noisy.label, clean.label) and np.array_equal(sub_noisy, sub_clean)
        for z, cls, gap, _ in _subregion_gaps(clean, sub_clean):
            assert gap >= 0.15, f"seed {seed} slice {z} class {CLASS_NAMES[cls]}: gap {gap:.3f}"


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(array.tobytes()).hexdigest()


def test_default_data_splits_are_complete_and_disjoint():
    data = make_phantom_data(seed=0)
    depth = PhantomSpec().slices_per_volume
    assert isinstance(data, SegmentationData)
    assert data.class_names == ["background", "RV", "myocardium", "LV"] and data.num_classes == 4
    assert data.normalization == {"scheme": "minmax"}
    assert len(data.labeled) == 8 * depth and len(data.unlabeled) == 24 * depth
    assert len(data.val_volumes) == 2 and len(data.test_volumes) == 2
    assert all(isinstance(s, Slice2D) and s.label is not None for s in data.labeled)
    assert all(s.label.dtype == np.uint8 and s.label.shape == s.image.shape for s in data.labeled)
    assert all(s.label is None for s in data.unlabeled)
    assert all(s.image.dtype == np.float32 and s.image.shape == PhantomSpec().size for s in data.labeled)
    eval_volumes = data.val_volumes + data.test_volumes
    assert all(v.label is not None and v.label.shape == v.image.shape for v in eval_volumes)
    assert data.labeled[0].name == "phantom_s0_v000_slice_0"
    assert data.unlabeled[0].name == "phantom_s0_v008_slice_0"

    def volume_ids(slices: list[Slice2D]) -> set[str]:
        return {s.name.rsplit("_slice_", 1)[0] for s in slices}

    splits = {
        "labeled": volume_ids(data.labeled),
        "unlabeled": volume_ids(data.unlabeled),
        "val": {v.name for v in data.val_volumes},
        "test": {v.name for v in data.test_volumes},
    }
    assert [len(v) for v in splits.values()] == [8, 24, 2, 2]
    names = [n for ids in splits.values() for n in ids]
    assert len(set(names)) == len(names)
    # Content check, not only names: no image slice appears in two splits.
    contents = {
        "labeled": {_digest(s.image) for s in data.labeled},
        "unlabeled": {_digest(s.image) for s in data.unlabeled},
        "val": {_digest(z) for v in data.val_volumes for z in v.image},
        "test": {_digest(z) for v in data.test_volumes for z in v.image},
    }
    keys = list(contents)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not contents[a] & contents[b], f"{a} and {b} share slices"


def test_data_is_deterministic_and_seed_dependent():
    small = {"n_labeled": 1, "n_unlabeled": 1, "n_val": 1, "n_test": 1}
    a, b, c = make_phantom_data(5, **small), make_phantom_data(5, **small), make_phantom_data(6, **small)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a.labeled, b.labeled, strict=True))
    assert np.array_equal(a.test_volumes[0].image, b.test_volumes[0].image)
    assert not np.array_equal(a.labeled[0].image, c.labeled[0].image)
    # Volume i of dataset seed s is exactly make_phantom_volume(phantom_volume_seed(s, i)).
    vol, _ = make_phantom_volume(phantom_volume_seed(5, 3))
    assert np.array_equal(a.test_volumes[0].image, vol.image) and a.test_volumes[0].name == "phantom_s5_v003"


def test_volume_seeds_never_collide_across_dataset_seeds():
    seeds = {phantom_volume_seed(s, i) for s in range(5) for i in range(100)}
    assert len(seeds) == 500


@pytest.mark.parametrize(
    "kwargs",
    [{"size": (16, 16)}, {"slices_per_volume": 0}, {"noise_std": -0.1}, {"spacing": (1.0, 0.0, 1.0)},
     {"contrast_jitter": 0.5}],
)
def test_invalid_spec_is_rejected(kwargs):
    with pytest.raises(ValueError):
        PhantomSpec(**kwargs)


def test_invalid_data_arguments_are_rejected():
    with pytest.raises(ValueError):
        make_phantom_data(n_labeled=-1)
    with pytest.raises(ValueError):
        make_phantom_volume(-1)
