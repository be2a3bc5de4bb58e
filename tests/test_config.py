from pathlib import Path

import pytest
import yaml

from mpcl.errors import ConfigError
from mpcl.training.config import config_from_dict, load_config
from tests.conftest import tiny_config_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config = load_config(path)
    assert config.experiment == path.stem


def test_valid_dict_round_trips(tmp_path):
    config = config_from_dict(tiny_config_dict(tmp_path))
    assert config.data.patch_size == (32, 32)
    assert config.train.lr == 0.01 and config.train.momentum == 0.9 and config.train.weight_decay == 1e-4
    assert config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda d: d["train"].update(iteratoins=5),
            "unknown key 'config.train.iteratoins' (did you mean 'iterations'?)",
        ),
        (lambda d: d.update(sed=1), "unknown key 'config.sed'"),
        (lambda d: d["train"].update(iterations="many"), "config.train.iterations must be an integer"),
        (lambda d: d["train"].update(iterations=0), "train.iterations must be > 0"),
        (lambda d: d["data"].update(kind="dicom"), "config.data.kind must be one of"),
        (lambda d: d["data"].update(patch_size=[30, 30]), "multiples of 16"),
        (lambda d: d["data"].update(patch_size=[32]), "must have 2 items"),
        (lambda d: d["method"].update(name="fixmatch"), "method.name 'fixmatch' is not a known method"),
        (lambda d: d["method"]["params"].update(ema_decy=0.9), "unknown key 'method.params.ema_decy'"),
        (lambda d: d["data"].update(kind="acdc"), "data.root is required"),
        (lambda d: d["model"].update(channels=[4, 8]), "5 values"),
    ],
)
def test_invalid_configs_name_the_key(tmp_path, mutate, message):
    data = tiny_config_dict(tmp_path)
    mutate(data)
    with pytest.raises(ConfigError) as error:
        config_from_dict(data, "my.yaml")
    assert message in str(error.value)
    assert str(error.value).startswith("my.yaml: ")


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"trian": {"iterations": 3}}))
    with pytest.raises(
        ConfigError, match=r"typo.yaml: unknown key 'config.trian' \(did you mean 'train'\?\)"
    ):
        load_config(typo)


def test_overrides_apply_dotted_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path)))
    config = load_config(path, {"train.iterations": 42, "model.channels": [8, 16, 32, 64, 128]})
    assert config.train.iterations == 42 and config.model.channels == [8, 16, 32, 64, 128]
