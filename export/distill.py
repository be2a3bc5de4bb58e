"""Knowledge distillation into a compact student: the same U-Net with fewer channels, for speed.

Distillation is the ``distill`` method of the one training loop (:mod:`mpcl.training.methods.distill`:
the loss, the frozen teacher); this module turns a distillation YAML file (``configs/distill/small.yaml``)
into an ordinary experiment config and runs the :class:`~mpcl.training.trainer.Trainer`, so a
distillation gets the trainer's seeding, SGD with poly lr, batches (with the teacher's own augmentation,
so the student sees what the teacher was trained on), validation, best.pt, CSV logs, curves and resume.

A distillation YAML has the sections of a training config that concern the student: ``seed``, ``model``
(the student's widths and dropout), ``train`` (the schedule; defaults below) and ``method.params``
(temperature, kd/dice weights, init). Data, augmentation, evaluation, protocol and the upsampling come
from the teacher's stored config; ``method.params.teacher`` is filled in with the teacher's checkpoint.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpcl.errors import ConfigError
from mpcl.export.channel_selection import init_from_teacher_channels
from mpcl.export.parity import mean_dice
from mpcl.model_package import load_model_package
from mpcl.nn.checkpoint import load_checkpoint
from mpcl.nn.unet import UNet
from mpcl.training.config import ExperimentConfig, config_from_dict, read_yaml
from mpcl.training.data.base import SegmentationData
from mpcl.training.methods.distill import load_teacher
from mpcl.training.trainer import Trainer, build_network

DISTILL_SECTIONS = ("seed", "model", "train", "method")  # the keys of a distillation YAML
DEFAULT_SEED = 1
DEFAULT_MODEL = {"channels": [8, 16, 32, 64, 128], "dropout": [0.05, 0.1, 0.2, 0.3, 0.5]}
DEFAULT_TRAIN = {"iterations": 1500, "labeled_batch": 8, "unlabeled_batch": 8, "val_every": 250}
TEACHER_SECTIONS = ("protocol", "data", "augment", "evaluation")  # taken from the teacher's config


def distill_config_dict(
    data: Any,
    teacher_config: Mapping[str, Any] | None = None,
    teacher: str | Path = "",
    output_dir: str | Path = "runs/distill",
) -> dict:
    """The experiment config (a plain mapping) of a distillation YAML's content ``data``: the student's
    sections from ``data`` over the distillation defaults, the rest from ``teacher_config`` (a stored
    training config; None: the defaults, enough to validate the file)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a distillation config must be a mapping of keys to values, got {data!r}")
    for key in data:
        if key not in DISTILL_SECTIONS:
            raise ConfigError(f"unknown key 'distill.{key}'; known keys: {', '.join(DISTILL_SECTIONS)}")
    method = data.get("method") or {}
    if not isinstance(method, dict) or set(method) - {"name", "params"}:
        raise ConfigError("distill.method must be a mapping with 'params' (and optionally name: distill)")
    if method.get("name", "distill") != "distill":
        raise ConfigError(f"distill.method.name must be 'distill', got {method['name']!r}")
    params = dict(method.get("params") or {})
    if "teacher" in params:
        raise ConfigError("distill.method.params.teacher is set by mpcl-export (the source checkpoint)")
    teacher_config = dict(teacher_config or {})
    config = {key: copy.deepcopy(teacher_config[key]) for key in TEACHER_SECTIONS if key in teacher_config}
    model = {**DEFAULT_MODEL, "decoder_dropout": 0.0, "deep_supervision": False}
    upsampling = (teacher_config.get("model") or {}).get("upsampling")
    if upsampling is not None:
        model["upsampling"] = upsampling  # the teacher's architecture apart from widths
    model.update(data.get("model") or {})
    config.update(
        experiment="distill",
        output_dir=str(output_dir),
        seed=data.get("seed", DEFAULT_SEED),
        model=model,
        train={**DEFAULT_TRAIN, **(data.get("train") or {})},
        method={"name": "distill", "params": {**params, "teacher": str(teacher)}},
    )
    return config


def load_distill_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a distillation YAML file (against the default teacher sections); problems name
    the file and the key."""
    data = read_yaml(path, "distillation config")
    try:
        config = distill_config_dict(data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return config_from_dict(config, str(path))


def teacher_checkpoint(source: str | Path) -> Path:
    """The checkpoint file of an export source: a training checkpoint, or a package folder's model.pt."""
    source = Path(source)
    return load_model_package(source).path_of("torch") if source.is_dir() else source


@dataclass
class DistillResult:
    student: UNet  # the best student by validation Dice, eval mode, on the CPU
    student_dice: float
    teacher_dice: float
    best_iteration: int
    iterations: int
    run_dir: Path  # the trainer's output: best.pt, latest.pt, train_log.csv, val_log.csv, curves.png
    history: list[dict] = field(default_factory=list)  # val_log.csv's rows

    @property
    def retention(self) -> float:
        """Student Dice as a fraction of the teacher's."""
        return self.student_dice / self.teacher_dice if self.teacher_dice > 0 else float("nan")


class _DistillTrainer(Trainer):
    """The one Trainer, echoing a line per validation (so a run without a progress bar still reports)."""

    echo: Callable[[str], None] | None = None
    _last_loss: torch.Tensor | None = None

    def train_step(self, iteration, batch):
        loss, terms, lr = super().train_step(iteration, batch)
        self._last_loss = loss
        return loss, terms, lr

    def validate(self, iteration: int) -> float:
        dice = super().validate(iteration)
        if self.echo is not None:
            loss = f"{self._last_loss.item():.4f}" if self._last_loss is not None else "-"
            self.echo(
                f"distill iteration {iteration}/{self.config.train.iterations}: loss {loss}, validation "
                f"Dice {dice:.4f} (best {self.best_dice:.4f} at {self.best_iteration})"
            )
        return dice


def distill(
    source: str | Path,
    data: SegmentationData,
    config_path: str | Path,
    teacher_config: Mapping[str, Any],
    run_dir: str | Path,
    teacher_dice: float,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> DistillResult:
    """Train the student of the distillation YAML ``config_path`` from the network of ``source`` (a
    checkpoint or package folder, trained with ``teacher_config``) with the Trainer in ``run_dir``;
    returns the best student. A ``run_dir`` holding a latest.pt of the same config is resumed."""
    run_dir = Path(run_dir)
    teacher = teacher_checkpoint(source).resolve()
    raw = read_yaml(config_path, "distillation config")
    try:
        plain = distill_config_dict(raw, teacher_config, teacher, run_dir)
        if not data.unlabeled:  # a teacher trained without unlabelled data: labelled slices only
            plain["train"]["unlabeled_batch"] = 0
    except ConfigError as error:
        raise ConfigError(f"{config_path}: {error}") from None
    config = config_from_dict(plain, str(config_path))
    trainer = _DistillTrainer(config, data, run_dir)
    trainer.echo = echo
    latest = run_dir / "latest.pt"
    if latest.is_file():
        try:
            trainer.resume_from(latest)
        except ConfigError as error:
            raise ConfigError(
                f"{error} (an earlier distillation with another config is in {run_dir}; remove it)"
            ) from None
    elif config.method.params.get("init", "random") == "teacher_channels":
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            init_from_teacher_channels(trainer.models.student, load_teacher(teacher))
    trainer.fit(progress=progress)
    student = build_network(config, data.num_classes)
    student.load_state_dict(load_checkpoint(run_dir / "best.pt")["student"])
    student.eval()
    patch = tuple(config.data.patch_size)
    student_dice = mean_dice(student, data.val_volumes, data.class_names, patch, config.evaluation.resize)
    return DistillResult(
        student,
        student_dice,
        teacher_dice,
        trainer.best_iteration,
        config.train.iterations,
        run_dir,
        trainer.val_log.rows(),
    )


@torch.no_grad()
def forward_seconds(model: nn.Module, batch: torch.Tensor, repeats: int = 5) -> float:
    """Median eager forward time of ``model`` on ``batch`` after one warm-up (for the speed-up report)."""
    model = model.eval()
    model(batch)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times)
