"""Fused GPU kernels (Triton) for the Segmenter's per-batch work, and their numpy references.

The network runtime cannot remove the memory traffic around the network: normalising and resizing slices
to the patch, and turning logits into labels (softmax, test-time-flip mean, resize back, argmax, entropy).
``triton_preprocess`` and ``triton_head`` do each in one pass over device memory, ``reference`` says in
numpy what they must compute (the runtime's own functions), and ``tensorrt_plugins`` wraps the same kernels
for TensorRT engines. Importing this package (or ``reference``) never imports torch, triton or TensorRT.
"""

from __future__ import annotations

from mpcl.optional import module_available

FUSED_KERNEL_MODES = ("auto", "on", "off")


def triton_available() -> bool:
    """Whether triton can be imported (without importing it)."""
    return module_available("triton")
