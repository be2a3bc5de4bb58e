"""Batch-norm recalibration ("precise BN"): exact statistics, weights and modes untouched, trainer option."""

import copy

import numpy as np
import pytest
import torch

from mpcl.errors import ConfigError
from mpcl.nn.unet import UNet
from mpcl.training.batchnorm import batch_norm_layers, recalibrate_batch_norm, sample_slices


def _slices(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((24, 20)).astype(np.float32) * (1 + i % 3) for i in range(count)]


def _net() -> UNet:
    torch.manual_seed(0)
    return UNet(1, 3, [4, 8, 8, 16, 16], dropout=[0.5] * 5)


def _first_norm_input(model: UNet, images: list[np.ndarray], patch=(16, 16)) -> torch.Tensor:
    """What the first batch-norm layer sees for these images (its preceding convolution's output)."""
    from mpcl.preprocessing import resize_2d

    captured = {}
    first = batch_norm_layers(model)[0]
    handle = first.register_forward_hook(lambda module, inputs, output: captured.setdefault("x", inputs[0]))
    batch = np.stack([resize_2d(image[None], patch, order=1)[0] for image in images])[:, None]
    with torch.no_grad():
        model.eval()(torch.from_numpy(batch))
    handle.remove()
    return captured["x"]


def test_running_statistics_are_the_average_of_the_batch_statistics():
    model, images = _net(), _slices(8)
    features = [_first_norm_input(model, images[:4]), _first_norm_input(model, images[4:])]
    used = recalibrate_batch_norm(model, images, (16, 16), batch_size=4)
    assert used == 2
    first = batch_norm_layers(model)[0]
    expected_mean = torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0)
    expected_var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in features]).mean(0)
    assert torch.allclose(first.running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(first.running_var, expected_var, rtol=1e-4, atol=1e-6)


def test_eval_output_then_matches_batch_statistics_on_that_batch():
    model, images = _net(), _slices(6)
    for layer in batch_norm_layers(model):  # stale statistics, as after training on other images
        layer.running_mean.fill_(3.0)
        layer.running_var.fill_(50.0)
    from mpcl.preprocessing import resize_2d

    batch = torch.from_numpy(np.stack([resize_2d(i[None], (16, 16), order=1)[0] for i in images])[:, None])
    with torch.no_grad():
        stale = model.eval()(batch)
        recalibrate_batch_norm(model, images, (16, 16), batch_size=6)
        calibrated = model.eval()(batch)
        for layer in batch_norm_layers(model):
            layer.train()
        batch_statistics = model(batch)  # dropout off (module eval), batch norm on batch statistics
    # n/(n-1) between the unbiased running and the biased batch variance leaves a small difference
    assert torch.allclose(calibrated, batch_statistics, atol=0.05)
    assert not torch.allclose(stale, batch_statistics, atol=0.05)


def test_weights_modes_and_momentum_are_left_alone_and_dropout_is_off():
    model, images = _net(), _slices(8)
    weights = {
        k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k
    }
    model.train()
    recalibrate_batch_norm(model, images, (16, 16), batch_size=4)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    recalibrate_batch_norm(model, images, (16, 16), batch_size=4)  # dropout p=0.5 would change these
    assert model.training and all(layer.momentum == 0.1 for layer in batch_norm_layers(model))
    for key, value in model.state_dict().items():
        assert torch.equal(value, first[key]), key
        if key in weights:
            assert torch.equal(value, weights[key]), key


def test_dropout_probe_learns_the_inflated_variance_dropout_causes():
    # dropout (p = 0.5, scaled by 2 in training) feeds the second batch-norm layer of each block, so
    # statistics gathered with dropout active see a larger variance than eval mode ever produces
    images = _slices(8)
    clean, dropped = _net().eval(), _net().eval()
    recalibrate_batch_norm(clean, images, (16, 16), batch_size=4)
    recalibrate_batch_norm(dropped, images, (16, 16), batch_size=4, dropout=True)
    first_clean, first_dropped = batch_norm_layers(clean)[0], batch_norm_layers(dropped)[0]
    assert torch.equal(first_clean.running_var, first_dropped.running_var)  # before any dropout layer
    second_clean, second_dropped = batch_norm_layers(clean)[1], batch_norm_layers(dropped)[1]
    assert float(second_dropped.running_var.mean()) > 1.3 * float(second_clean.running_var.mean())
    assert not dropped.training and not any(m.training for m in dropped.modules())


def test_too_few_slices_for_a_batch_change_nothing():
    model = _net()
    before = batch_norm_layers(model)[0].running_mean.clone()
    assert recalibrate_batch_norm(model, _slices(3), (16, 16), batch_size=4) == 0
    assert torch.equal(batch_norm_layers(model)[0].running_mean, before)


def test_sample_slices_is_seeded_and_distinct():
    pool = [np.full((2, 2), i, np.float32) for i in range(10)]
    a, b = sample_slices(pool, 4, seed=1), sample_slices(pool, 4, seed=1)
    values = [int(s[0, 0]) for s in a]
    assert values == [int(s[0, 0]) for s in b] and len(set(values)) == 4
    assert len(sample_slices(pool, 50, seed=1)) == 10


@pytest.mark.slow
def test_trainer_recalibrates_before_validation(tiny_config):
    from mpcl.training.data.loading import load_data
    from mpcl.training.trainer import Trainer

    config = tiny_config("supervised", iterations=3)
    config.train.bn_recalibration_slices = 8
    trainer = Trainer(config, load_data(config.data))
    trainer.fit(progress=False)
    first = batch_norm_layers(trainer.models.student)[0]
    state = torch.load(trainer.output_dir / "best.pt", weights_only=False)
    # the statistics validation used went into best.pt: a fresh recalibration reproduces them exactly
    reference = copy.deepcopy(trainer.models.student)
    trainer.recalibrate_batch_norm(reference, iteration=3)
    assert torch.allclose(batch_norm_layers(reference)[0].running_mean, first.running_mean)
    assert torch.allclose(state["student"]["encoder.0.block.1.running_mean"], first.running_mean)


def test_negative_recalibration_count_is_refused(tmp_path):
    from mpcl.training.config import config_from_dict
    from tests.conftest import tiny_config_dict

    data = tiny_config_dict(tmp_path, "supervised")
    data["train"]["bn_recalibration_slices"] = -1
    with pytest.raises(ConfigError, match="bn_recalibration_slices must be >= 0"):
        config_from_dict(data)
