"""The training configuration: YAML in, validated dataclasses out.

Unknown keys, wrong types and out-of-range values stop with one sentence that names the key and the
file, so a typo never silently falls back to a default. Method-specific keys live under ``method`` and
are validated by the chosen method's own parameter dataclass.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mpcl.errors import ConfigError
from mpcl.training.protocol import PROTOCOLS, apply_protocol

# SSL4MIS `patients_to_slices` for ACDC: labelled patients -> first N lines of train_slices.list.
ACDC_PATIENTS_TO_SLICES = {1: 32, 3: 68, 7: 136, 14: 256, 21: 396, 28: 512, 35: 664, 70: 1312, 140: 1312}


@dataclass
class PhantomConfig:
    """Synthetic cardiac phantom: numbers of generated volumes per split and the slice size."""

    seed: int = 0
    n_labeled: int = 4
    n_unlabeled: int = 16
    n_val: int = 2
    n_test: int = 2
    size: tuple[int, int] = (128, 128)
    slices_per_volume: int = 8


@dataclass
class DataConfig:
    kind: Literal["acdc", "nifti_folder", "phantom"] = "phantom"
    root: str | None = None
    labeled_patients: int | None = None  # ACDC: 3 or 7 (SSL4MIS protocol); mapped to slice counts
    labeled_slices: int | None = None  # ACDC: explicit number of first lines of train_slices.list
    labeled_cases: int | None = None  # NIfTI folder: labelled cases used for training (rest unlabelled)
    val_cases: int = 1  # NIfTI folder: labelled cases held out for validation
    class_names: list[str] | None = None
    normalization: Literal["minmax", "zscore", "percentile", "none"] = "minmax"
    patch_size: tuple[int, int] = (256, 256)
    val_volumes: int | None = None  # evaluate only the first N validation volumes (None = all)
    phantom: PhantomConfig = field(default_factory=PhantomConfig)


@dataclass
class AugmentConfig:
    """Weak view (geometry) and strong view (intensity) parameters; see mpcl.training.data.augment.

    ``policy: published`` is SSL4MIS/BCP's RandomGenerator (rot90+flip with probability ½, else an
    integer rotation in [-20, 20) degrees with probability ½, else nothing; then a nearest-neighbour
    zoom to the patch); the rotation and scale keys below apply to ``policy: affine`` (this project's
    earlier view: one bilinear affine resampling with random scaling)."""

    policy: Literal["published", "affine"] = "published"
    rot90_flip_prob: float = 0.5
    rotation_degrees: float = 20.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    strong_brightness: float = 0.1
    strong_contrast: float = 0.2
    strong_gamma: float = 0.3
    strong_blur_sigma: tuple[float, float] = (0.1, 1.0)
    strong_blur_prob: float = 0.5
    strong_noise_std: float = 0.05
    strong_cutout_prob: float = 0.5
    strong_cutout_fraction: float = 0.25


@dataclass
class ModelConfig:
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    dropout: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5])
    decoder_dropout: float = 0.0
    deep_supervision: bool = False
    # bilinear: 1x1 conv + bilinear x2, as SSL4MIS's and BCP's UNet (1.81 M parameters with 4 classes)
    upsampling: Literal["bilinear", "transposed"] = "bilinear"


@dataclass
class EvaluationConfig:
    """How validation and test volumes are segmented and scored (and how the package segments)."""

    # nearest: each slice zoomed to the patch and the predicted labels zoomed back with order 0, as the
    # SSL4MIS/BCP test scripts; linear: bilinear image resize and class probabilities resized back
    resize: Literal["nearest", "linear"] = "nearest"
    # zero: a class predicted empty scores Dice, Jaccard, HD95 and ASD 0 (BCP's test_ACDC.py);
    # undefined: its HD95/ASD are undefined and left out of the means (counted as n_undefined)
    empty_prediction: Literal["zero", "undefined"] = "zero"


@dataclass
class TrainConfig:
    iterations: int = 30000
    labeled_batch: int = 12
    unlabeled_batch: int = 12
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9  # 0 keeps the learning rate constant
    val_every: int = 200
    checkpoint_every: int = 1000
    log_every: int = 10
    # > 0: before each validation, batch-norm running statistics are recomputed from this many clean
    # training slices (mpcl.training.batchnorm); they then also go into best.pt and the model package
    bn_recalibration_slices: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = None


@dataclass
class MethodConfig:
    name: str = "supervised"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExperimentConfig:
    experiment: str = "experiment"
    output_dir: str = "runs/experiment"
    seed: int = 1337
    # which code path the defaults reproduce (mpcl.training.protocol); explicit keys still win
    protocol: Literal["published", "legacy"] = "published"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _to_plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(item) for item in value]
    return value


def _describe(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a type annotation and return it in that type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (arg for arg in args if arg is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return dataclass_from_dict(annotation, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where} must have {len(args)} items, got {len(value)}")
            return tuple(
                _coerce(item, arg, f"{where}[{i}]")
                for i, (item, arg) in enumerate(zip(value, args, strict=True))
            )
        item_type = args[0] if args else Any
        items = [_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_describe(annotation)}")  # a bug in a schema


def dataclass_from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys (with a did-you-mean hint)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key '{where}.{key}'{hint}")
    values = {key: _coerce(value, hints[key], f"{where}.{key}") for key, value in data.items()}
    return cls(**values)


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
        from mpcl.training.methods import method_class, method_params_from_config

        params = method_params_from_config(config.method)  # validates method.params
        problem = method_class(config.method.name).check_batches(
            params, config.train.labeled_batch, config.train.unlabeled_batch
        )
        if problem:
            raise ConfigError(problem)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    return config


def read_yaml(path: str | Path, kind: str = "config") -> Any:
    """The parsed content of a YAML file (empty file: {}); a missing file or bad YAML is one sentence."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {kind} file does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
            "save it as UTF-8"
        ) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        reason = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({reason}{where})") from None


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
