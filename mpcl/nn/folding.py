"""Batch-norm folding: an eval-mode batch-norm is an affine map per channel, so it can be merged into
the convolution before it. Deployment folds every conv+BN pair (one memory pass less per layer in eager
torch, one scale per folded weight for int8 quantisation instead of a quantised convolution followed by
a float BN).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


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
