"""The network spec: the ``network`` mapping of checkpoint metadata and model.json, and the network it
describes.

A spec names the architecture (only ``unet2d`` so far) and carries its constructor arguments, plus
``batch_norm``: ``trained`` (conv → BN → ReLU as trained) or ``folded`` (every batch-norm folded into
the convolution before it, :func:`mpcl.nn.folding.fold_batch_norm`), so the same structure can be
rebuilt to load a folded network's weights.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from mpcl.errors import InputError
from mpcl.nn.folding import conv_bn_pairs
from mpcl.nn.unet import UNet

FOLDED = "folded"
BATCH_NORM_MODES = ("trained", FOLDED)
_NOT_CONSTRUCTOR_KEYS = ("self", "in_channels", "num_classes")


def build_network_from_spec(spec: Mapping[str, Any], in_channels: int, num_classes: int) -> UNet:
    """The network described by checkpoint metadata / model.json ``network`` (only the 2D U-Net so far).

    Every key that is a U-Net constructor argument is passed on (so options added to the U-Net later
    travel without changes here); ``batch_norm: folded`` builds the BN-free structure of a folded net.
    """
    spec = dict(spec)
    name = spec.pop("name", "unet2d")
    if name != "unet2d":
        raise InputError(f"network {name!r} is not known to this mpcl (expected 'unet2d')")
    batch_norm = spec.pop("batch_norm", "trained")
    if batch_norm not in BATCH_NORM_MODES:
        raise InputError(
            f"network.batch_norm {batch_norm!r} is not known (expected one of {BATCH_NORM_MODES})"
        )
    accepted = set(inspect.signature(UNet).parameters) - set(_NOT_CONSTRUCTOR_KEYS)
    model = UNet(in_channels, num_classes, **{key: value for key, value in spec.items() if key in accepted})
    if batch_norm == FOLDED:
        for container, index in conv_bn_pairs(model):
            container[index + 1] = nn.Identity()
    return model


def deployment_spec(network: Mapping[str, Any]) -> dict[str, Any]:
    """The network spec of the deployed (stripped, folded) form of a training network."""
    return {**dict(network), "deep_supervision": False, "batch_norm": FOLDED}
