"""The training configuration: YAML in, validated dataclasses out.

Unknown keys, wrong types and out-of-range values stop with one sentence that names the key and the
file, so a typo never silently falls back to a default. Method-specific keys live under ``method`` and
are validated by the chosen method's own parameter dataclass. The dataclasses and the strict parsing
are in :mod:`mpcl.training.config_schema` (re-exported here), which the data pipeline and the methods
import, so this module can import the method registry without a cycle.
"""

from __future__ import annotations

import copy
from pathlib import Path

from mpcl.errors import ConfigError
from mpcl.training.config_schema import (
    ACDC_PATIENTS_TO_SLICES,
    AugmentConfig,
    DataConfig,
    EvaluationConfig,
    ExperimentConfig,
    MethodConfig,
    ModelConfig,
    PhantomConfig,
    TrainConfig,
    dataclass_from_dict,
    read_yaml,
)
from mpcl.training.methods import method_class, method_params_from_config
from mpcl.training.protocol import PROTOCOLS, apply_protocol

__all__ = [
    "ACDC_PATIENTS_TO_SLICES",
    "AugmentConfig",
    "DataConfig",
    "EvaluationConfig",
    "ExperimentConfig",
    "MethodConfig",
    "ModelConfig",
    "PhantomConfig",
    "TrainConfig",
    "config_from_dict",
    "dataclass_from_dict",
    "load_config",
    "read_yaml",
]


def _check_ranges(config: ExperimentConfig) -> None:
    """Value checks that types alone cannot express."""
    checks = [
        (config.train.iterations > 0, "train.iterations must be > 0"),
        (config.train.labeled_batch > 0, "train.labeled_batch must be > 0"),
        (config.train.unlabeled_batch >= 0, "train.unlabeled_batch must be >= 0"),
        (config.train.lr > 0, "train.lr must be > 0"),
        (config.train.val_every > 0, "train.val_every must be > 0"),
        (config.train.checkpoint_every > 0, "train.checkpoint_every must be > 0"),
        (config.train.log_every > 0, "train.log_every must be > 0"),
        (config.train.bn_recalibration_slices >= 0, "train.bn_recalibration_slices must be >= 0"),
        (
            all(size >= 16 and size % 16 == 0 for size in config.data.patch_size),
            "data.patch_size must be multiples of 16 (the U-Net downsamples 4 times)",
        ),
        (
            len(config.model.channels) == 5 and len(config.model.dropout) == 5,
            "model.channels and model.dropout must each list 5 values (one per U-Net level)",
        ),
        (
            config.data.kind != "acdc" or config.data.root is not None,
            "data.root is required for data.kind: acdc",
        ),
        (
            config.data.kind != "nifti_folder" or config.data.root is not None,
            "data.root is required for data.kind: nifti_folder",
        ),
        (
            config.data.kind != "phantom" or config.data.root is None,
            "data.root is set but data.kind is phantom, which makes its own data and would ignore it; "
            "set data.kind to acdc or nifti_folder",
        ),
        (
            config.data.labeled_patients is None or config.data.labeled_patients in ACDC_PATIENTS_TO_SLICES,
            f"data.labeled_patients must be one of {sorted(ACDC_PATIENTS_TO_SLICES)}",
        ),
        (0.0 <= config.augment.rot90_flip_prob <= 1.0, "augment.rot90_flip_prob must be in [0, 1]"),
        (all(width > 0 for width in config.model.channels), "model.channels must all be > 0"),
        (
            all(0.0 <= rate < 1.0 for rate in (*config.model.dropout, config.model.decoder_dropout)),
            "model.dropout and model.decoder_dropout must be in [0, 1) (1 drops every feature)",
        ),
        (0.0 <= config.train.momentum < 1.0, "train.momentum must be in [0, 1)"),
        (config.train.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (config.train.poly_power >= 0, "train.poly_power must be >= 0"),
        (
            config.train.num_threads is None or config.train.num_threads > 0,
            "train.num_threads must be > 0 (or left out: all cores)",
        ),
        (
            not (config.train.precision == "fp16" and config.train.device == "cpu"),
            "train.precision: fp16 needs a CUDA GPU and train.device is cpu; use bf16 or fp32 on a CPU",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def config_from_dict(data: dict, source: str = "config") -> ExperimentConfig:
    """Validate a plain mapping (e.g. parsed YAML) into an ExperimentConfig; errors name ``source``."""
    try:
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a mapping of config sections, got {data!r}")
        if data.get("protocol", "published") not in PROTOCOLS:
            raise ConfigError(f"config.protocol must be one of {list(PROTOCOLS)}, got {data['protocol']!r}")
        data = apply_protocol(copy.deepcopy(data))
        config = dataclass_from_dict(ExperimentConfig, data, "config")
        _check_ranges(config)
        params = method_params_from_config(config.method)  # validates method.params
        problem = method_class(config.method.name).check_batches(
            params, config.train.labeled_batch, config.train.unlabeled_batch
        )
        if problem:
            raise ConfigError(problem)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return config


def load_config(path: str | Path, overrides: dict | None = None) -> ExperimentConfig:
    """Read and validate a YAML config; ``overrides`` are dotted keys (``train.iterations``) to values."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config_from_dict(data, str(path))
