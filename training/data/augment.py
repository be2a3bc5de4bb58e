"""Augmentation as small pure functions on numpy arrays (one slice at a time), composed into views.

Weak view (geometry, applied identically to image and label), by ``augment.policy``: ``published`` is
SSL4MIS/BCP's ``RandomGenerator`` (rot90 + flip, or an integer rotation with order-0 interpolation, or
nothing; then an order-0 zoom to the patch); ``affine`` is random 90° rotation + flip, or a small random
rotation, random isotropic scaling, and the resize to the training patch, all done in one bilinear affine
resampling so the image is interpolated once. Strong view (intensity only, image only): brightness,
contrast, gamma, blur, noise and cutout, for methods that ask for it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from mpcl.preprocessing import resize_2d, zoom_nearest
from mpcl.training.config_schema import AugmentConfig


def random_rot90_flip(rng: np.random.Generator, image: np.ndarray, label: np.ndarray | None):
    """Rotate by k·90° and flip along a random axis (exact, no interpolation)."""
    k = int(rng.integers(0, 4))
    axis = int(rng.integers(0, 2))
    image = np.flip(np.rot90(image, k), axis=axis)
    label = None if label is None else np.flip(np.rot90(label, k), axis=axis)
    return image, label


def affine_to_patch(
    image: np.ndarray,
    label: np.ndarray | None,
    patch_size: tuple[int, int],
    angle_degrees: float = 0.0,
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample a slice onto the patch grid, rotated about its centre and zoomed by ``scale``.

    With angle 0 and scale 1 this is exactly the corner-aligned resize of ``mpcl.preprocessing``, so
    training patches and inference inputs are sampled the same way. Image: linear; label: nearest.
    """
    if angle_degrees == 0 and scale == 1:
        return resize_2d(image, patch_size, order=1), None if label is None else resize_2d(
            label, patch_size, order=0
        )
    in_h, in_w = image.shape
    out_h, out_w = patch_size
    step = np.array([(in_h - 1) / max(out_h - 1, 1), (in_w - 1) / max(out_w - 1, 1)])
    theta = math.radians(angle_degrees)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    matrix = (rotation / scale) * step[None, :]
    centre_in = np.array([(in_h - 1) / 2, (in_w - 1) / 2])
    centre_out = np.array([(out_h - 1) / 2, (out_w - 1) / 2])
    offset = centre_in - matrix @ centre_out
    image_out = ndimage.affine_transform(
        image.astype(np.float32),
        matrix,
        offset,
        output_shape=(out_h, out_w),
        order=1,
        mode="grid-constant",
        cval=0.0,
    )
    label_out = None
    if label is not None:
        label_out = ndimage.affine_transform(
            label, matrix, offset, output_shape=(out_h, out_w), order=0, mode="grid-constant", cval=0
        )
    return image_out, label_out


def published_view(
    rng: np.random.Generator, image: np.ndarray, label: np.ndarray | None, patch_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """SSL4MIS/BCP ``RandomGenerator``: with probability ½ rot90 + flip; otherwise with probability ½ a
    rotation by an integer angle in [-20, 20) degrees (order 0, same shape); then scipy's order-0 zoom
    to the patch (``zoom_nearest``, the same function the test-time resize uses)."""
    if rng.random() > 0.5:
        image, label = random_rot90_flip(rng, image, label)
    elif rng.random() > 0.5:
        angle = int(rng.integers(-20, 20))
        image = ndimage.rotate(image, angle, order=0, reshape=False)
        label = None if label is None else ndimage.rotate(label, angle, order=0, reshape=False)
    image = zoom_nearest(image, patch_size).astype(np.float32, copy=False)
    return image, None if label is None else zoom_nearest(label, patch_size)


def weak_view(
    rng: np.random.Generator,
    image: np.ndarray,
    label: np.ndarray | None,
    patch_size: tuple[int, int],
    params: AugmentConfig,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The geometric view of ``params.policy``, ending on the patch grid."""
    if params.policy == "published":
        return published_view(rng, image, label, patch_size)
    angle = 0.0
    if rng.random() < params.rot90_flip_prob:
        image, label = random_rot90_flip(rng, image, label)
    else:
        angle = float(rng.uniform(-params.rotation_degrees, params.rotation_degrees))
    scale = float(rng.uniform(*params.scale_range))
    return affine_to_patch(image, label, patch_size, angle, scale)


def adjust_intensity(rng: np.random.Generator, image: np.ndarray, params: AugmentConfig) -> np.ndarray:
    """Random brightness shift, contrast scaling about the mean and gamma, on a [0, 1]-ish image."""
    mean = float(image.mean())
    image = (image - mean) * float(rng.uniform(1 - params.strong_contrast, 1 + params.strong_contrast)) + mean
    image = image + float(rng.uniform(-params.strong_brightness, params.strong_brightness))
    low, high = float(image.min()), float(image.max())
    if high > low:
        gamma = float(np.exp(rng.uniform(-params.strong_gamma, params.strong_gamma)))
        image = ((image - low) / (high - low)) ** gamma * (high - low) + low
    return image.astype(np.float32)


def random_blur(rng: np.random.Generator, image: np.ndarray, params: AugmentConfig) -> np.ndarray:
    if rng.random() >= params.strong_blur_prob:
        return image
    return ndimage.gaussian_filter(image, float(rng.uniform(*params.strong_blur_sigma))).astype(np.float32)


def random_noise(rng: np.random.Generator, image: np.ndarray, params: AugmentConfig) -> np.ndarray:
    return (image + rng.normal(0.0, params.strong_noise_std, image.shape)).astype(np.float32)


def random_cutout(rng: np.random.Generator, image: np.ndarray, params: AugmentConfig) -> np.ndarray:
    """Zero a random rectangle covering about ``strong_cutout_fraction`` of the slice."""
    if rng.random() >= params.strong_cutout_prob:
        return image
    h, w = image.shape
    side_h = max(1, int(round(h * math.sqrt(params.strong_cutout_fraction))))
    side_w = max(1, int(round(w * math.sqrt(params.strong_cutout_fraction))))
    top = int(rng.integers(0, h - side_h + 1))
    left = int(rng.integers(0, w - side_w + 1))
    image = image.copy()
    image[top : top + side_h, left : left + side_w] = 0.0
    return image


def strong_view(rng: np.random.Generator, image: np.ndarray, params: AugmentConfig) -> np.ndarray:
    """Intensity-only perturbation of an already weak-augmented patch (geometry unchanged)."""
    image = adjust_intensity(rng, image, params)
    image = random_blur(rng, image, params)
    image = random_noise(rng, image, params)
    return random_cutout(rng, image, params)
