"""Starting a narrow student from a trained U-Net's most important channels (export/channel_selection.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpcl.errors import ConfigError
from mpcl.export.channel_selection import init_from_teacher_channels, top_channels
from mpcl.nn.unet import UNet

NARROW, WIDE = [2, 3, 4, 5, 6], [4, 5, 6, 8, 9]


def _randomised(model: UNet) -> UNet:
    """Non-trivial BN statistics, so copying them wrongly changes the output."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _with_dead_channels(wide: UNet, narrow_widths: list[int]) -> UNet:
    """``wide`` with only as many live channels per layer as a ``narrow_widths`` U-Net has, scattered
    among dead ones (γ = β = 0 after a BN, zero filter and bias in the upsampling): it computes what its
    live channels compute, so a narrow student that keeps exactly them must reproduce it."""
    generator = torch.Generator().manual_seed(0)
    narrow = UNet(1, 4, narrow_widths, upsampling=wide.hyperparameters()["upsampling"])
    with torch.no_grad():
        for name, module in wide.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                dead = torch.randperm(module.num_features, generator=generator)[
                    narrow.get_submodule(name).num_features :
                ]
                module.weight[dead] = 0.0
                module.bias[dead] = 0.0
            elif isinstance(module, nn.ConvTranspose2d):
                dead = torch.randperm(module.out_channels, generator=generator)[
                    narrow.get_submodule(name).out_channels :
                ]
                module.weight[:, dead] = 0.0
                module.bias[dead] = 0.0
    return wide.eval()


def test_top_channels_keeps_the_largest_scores_in_index_order():
    assert top_channels(torch.tensor([0.1, 3.0, 0.2, 2.0, 5.0]), 3).tolist() == [1, 3, 4]


def test_a_student_as_wide_as_the_teacher_is_an_exact_copy():
    torch.manual_seed(0)
    teacher = _randomised(UNet(1, 4, WIDE))
    student = init_from_teacher_channels(UNet(1, 4, WIDE), teacher).eval()
    batch = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(student(batch), teacher(batch))


def test_a_student_keeps_exactly_the_teachers_live_channels():
    """A wide teacher whose extra channels are dead computes a narrow network; the narrow student
    initialised from it must compute the same function, so every index and slice axis is right."""
    torch.manual_seed(1)
    teacher = _with_dead_channels(_randomised(UNet(1, 4, WIDE)), NARROW)
    student = init_from_teacher_channels(UNet(1, 4, NARROW), teacher).eval()
    batch = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(student(batch), teacher(batch), atol=1e-5, rtol=1e-4)


def test_bilinear_upsampling_is_copied_too():
    torch.manual_seed(2)
    teacher = _randomised(UNet(1, 4, WIDE, upsampling="bilinear"))
    student = init_from_teacher_channels(UNet(1, 4, WIDE, upsampling="bilinear"), teacher).eval()
    batch = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(student(batch), teacher(batch))


@pytest.mark.parametrize(
    ("student", "teacher", "message"),
    [
        (UNet(1, 4, WIDE), UNet(1, 4, NARROW), "no wider than"),
        (UNet(1, 4, NARROW, upsampling="bilinear"), UNet(1, 4, WIDE), "upsample the same way"),
    ],
)
def test_incompatible_networks_are_refused(student, teacher, message):
    with pytest.raises(ConfigError, match=message):
        init_from_teacher_channels(student, teacher)
