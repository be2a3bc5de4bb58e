import math

import pytest
import torch

from mpcl.nn.unet import UNet
from mpcl.training.losses.consistency import sigmoid_rampup, softmax_mse
from mpcl.training.losses.dice import ce_dice_loss, deep_supervision_loss, soft_dice_loss


def test_unet_reference_capacity_and_outputs():
    model = UNet(deep_supervision=True)
    reference = UNet()
    n_params = sum(p.numel() for p in reference.parameters())
    assert n_params == 1_944_324  # counted by hand from the SSL4MIS layer list (transposed-conv variant)
    output = model.forward_features(torch.randn(2, 1, 64, 64))
    assert output.logits.shape == (2, 4, 64, 64)
    assert [tuple(f.shape[1:]) for f in output.features] == [
        (128, 8, 8),
        (64, 16, 16),
        (32, 32, 32),
        (16, 64, 64),
    ]
    assert [tuple(d.shape[1:]) for d in output.deep_logits] == [(4, 8, 8), (4, 16, 16), (4, 32, 32)]
    assert reference.forward_features(torch.randn(1, 1, 32, 32)).deep_logits == []


def test_unet_decoder_has_no_dropout_but_encoder_does():
    model = UNet()
    encoder_p = [m.p for m in model.encoder.modules() if isinstance(m, torch.nn.Dropout)]
    decoder_p = [m.p for m in model.decoder.modules() if isinstance(m, torch.nn.Dropout)]
    assert encoder_p == [0.05, 0.1, 0.2, 0.3, 0.5]
    assert all(p == 0.0 for p in decoder_p)


def test_soft_dice_is_zero_for_perfect_prediction_and_one_for_disjoint():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[:, 2:6, 2:6] = 1
    perfect = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float()
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(1 - perfect, target).item() == pytest.approx(1.0, abs=1e-6)


def test_ce_dice_decreases_when_logits_agree_with_target():
    target = torch.randint(0, 4, (2, 16, 16))
    good = torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float() * 10
    random = torch.randn(2, 4, 16, 16)
    assert ce_dice_loss(good, target) < ce_dice_loss(random, target)
    assert deep_supervision_loss([good[:, :, ::2, ::2]], target) < deep_supervision_loss(
        [random[:, :, ::2, ::2]], target
    )


def test_sigmoid_rampup_matches_mean_teacher_curve():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(500, 100) == 1.0


def test_softmax_mse_zero_iff_same_distribution():
    logits = torch.randn(2, 4, 8, 8)
    assert softmax_mse(logits, torch.softmax(logits, 1)).item() == pytest.approx(0.0, abs=1e-7)
    assert softmax_mse(logits, torch.softmax(-logits, 1)).item() > 1e-3
