"""Fused preprocessing kernel: whole-volume intensity normalisation + corner-aligned bilinear resize of a
batch of raw slices to the network's patch, in one read of the slices and one write of the batch.

The reference is :func:`mpcl.kernels.reference.preprocess_reference` (``normalize_intensity`` then
``resize_2d``). Each output pixel normalises its four source pixels, then interpolates along y and then x,
in that order, as ``resize_2d`` does. Source coordinates use exact integer arithmetic
(``oy * (in_h - 1) // (out_h - 1)``), so the interpolation weights equal numpy's to float32 rounding.

Parameter order is TensorRT's AOT plugin convention (input pointers, int32 scalars, output pointers), so
``tensorrt_plugins`` compiles this same kernel; the affine (lower, upper, offset, divisor) is read from a
4-element float32 tensor because AOT plugins only take integer scalars.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mpcl.errors import InputError
from mpcl.kernels.reference import NormalizationAffine

DEFAULT_BLOCK = 256


@triton.jit
def _source_index(o, n_in, n_out):
    """Corner-aligned source position of output index ``o``: (low index, high index, float32 fraction)."""
    numerator = o * (n_in - 1)
    denominator = tl.maximum(n_out - 1, 1)
    low = numerator // denominator
    frac = (numerator - low * denominator).to(tl.float32) / denominator.to(tl.float32)
    high = tl.minimum(low + 1, n_in - 1)
    return low, high, frac


@triton.jit
def _normalized(slices_ptr, base, y, x, stride_h, stride_w, lower, upper, offset, divisor):
    value = tl.load(slices_ptr + base + y.to(tl.int64) * stride_h + x.to(tl.int64) * stride_w)
    value = tl.minimum(tl.maximum(value.to(tl.float32), lower), upper)
    return (value - offset) / divisor


@triton.jit(do_not_specialize=["in_h", "in_w", "stride_b", "stride_h", "stride_w", "out_h", "out_w"])
def fused_preprocess_kernel(
    slices_ptr,
    affine_ptr,
    in_h,
    in_w,
    stride_b,
    stride_h,
    stride_w,
    out_h,
    out_w,
    out_ptr,
    BLOCK: tl.constexpr,
):
    """One program: BLOCK output pixels of slice ``program_id(1)``; out is (b, 1, out_h, out_w)."""
    b = tl.program_id(1).to(tl.int64)
    n_out = out_h * out_w
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < n_out
    o = tl.minimum(offsets, n_out - 1)  # the tail computes a real pixel and does not store it
    y0, y1, fy = _source_index(o // out_w, in_h, out_h)
    x0, x1, fx = _source_index(o % out_w, in_w, out_w)
    lower = tl.load(affine_ptr)
    upper = tl.load(affine_ptr + 1)
    offset = tl.load(affine_ptr + 2)
    divisor = tl.load(affine_ptr + 3)
    base = b * stride_b
    v00 = _normalized(slices_ptr, base, y0, x0, stride_h, stride_w, lower, upper, offset, divisor)
    v10 = _normalized(slices_ptr, base, y1, x0, stride_h, stride_w, lower, upper, offset, divisor)
    v01 = _normalized(slices_ptr, base, y0, x1, stride_h, stride_w, lower, upper, offset, divisor)
    v11 = _normalized(slices_ptr, base, y1, x1, stride_h, stride_w, lower, upper, offset, divisor)
    column0 = v00 * (1.0 - fy) + v10 * fy
    column1 = v01 * (1.0 - fy) + v11 * fy
    value = column0 * (1.0 - fx) + column1 * fx
    tl.store(out_ptr + b * n_out + o, value.to(out_ptr.dtype.element_ty), mask=valid)


def affine_tensor(affine: NormalizationAffine, device) -> torch.Tensor:
    """The affine as the kernel's 4-element float32 tensor (made once per volume)."""
    return torch.tensor([float(v) for v in affine], dtype=torch.float32, device=device)


def fused_preprocess(
    slices: torch.Tensor,
    affine: torch.Tensor,
    patch_hw: tuple[int, int],
    out_dtype: torch.dtype = torch.float32,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Raw slices (b, H, W), any real dtype and strides, to a contiguous (b, 1, h, w) network batch."""
    if slices.ndim != 3 or affine.shape != (4,) or affine.dtype != torch.float32:
        raise InputError(
            f"fused_preprocess needs slices (b, H, W) and a float32 affine of 4 values; got slices "
            f"{tuple(slices.shape)} and affine {tuple(affine.shape)} {affine.dtype}"
        )
    if slices.device != affine.device:
        raise InputError(f"slices are on {slices.device} but the affine is on {affine.device}")
    count, in_h, in_w = slices.shape
    out_h, out_w = int(patch_hw[0]), int(patch_hw[1])
    out = torch.empty((count, 1, out_h, out_w), dtype=out_dtype, device=slices.device)
    if count == 0:
        return out
    grid = (triton.cdiv(out_h * out_w, block), count)
    fused_preprocess_kernel[grid](
        slices, affine, in_h, in_w, *slices.stride(), out_h, out_w, out, BLOCK=block
    )
    return out
