"""The training configuration's schema: its dataclasses and strict parsing, with no method knowledge.

``dataclass_from_dict`` builds a dataclass from a mapping, refusing unknown keys (with a did-you-mean
hint), wrong types and non-finite numbers with one sentence that names the key. The data pipeline and
the methods import their sections from here; :mod:`mpcl.training.config` builds on it (value ranges, the
method's own parameters) and is what callers use to read a config.
"""

from __future__ import annotations

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
from mpcl.preprocessing import ct_statistics_problem

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
class CTNormalizationConfig:
    """``data.normalization: ct``: clip to [clip_lower, clip_upper], then (x - mean) / std, with fixed
    dataset statistics (mpcl-plan measures them on the labelled foreground), the same for every scan."""

    clip_lower: float | None = None
    clip_upper: float | None = None
    mean: float | None = None
    std: float | None = None


@dataclass
class DataConfig:
    kind: Literal["acdc", "nifti_folder", "phantom"] = "phantom"
    root: str | None = None
    labeled_patients: int | None = None  # ACDC: 3 or 7 (SSL4MIS protocol); mapped to slice counts
    labeled_slices: int | None = None  # ACDC: explicit number of first lines of train_slices.list
    labeled_cases: int | None = None  # NIfTI folder: labelled cases used for training (rest unlabelled)
    val_cases: int = 1  # NIfTI folder: labelled cases held out for validation
    class_names: list[str] | None = None
    normalization: Literal["minmax", "zscore", "percentile", "none", "ct"] = "minmax"
    patch_size: tuple[int, int] = (256, 256)
    val_volumes: int | None = None  # evaluate only the first N validation volumes (None = all)
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    # NIfTI folder, as planned by mpcl-plan (mpcl.planned_geometry); the defaults are the unplanned path:
    # slices across each case's coarsest axis, zoomed whole to patch_size, per-volume normalisation
    ct_normalization: CTNormalizationConfig | None = None  # the statistics of normalization: ct
    slicing_axis: Literal["auto", "z", "y", "x"] = "auto"  # auto: each case's coarsest-spaced axis
    target_spacing: tuple[float, float] | None = None  # mm along the slices' rows and columns
    crop_to_nonzero: bool = False  # crop each case to its image's non-zero bounding box

    def __post_init__(self) -> None:
        """The planned keys' consistency (types are checked by the parser, ranges here)."""
        planned = [
            key
            for key, unplanned in (
                ("slicing_axis", "auto"),
                ("target_spacing", None),
                ("crop_to_nonzero", False),
                ("ct_normalization", None),
            )
            if getattr(self, key) != unplanned
        ]
        if self.normalization == "ct":
            planned.append("normalization")
        if planned and self.kind != "nifti_folder":
            raise ConfigError(
                f"data.{planned[0]} applies to data.kind: nifti_folder only (the {self.kind} loader has "
                "no scan geometry or raw intensities to plan); remove it or change data.kind"
            )
        if self.target_spacing is not None and not all(
            0.001 <= value <= 100 for value in self.target_spacing
        ):
            raise ConfigError(
                f"data.target_spacing must be two spacings from 0.001 to 100 mm, got "
                f"{list(self.target_spacing)}"
            )
        ct = self.ct_normalization
        if self.normalization != "ct":
            if ct is not None:
                raise ConfigError(
                    f"data.ct_normalization is set but data.normalization is {self.normalization}; set "
                    "data.normalization: ct to use it, or remove it"
                )
            return
        values = None if ct is None else (ct.clip_lower, ct.clip_upper, ct.mean, ct.std)
        if values is None or any(value is None for value in values):
            raise ConfigError(
                "data.normalization: ct needs data.ct_normalization with clip_lower, clip_upper, mean and "
                "std (the dataset's foreground statistics; mpcl-plan --config-out writes them)"
            )
        problem = ct_statistics_problem(*values)
        if problem:
            raise ConfigError(f"data.ct_normalization {problem}")


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
    # autocast dtype of forward passes and losses (mpcl.training.precision says what stays float32);
    # auto: bf16 on a CUDA GPU that supports it, else fp32; fp16 only on CUDA (with a gradient scaler)
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    # networks and image batches in torch.channels_last memory format (dropout masks are then drawn in
    # that memory order: other masks than NCHW's, from the same distribution); auto: on when training on a
    # CPU (measured faster there for every method), off on a GPU (not measured yet)
    channels_last: bool | Literal["auto"] = "auto"
    # under torchrun (several processes): the student's and teacher's batch norms use the statistics of
    # the global batch, so N processes normalise as one would (mpcl.training.distributed); no effect alone
    sync_batchnorm: bool = False
    # the training step's student and teacher through torch.compile (mpcl.training.compilation); costs a
    # minute or more of compiling before the first step; benchmarks/train_speed.py measures whether it pays
    compile: bool = False


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
        wants = [error.split(" must be ", 1)[-1].rsplit(", got ", 1)[0] for error in errors]
        if len(errors) == 1 or not all(error.startswith(f"{where} must be ") for error in errors):
            raise ConfigError(errors[0])
        raise ConfigError(f"{where} must be {' or '.join(wants)}, got {value!r}")  # e.g. bool or "auto"
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
