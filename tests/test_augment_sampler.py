"""Tests for augmentation (affine_to_patch, weak/strong views), the two-stream sampler and batch building."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from mpcl.preprocessing import resize_2d
from mpcl.training.config import AugmentConfig
from mpcl.training.data.augment import affine_to_patch, random_rot90_flip, strong_view, weak_view
from mpcl.training.data.base import Slice2D
from mpcl.training.data.batches import Batch, BatchFactory, prefetch
from mpcl.training.data.sampler import ShuffledStream, TwoStreamSampler


def _image_and_label(hw, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.random(hw).astype(np.float32)
    label = rng.integers(0, 4, size=hw).astype(np.uint8)
    return image, label


# ---------------------------------------------------------------- affine_to_patch


@pytest.mark.parametrize(
    ("in_hw", "out_hw"),
    [((40, 52), (32, 48)), ((24, 24), (16, 16)), ((20, 30), (64, 48)), ((200, 180), (256, 256)),
     ((13, 9), (32, 32)), ((37, 23), (48, 64))],
)
def test_affine_identity_equals_resize(in_hw, out_hw):
    image, label = _image_and_label(in_hw, seed=sum(in_hw))
    image_out, label_out = affine_to_patch(image, label, out_hw, angle_degrees=0.0, scale=1.0)
    assert image_out.shape == out_hw and image_out.dtype == np.float32
    np.testing.assert_allclose(image_out, resize_2d(image, out_hw, order=1), atol=1e-5, rtol=0)
    assert label_out is not None and label_out.dtype == np.uint8
    np.testing.assert_array_equal(label_out, resize_2d(label, out_hw, order=0))


def test_affine_identity_equals_resize_at_float_rounding_sizes():
    image, label = _image_and_label((32, 20), seed=3)
    image += 1.0  # no genuine zeros
    image_out, _ = affine_to_patch(image, label, (16, 16))
    np.testing.assert_allclose(image_out, resize_2d(image, (16, 16), order=1), atol=1e-5, rtol=0)


def test_affine_without_label():
    image, _ = _image_and_label((10, 12))
    image_out, label_out = affine_to_patch(image, None, (16, 16), angle_degrees=15.0, scale=1.1)
    assert image_out.shape == (16, 16)
    assert label_out is None


def test_affine_rotation_by_90_degrees_is_a_rot90():
    image, label = _image_and_label((17, 17), seed=5)
    image_out, label_out = affine_to_patch(image, label, (17, 17), angle_degrees=90.0)
    candidates = [np.rot90(label, k) for k in (1, 3)]
    assert any(np.array_equal(label_out, c) for c in candidates)
    assert any(np.allclose(image_out, np.rot90(image, k), atol=1e-5) for k in (1, 3))


def test_affine_zoom_out_pads_with_zero():
    image = np.ones((16, 16), np.float32)
    label = np.full((16, 16), 2, np.uint8)
    image_out, label_out = affine_to_patch(image, label, (16, 16), scale=0.5)
    assert image_out[0, 0] == 0.0 and label_out[0, 0] == 0  # outside the input: background
    assert image_out[8, 8] == pytest.approx(1.0) and label_out[8, 8] == 2


# ---------------------------------------------------------------- weak / strong views


def test_random_rot90_flip_keeps_image_and_label_aligned():
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    label = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for seed in range(8):
        image_out, label_out = random_rot90_flip(np.random.default_rng(seed), image, label)
        np.testing.assert_array_equal(image_out, label_out.astype(np.float32))
        assert sorted(image_out.ravel().tolist()) == list(range(12))


@pytest.mark.parametrize("in_hw", [(20, 20), (24, 36), (50, 30)])
def test_weak_view_shapes_and_label_values(in_hw):
    params = AugmentConfig()
    image, _ = _image_and_label(in_hw, seed=7)
    label = np.zeros(in_hw, np.uint8)
    label[2:8, 3:10] = 1
    label[10:14, 5:9] = 3  # class 2 absent on purpose
    for seed in range(12):
        rng = np.random.default_rng(seed)
        image_out, label_out = weak_view(rng, image, label, (32, 48), params)
        assert image_out.shape == (32, 48) and image_out.dtype == np.float32
        assert label_out is not None and label_out.shape == (32, 48) and label_out.dtype == np.uint8
        assert set(np.unique(label_out).tolist()) <= {0, 1, 3}  # nearest: no new (interpolated) classes
        assert float(image_out.min()) >= -1e-6 and float(image_out.max()) <= 1 + 1e-6  # linear: no overshoot


def test_weak_view_without_label_and_determinism():
    params = AugmentConfig()
    image, label = _image_and_label((30, 30), seed=8)
    a = weak_view(np.random.default_rng(11), image, label, (32, 32), params)
    b = weak_view(np.random.default_rng(11), image, label, (32, 32), params)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    image_only, none = weak_view(np.random.default_rng(11), image, None, (32, 32), params)
    assert none is None
    np.testing.assert_array_equal(image_only, a[0])  # the label does not change the random draws


def test_weak_view_varies_with_seed():
    params = AugmentConfig()
    image, label = _image_and_label((30, 30), seed=9)
    outputs = [weak_view(np.random.default_rng(s), image, label, (32, 32), params)[0] for s in range(6)]
    assert len({o.tobytes() for o in outputs}) > 1


def test_strong_view_changes_image_keeps_shape_and_is_deterministic():
    params = AugmentConfig()
    image, _ = _image_and_label((32, 32), seed=10)
    out1 = strong_view(np.random.default_rng(5), image, params)
    out2 = strong_view(np.random.default_rng(5), image, params)
    out3 = strong_view(np.random.default_rng(6), image, params)
    assert out1.shape == image.shape and out1.dtype == np.float32
    assert not np.allclose(out1, image, atol=1e-3)
    np.testing.assert_array_equal(out1, out2)
    assert not np.array_equal(out1, out3)
    np.testing.assert_array_equal(image, _image_and_label((32, 32), seed=10)[0])  # input not modified


def test_strong_view_cutout_zeroes_a_block():
    params = AugmentConfig(strong_cutout_prob=1.0, strong_noise_std=0.0, strong_blur_prob=0.0,
                           strong_brightness=0.0, strong_contrast=0.0, strong_gamma=0.0)
    image = np.full((16, 16), 0.5, np.float32)
    out = strong_view(np.random.default_rng(0), image, params)
    assert np.count_nonzero(out == 0.0) == 8 * 8  # sqrt(0.25) of each side
    assert np.all(out[out != 0.0] == pytest.approx(0.5))


# ---------------------------------------------------------------- sampler


def test_sampler_is_a_pure_function_of_seed_and_iteration():
    a = TwoStreamSampler(7, 11, labeled_batch=3, unlabeled_batch=4, seed=42)
    b = TwoStreamSampler(7, 11, labeled_batch=3, unlabeled_batch=4, seed=42)
    for t in [5, 0, 17, 3, 100]:  # any order: no hidden state
        assert a.indices(t) == b.indices(t)
    first = [a.indices(t) for t in range(10)]
    assert [a.indices(t) for t in range(10)] == first
    labeled, unlabeled = a.indices(2)
    assert len(labeled) == 3 and len(unlabeled) == 4
    assert all(0 <= i < 7 for i in labeled) and all(0 <= i < 11 for i in unlabeled)


@pytest.mark.parametrize(("n", "batch"), [(6, 4), (10, 5), (5, 7)])
def test_each_labelled_epoch_visits_every_index_once(n, batch):
    sampler = TwoStreamSampler(n, 3, labeled_batch=batch, unlabeled_batch=2, seed=1)
    iterations = n * 3  # enough for several whole epochs, crossing epoch boundaries inside batches
    stream = [i for t in range(iterations) for i in sampler.indices(t)[0]]
    epochs = [stream[e * n : (e + 1) * n] for e in range(len(stream) // n)]
    assert len(epochs) >= 3
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch


def test_each_unlabelled_epoch_visits_every_index_once():
    sampler = TwoStreamSampler(4, 9, labeled_batch=2, unlabeled_batch=4, seed=3)
    stream = [i for t in range(27) for i in sampler.indices(t)[1]]
    for e in range(len(stream) // 9):
        assert Counter(stream[e * 9 : (e + 1) * 9]) == Counter(range(9))


def test_different_seeds_differ():
    a = TwoStreamSampler(20, 20, labeled_batch=4, unlabeled_batch=4, seed=0)
    b = TwoStreamSampler(20, 20, labeled_batch=4, unlabeled_batch=4, seed=1)
    assert [a.indices(t) for t in range(5)] != [b.indices(t) for t in range(5)]


def test_labelled_and_unlabelled_streams_are_independent():
    sampler = TwoStreamSampler(12, 12, labeled_batch=12, unlabeled_batch=12, seed=0)
    labeled, unlabeled = sampler.indices(0)
    assert labeled != unlabeled


def test_no_unlabelled_batch():
    sampler = TwoStreamSampler(5, 0, labeled_batch=2, unlabeled_batch=0, seed=0)
    assert sampler.indices(3)[1] == []


def test_empty_pool_refused():
    with pytest.raises(ValueError, match="empty"):
        ShuffledStream(0, seed=0, stream_id=0)


# ---------------------------------------------------------------- batches


def _slices(n: int, labelled: bool, seed: int) -> list[Slice2D]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        hw = (20 + 2 * i, 24 + i)  # varied slice sizes, as in ACDC
        label = rng.integers(0, 4, size=hw).astype(np.uint8) if labelled else None
        out.append(Slice2D(f"s{seed}_{i}", rng.random(hw).astype(np.float32), label))
    return out


def _factory(seed=0, strong_views=False, unlabeled_batch=2) -> BatchFactory:
    return BatchFactory(
        labeled=_slices(5, True, 1),
        unlabeled=_slices(7, False, 2),
        patch_size=(32, 16),
        labeled_batch=3,
        unlabeled_batch=unlabeled_batch,
        augment=AugmentConfig(),
        seed=seed,
        strong_views=strong_views,
    )


def _assert_same_batch(a: Batch, b: Batch) -> None:
    for name in Batch.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
        else:
            assert torch.equal(x, y), name


def test_batch_shapes_and_dtypes():
    batch = _factory(strong_views=True)(0)
    assert batch.labeled_image.shape == (3, 1, 32, 16) and batch.labeled_image.dtype == torch.float32
    assert batch.labeled_label.shape == (3, 32, 16) and batch.labeled_label.dtype == torch.int64
    assert batch.unlabeled_image.shape == (2, 1, 32, 16) and batch.unlabeled_image.dtype == torch.float32
    assert batch.unlabeled_strong is not None and batch.unlabeled_strong.shape == (2, 1, 32, 16)
    assert batch.labeled_strong is not None and batch.labeled_strong.shape == (3, 1, 32, 16)
    assert int(batch.labeled_label.min()) >= 0 and int(batch.labeled_label.max()) <= 3
    assert not torch.equal(batch.unlabeled_strong, batch.unlabeled_image)


def test_batch_without_strong_views_or_unlabelled():
    batch = _factory(strong_views=False, unlabeled_batch=0)(4)
    assert batch.unlabeled_image.shape == (0, 1, 32, 16) and batch.unlabeled_image.dtype == torch.float32
    assert batch.unlabeled_strong is None and batch.labeled_strong is None
    moved = batch.to(torch.device("cpu"))
    _assert_same_batch(moved, batch)


def test_batch_factory_is_reproducible():
    factory = _factory(seed=5, strong_views=True)
    for t in [0, 3, 11]:
        _assert_same_batch(factory(t), factory(t))
        _assert_same_batch(factory(t), _factory(seed=5, strong_views=True)(t))  # a fresh instance (resume)
    assert not torch.equal(factory(0).labeled_image, factory(1).labeled_image)
    assert not torch.equal(factory(0).labeled_image, _factory(seed=6)(0).labeled_image)


def test_batch_factory_refuses_empty_pools():
    with pytest.raises(ValueError, match="no labelled slices"):
        BatchFactory([], _slices(2, False, 0), (16, 16), 2, 2, AugmentConfig(), 0)
    with pytest.raises(ValueError, match="unlabelled"):
        BatchFactory(_slices(2, True, 0), [], (16, 16), 2, 2, AugmentConfig(), 0)


def test_prefetch_yields_the_factory_batches_in_order():
    factory = _factory(seed=2, strong_views=True)
    batches = list(prefetch(factory, 3, 9, depth=2))
    assert len(batches) == 6
    for t, batch in zip(range(3, 9), batches, strict=True):
        _assert_same_batch(batch, factory(t))


class _FactoryFailed(RuntimeError):
    pass


def test_prefetch_reraises_factory_errors():
    factory = _factory(seed=2)

    def failing(iteration: int) -> Batch:
        if iteration == 4:
            raise _FactoryFailed(f"cannot build batch {iteration}")
        return factory(iteration)

    received = []
    with pytest.raises(_FactoryFailed, match="cannot build batch 4"):
        for batch in prefetch(failing, 1, 10):
            received.append(batch)
    assert len(received) == 3  # batches 1, 2, 3 came through before the failure
    for t, batch in zip(range(1, 4), received, strict=True):
        _assert_same_batch(batch, factory(t))


def test_prefetch_stops_when_the_consumer_stops():
    calls = []
    factory = _factory(seed=0, unlabeled_batch=0)

    def counting(iteration: int) -> Batch:
        calls.append(iteration)
        return factory(iteration)

    generator = prefetch(counting, 0, 1000, depth=1)
    next(generator)
    generator.close()  # joins the worker
    assert len(calls) < 10
