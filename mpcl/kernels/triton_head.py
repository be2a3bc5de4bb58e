"""Fused output head: softmax + test-time-flip mean + bilinear resize back to the slice + argmax +
normalised entropy, in one pass over the logits.

The reference is :func:`mpcl.kernels.reference.head_reference` (the Segmenter's numpy path). Each program
takes BLOCK output pixels of one slice; for each of the four source pixels of the corner-aligned bilinear
resize it loads the C logits of every flipped copy (at the flipped position), takes their softmax and
averages over the flips, then interpolates along y and then x, as ``resize_2d`` does. Only labels (and,
when asked, entropy and probabilities) are written, at the slice's own size, so the (F*b, C, h, w) logits
never go back to the host. Softmaxes of a source pixel are recomputed by its neighbours instead of being
stored: arithmetic is cheap next to a round trip through device memory.

``fused_head_kernel`` keeps TensorRT's AOT parameter order (input pointers, int32 scalars, output
pointers); ``fused_head_trt_kernel`` is the engine's variant (a shape input, no probabilities output).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from mpcl.errors import InputError
from mpcl.kernels.reference import Flip, flip_code
from mpcl.kernels.triton_preprocess import _source_index

MAX_TILE = 4096  # BLOCK * padded classes: bounds registers per program


@triton.jit
def _flip_mean_softmax(
    logits_ptr, codes_ptr, b, batch, num_classes, in_h, in_w, y, x, classes, class_mask,
    NUM_FLIPS: tl.constexpr, C_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """[BLOCK, C_PAD] softmax at source pixels (y, x) of slice b, averaged over the flipped copies."""
    plane = in_h * in_w
    total = tl.zeros((BLOCK, C_PAD), dtype=tl.float32)
    for f in tl.static_range(NUM_FLIPS):
        code = tl.load(codes_ptr + f)
        sy = tl.where((code & 2) != 0, in_h - 1 - y, y)
        sx = tl.where((code & 1) != 0, in_w - 1 - x, x)
        base = ((f * batch + b) * num_classes).to(tl.int64) * plane
        offsets = base + classes[None, :].to(tl.int64) * plane + (sy * in_w + sx).to(tl.int64)[:, None]
        values = tl.load(logits_ptr + offsets, mask=class_mask[None, :], other=float("-inf")).to(tl.float32)
        exps = tl.exp(values - tl.max(values, axis=1)[:, None])
        total += exps / tl.sum(exps, axis=1)[:, None]
    if NUM_FLIPS > 1:
        total = total / NUM_FLIPS
    return total


@triton.jit
def _head_tile(
    logits_ptr, codes_ptr, batch, num_classes, in_h, in_w, out_h, out_w,
    NUM_FLIPS: tl.constexpr, C_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Mean probabilities [BLOCK, C_PAD] at this program's output pixels (resized), plus indexing."""
    b = tl.program_id(1)
    n_out = out_h * out_w
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < n_out
    o = tl.minimum(offsets, n_out - 1)  # the tail computes a real pixel and does not store it
    classes = tl.arange(0, C_PAD)
    class_mask = classes < num_classes
    y0, y1, fy = _source_index(o // out_w, in_h, out_h)
    x0, x1, fx = _source_index(o % out_w, in_w, out_w)
    p00 = _flip_mean_softmax(logits_ptr, codes_ptr, b, batch, num_classes, in_h, in_w, y0, x0, classes,
                             class_mask, NUM_FLIPS, C_PAD, BLOCK)
    p10 = _flip_mean_softmax(logits_ptr, codes_ptr, b, batch, num_classes, in_h, in_w, y1, x0, classes,
                             class_mask, NUM_FLIPS, C_PAD, BLOCK)
    p01 = _flip_mean_softmax(logits_ptr, codes_ptr, b, batch, num_classes, in_h, in_w, y0, x1, classes,
                             class_mask, NUM_FLIPS, C_PAD, BLOCK)
    p11 = _flip_mean_softmax(logits_ptr, codes_ptr, b, batch, num_classes, in_h, in_w, y1, x1, classes,
                             class_mask, NUM_FLIPS, C_PAD, BLOCK)
    wy = fy[:, None]
    wx = fx[:, None]
    column0 = p00 * (1.0 - wy) + p10 * wy
    column1 = p01 * (1.0 - wy) + p11 * wy
    probabilities = column0 * (1.0 - wx) + column1 * wx
    return probabilities, classes, class_mask, b.to(tl.int64), o, valid, n_out


@triton.jit
def _labels_and_entropy(probabilities, class_mask, num_classes):
    """First-maximum argmax (numpy's tie rule) and entropy / log(C) clipped to [0, 1] (0 when C < 2)."""
    scores = tl.where(class_mask[None, :], probabilities, float("-inf"))
    labels = tl.argmax(scores, axis=1, tie_break_left=True)
    terms = tl.log(tl.maximum(probabilities, 1e-12)) * probabilities  # padded classes: p = 0, term 0
    entropy = -tl.sum(terms, axis=1) / tl.log(tl.maximum(num_classes, 2).to(tl.float32))
    entropy = tl.minimum(tl.maximum(entropy, 0.0), 1.0)
    entropy = tl.where(num_classes > 1, entropy, 0.0)
    return labels, entropy


@triton.jit(do_not_specialize=["batch", "num_classes", "in_h", "in_w", "out_h", "out_w"])
def fused_head_kernel(
    logits_ptr,
    codes_ptr,
    batch,
    num_classes,
    in_h,
    in_w,
    out_h,
    out_w,
    labels_ptr,
    entropy_ptr,
    probabilities_ptr,
    NUM_FLIPS: tl.constexpr,
    C_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    STORE_ENTROPY: tl.constexpr,
    STORE_PROBABILITIES: tl.constexpr,
):
    """logits (NUM_FLIPS*batch, C, in_h, in_w) -> labels (batch, out_h, out_w) [+ entropy, probabilities]."""
    probabilities, classes, class_mask, b, o, valid, n_out = _head_tile(
        logits_ptr, codes_ptr, batch, num_classes, in_h, in_w, out_h, out_w, NUM_FLIPS, C_PAD, BLOCK
    )
    labels, entropy = _labels_and_entropy(probabilities, class_mask, num_classes)
    tl.store(labels_ptr + b * n_out + o, labels.to(labels_ptr.dtype.element_ty), mask=valid)
    if STORE_ENTROPY:
        tl.store(entropy_ptr + b * n_out + o, entropy, mask=valid)
    if STORE_PROBABILITIES:
        offsets = (b * num_classes + classes[None, :].to(tl.int64)) * n_out + o[:, None]
        tl.store(probabilities_ptr + offsets, probabilities, mask=valid[:, None] & class_mask[None, :])


@triton.jit(do_not_specialize=["batch", "num_classes", "in_h", "in_w", "out_h", "out_w"])
def fused_head_trt_kernel(
    logits_ptr,
    slices_ptr,
    codes_ptr,
    batch,
    num_classes,
    in_h,
    in_w,
    out_h,
    out_w,
    labels_ptr,
    entropy_ptr,
    NUM_FLIPS: tl.constexpr,
    C_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The TensorRT plugin's kernel: ``slices_ptr`` (the raw slices) is only there to give the engine the
    output size; labels and entropy are always written."""
    probabilities, classes, class_mask, b, o, valid, n_out = _head_tile(
        logits_ptr, codes_ptr, batch, num_classes, in_h, in_w, out_h, out_w, NUM_FLIPS, C_PAD, BLOCK
    )
    labels, entropy = _labels_and_entropy(probabilities, class_mask, num_classes)
    tl.store(labels_ptr + b * n_out + o, labels.to(labels_ptr.dtype.element_ty), mask=valid)
    tl.store(entropy_ptr + b * n_out + o, entropy, mask=valid)


def padded_classes(num_classes: int) -> int:
    return triton.next_power_of_2(max(int(num_classes), 2))


def default_block(num_classes: int) -> int:
    """Pixels per program: as many as fit MAX_TILE values of the padded class axis (16 to 256)."""
    return max(16, min(256, MAX_TILE // padded_classes(num_classes)))


def flip_codes_tensor(flips: Sequence[Flip], device) -> torch.Tensor:
    return torch.tensor([flip_code(f) for f in flips], dtype=torch.int32, device=device)


def fused_head(
    logits: torch.Tensor,
    flip_codes: torch.Tensor,
    out_hw: tuple[int, int],
    probabilities: bool = False,
    uncertainty: bool = False,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Logits of F flipped copies (F*b, C, h, w), contiguous, fp32/fp16/bf16 -> labels (b, H, W) uint8,
    entropy (b, H, W) and probabilities (b, C, H, W) float32 (None unless asked for)."""
    if logits.ndim != 4 or not logits.is_contiguous():
        shape = tuple(logits.shape)
        raise InputError(f"fused_head: logits must be a contiguous (F*b, C, h, w) tensor, got shape {shape}")
    flips = int(flip_codes.numel())
    if flips < 1 or logits.shape[0] % flips or flip_codes.dtype != torch.int32:
        raise InputError(
            f"fused_head: {logits.shape[0]} logits slices cannot be split into {flips} flipped copies "
            "(flip codes must be a non-empty int32 tensor)"
        )
    total, num_classes, in_h, in_w = logits.shape
    if num_classes > 255:
        raise InputError(f"fused_head stores uint8 labels; {num_classes} classes do not fit")
    batch, (out_h, out_w) = total // flips, (int(out_hw[0]), int(out_hw[1]))
    device = logits.device
    labels = torch.empty((batch, out_h, out_w), dtype=torch.uint8, device=device)
    entropy = torch.empty((batch, out_h, out_w), dtype=torch.float32, device=device) if uncertainty else None
    probs = (
        torch.empty((batch, num_classes, out_h, out_w), dtype=torch.float32, device=device)
        if probabilities
        else None
    )
    if batch == 0:
        return labels, probs, entropy
    block = block or default_block(num_classes)
    grid = (triton.cdiv(out_h * out_w, block), batch)
    fused_head_kernel[grid](
        logits,
        flip_codes,
        batch,
        num_classes,
        in_h,
        in_w,
        out_h,
        out_w,
        labels,
        entropy if entropy is not None else labels,  # unused pointers when their store is compiled out
        probs if probs is not None else labels,
        NUM_FLIPS=flips,
        C_PAD=padded_classes(num_classes),
        BLOCK=block,
        STORE_ENTROPY=entropy is not None,
        STORE_PROBABILITIES=probs is not None,
    )
    return labels, probs, entropy
