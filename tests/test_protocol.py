"""The training protocol: published defaults, the legacy preset, explicit keys, recorded deviations."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from mpcl.errors import ConfigError
from mpcl.preprocessing import zoom_nearest
from mpcl.training.config import config_from_dict
from mpcl.training.data.augment import published_view
from mpcl.training.data.base import Volume
from mpcl.training.evaluate import volume_predictor
from mpcl.training.protocol import describe_protocol
from mpcl.training.trainer import build_network, stored_config
from tests.conftest import tiny_config_dict


def test_defaults_are_the_published_code_path(tmp_path):
    config = config_from_dict(tiny_config_dict(tmp_path, "bcp"))
    assert config.protocol == "published"
    assert config.model.upsampling == "bilinear" and config.augment.policy == "published"
    assert (config.evaluation.resize, config.evaluation.empty_prediction) == ("nearest", "zero")
    params = config.method.params
    assert (params["loss"], params["stage_switch"], params["connectivity"], params["forward_passes"]) == (
        "published",
        "best",
        8,
        "separate",
    )
    assert describe_protocol(config.to_dict()) == {"name": "published", "deviations": []}
    network = build_network(config, 4)
    assert network.hyperparameters()["upsampling"] == "bilinear"


def test_bilinear_network_has_the_published_parameter_count(tmp_path):
    data = tiny_config_dict(tmp_path, "supervised")
    data["model"] = {}  # the SSL4MIS widths
    network = build_network(config_from_dict(data), 4)
    assert sum(p.numel() for p in network.parameters()) == 1_813_764


def test_legacy_preset_fills_only_what_the_config_leaves_out(tmp_path):
    data = tiny_config_dict(tmp_path, "mpcl", base={"mix": "bcp"})
    data["protocol"] = "legacy"
    data["evaluation"] = {"resize": "nearest"}  # an explicit key wins over the preset
    config = config_from_dict(data)
    assert config.model.upsampling == "transposed" and config.augment.policy == "affine"
    assert config.evaluation.resize == "nearest" and config.evaluation.empty_prediction == "undefined"
    base = config.method.params["base"]
    assert (base["loss"], base["stage_switch"], base["connectivity"]) == ("pixel_weighted", "last", 4)
    described = describe_protocol(config.to_dict())
    assert described["name"] == "legacy"
    assert "model.upsampling=transposed" in described["deviations"]
    assert "method.params.base.loss=pixel_weighted" in described["deviations"]
    assert not any(item.startswith("evaluation.resize") for item in described["deviations"])


def test_a_single_deviation_is_named(tmp_path):
    data = tiny_config_dict(tmp_path, "mean_teacher", rampup_step=1)
    described = describe_protocol(config_from_dict(data).to_dict())
    assert described == {"name": "published", "deviations": ["method.params.rampup_step=1"]}


def test_unknown_protocol_and_bad_connectivity_are_refused(tmp_path):
    data = tiny_config_dict(tmp_path, "bcp")
    data["protocol"] = "paper"
    with pytest.raises(ConfigError, match="config.protocol must be one of"):
        config_from_dict(data)
    with pytest.raises(ConfigError, match="connectivity must be 4 or 8"):
        config_from_dict(tiny_config_dict(tmp_path, "bcp", connectivity=6))


def test_checkpoints_written_before_protocols_load_as_legacy(tmp_path):
    old = config_from_dict(tiny_config_dict(tmp_path, "supervised")).to_dict()
    for key in ("protocol", "evaluation"):
        old.pop(key)
    old["model"].pop("upsampling")
    old["augment"].pop("policy")
    config = stored_config({"config": old}, "old.pt")
    assert config.protocol == "legacy" and config.model.upsampling == "transposed"


@pytest.mark.parametrize("shape", [(216, 256), (154, 224), (232, 256), (512, 428), (176, 208)])
@pytest.mark.parametrize("patch", [128, 256])
def test_zoom_nearest_is_scipys_order_0_zoom_both_ways(shape, patch):
    rng = np.random.default_rng(0)
    image = rng.random(shape).astype(np.float32)
    expected = ndimage.zoom(image, (patch / shape[0], patch / shape[1]), order=0)
    assert np.array_equal(zoom_nearest(image, (patch, patch)), expected)
    labels = rng.integers(1, 4, (2, patch, patch)).astype(np.uint8)  # nonzero: scipy's zeroed border shows
    back = np.stack([ndimage.zoom(s, (shape[0] / patch, shape[1] / patch), order=0) for s in labels])
    assert np.array_equal(zoom_nearest(labels, shape), back)


class _Draws:
    """A numpy Generator stand-in that returns planned draws, to follow each branch of the view."""

    def __init__(self, randoms, integers):
        self.randoms, self.ints = list(randoms), list(integers)

    def random(self):
        return self.randoms.pop(0)

    def integers(self, low, high):
        value = self.ints.pop(0)
        assert low <= value < high
        return value


def test_published_view_follows_random_generator_branches():
    rng = np.random.default_rng(1)
    image, label = rng.random((20, 24)).astype(np.float32), rng.integers(0, 4, (20, 24)).astype(np.uint8)
    zoom = lambda x: ndimage.zoom(x, (16 / x.shape[0], 16 / x.shape[1]), order=0)  # noqa: E731
    flipped = published_view(_Draws([0.7], [1, 0]), image, label, (16, 16))  # rot90 k=1, flip axis 0
    assert np.array_equal(flipped[0], zoom(np.flip(np.rot90(image, 1), 0)))
    assert np.array_equal(flipped[1], zoom(np.flip(np.rot90(label, 1), 0)))
    rotated = published_view(_Draws([0.2, 0.9], [-13]), image, label, (16, 16))
    assert np.array_equal(rotated[0], zoom(ndimage.rotate(image, -13, order=0, reshape=False)))
    assert np.array_equal(rotated[1], zoom(ndimage.rotate(label, -13, order=0, reshape=False)))
    plain = published_view(_Draws([0.5, 0.5], []), image, None, (16, 16))  # 25 %: no augmentation
    assert np.array_equal(plain[0], zoom(image)) and plain[1] is None


def test_nearest_evaluation_is_the_bcp_test_loop():
    """Each slice zoomed to the patch with order 0, argmax, zoomed back with order 0 (test_ACDC.py)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1))
    rng = np.random.default_rng(0)
    volume = Volume(name="v", image=rng.random((3, 37, 29)).astype(np.float32), label=None)
    labels = volume_predictor(model, (16, 16), torch.device("cpu"), resize="nearest")(volume)
    expected = np.zeros((3, 37, 29), np.uint8)
    with torch.no_grad():
        for index, image in enumerate(volume.image):
            small = ndimage.zoom(image, (16 / 37, 16 / 29), order=0)
            out = model(torch.from_numpy(small)[None, None]).softmax(1).argmax(1)[0].numpy()
            expected[index] = ndimage.zoom(out, (37 / 16, 29 / 16), order=0)
    assert np.array_equal(labels, expected)
