"""The deployment student: the network a model package ships, with everything training-only removed.

A training checkpoint holds the student U-Net next to parts that only training uses: the EMA teacher,
projection heads (``extra``), prototype banks (``method_state``), the optimiser and, with deep
supervision, auxiliary decoder heads inside the U-Net; a co-training method keeps its second branch in
the same place. Deployment keeps the student's segmentation path only and folds every batch-norm into
the convolution before it: eval-mode BN is an affine map per channel, so folding it removes one memory
pass per layer in eager torch and gives int8 quantisation one scale per folded weight instead of a
quantised convolution followed by a float BN.

A folded network is recorded as ``network.batch_norm: folded`` in model.json / checkpoint metadata, so
:func:`build_network_from_spec` rebuilds the same structure (BN replaced by identities) to load it.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mpcl.errors import InputError
from mpcl.training.networks.unet import UNet

FOLDED = "folded"
BATCH_NORM_MODES = ("trained", FOLDED)
TRAINING_ONLY_PREFIXES = ("deep_heads.",)  # auxiliary decoder heads: used by deep-supervision losses only
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


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Sequential, int]]:
    """(container, index) of every Conv2d directly followed by a BatchNorm2d inside an nn.Sequential."""
    pairs = []
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            layers = list(module)
            for index in range(len(layers) - 1):
                conv, norm = layers[index], layers[index + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    pairs.append((module, index))
    return pairs


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) whose conv+BN pairs are single convolutions, computed in float64.

    w' = w·γ/√(σ²+ε) per output channel, b' = (b − μ)·γ/√(σ²+ε) + β; the BN becomes an identity, so the
    module tree (and every other state-dict key) is unchanged.
    """
    folded = copy.deepcopy(model).eval()
    with torch.no_grad():
        for container, index in conv_bn_pairs(folded):
            conv, norm = container[index], container[index + 1]
            scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
            bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
            new_weight = conv.weight.double() * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
            new_bias = (bias - norm.running_mean.double()) * scale + norm.bias.double()
            replacement = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
                bias=True,
                padding_mode=conv.padding_mode,
            )
            replacement.weight.copy_(new_weight.to(conv.weight.dtype))
            replacement.bias.copy_(new_bias.to(conv.weight.dtype))
            container[index] = replacement.to(conv.weight.device)
            container[index + 1] = nn.Identity()
    return folded


def deployment_spec(network: Mapping[str, Any]) -> dict[str, Any]:
    """The network spec of the deployed (stripped, folded) form of a training network."""
    return {**dict(network), "deep_supervision": False, "batch_norm": FOLDED}


def stripped_student(state: Mapping[str, Any]) -> tuple[UNet, dict[str, Any]]:
    """The checkpoint's student with training-only parts removed (eval mode, BN not yet folded).

    Only ``state["student"]`` is read (teacher, projection heads, banks, optimiser and any second branch
    are left behind); deep-supervision heads are dropped because ``forward`` never uses them.
    Returns the network and its spec.
    """
    metadata = state["metadata"]
    spec = {**dict(metadata.get("network", {})), "deep_supervision": False}
    weights = {
        key: value for key, value in state["student"].items() if not key.startswith(TRAINING_ONLY_PREFIXES)
    }
    model = build_network_from_spec(spec, int(metadata.get("in_channels", 1)), int(metadata["num_classes"]))
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise InputError(f"the checkpoint's student weights do not fit its network spec ({first})") from None
    return model.eval(), spec
