"""Batch-norm running statistics recomputed from clean training slices ("precise BN").

In eval mode a network normalises with running statistics gathered from its training batches. In
semi-supervised training those batches are a poor sample of what it will segment: the labelled stream
comes from a handful of patients, and strongly augmented or copy-pasted views sit in the same batch as
clean ones. ``benchmarks/bn_gap.py`` scores a checkpoint with its running and with recomputed statistics
(weights untouched); recomputing helps short runs, co-training and PCCS but is noise for the copy-paste
methods, so it is off by default (``train.bn_recalibration_slices``). Measured gaps per method:
docs/acdc_benchmark.md.

Why: the gap is dropout's variance shift, not the augmented inputs. Recomputing the statistics on the
same clean slices with dropout active (as in training) brings the gap back, while recomputing them on the
trainer's weak views with dropout off closes it as clean slices do (``bn_gap.py``'s probes). The SSL4MIS
U-Net's encoder blocks put dropout before their second batch norm, and that layer's running variance
describes dropped-out activations, most of all behind the bottleneck's 0.5 dropout. BCP's checkpoints
carry the same shift: copy-paste training does not avoid it, its weights tolerate it.

Recalibration feeds whole training slices, resized to the patch exactly as evaluation feeds them,
through the network with batch norm in train mode (no gradient, dropout off) and keeps the cumulative
average of the batch statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from mpcl.preprocessing import resize_2d


def batch_norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batch_norm(
    model: nn.Module,
    images: Sequence[np.ndarray],
    patch_size: tuple[int, int],
    batch_size: int,
    device: torch.device | str = "cpu",
    dropout: bool = False,
) -> int:
    """Replace the running mean/variance of every batch-norm layer of ``model`` (in place) by their
    average over batches of ``images`` ((H, W) slices, already intensity-normalised); returns the number
    of batches used. A trailing partial batch is dropped so every estimate comes from a full batch.
    Leaves the model in the train/eval mode it was in. ``dropout=True`` keeps dropout active, as in
    training: a probe for ``benchmarks/bn_gap.py``, not for use (inference runs without dropout)."""
    layers = batch_norm_layers(model)
    batches = len(images) // batch_size
    if not layers or batches == 0:
        return 0
    was_training = model.training
    momenta = [layer.momentum for layer in layers]
    model.train(dropout)  # dropout off unless probing; batch norm is switched to train mode below
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative moving average over the batches below
        layer.train()
    try:
        for start in range(0, batches * batch_size, batch_size):
            resized = [
                resize_2d(image[None], patch_size, order=1)[0] for image in images[start : start + batch_size]
            ]
            batch = torch.from_numpy(np.ascontiguousarray(np.stack(resized)[:, None], dtype=np.float32))
            model(batch.to(device))
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        model.train(was_training)
    return batches


def sample_slices(slices: Sequence[np.ndarray], count: int, seed: int) -> list[np.ndarray]:
    """``count`` distinct slices (all if fewer), chosen by ``seed`` without touching the global RNGs."""
    order = np.random.default_rng(seed).permutation(len(slices))[:count]
    return [slices[index] for index in order]
