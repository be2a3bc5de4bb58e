"""Knowledge distillation into a compact student: the same U-Net with fewer channels, for speed.

The trained network (teacher, eval mode, BN folded for speed) labels every slice softly; the student learns
T²·KL(softmax(t/T) ‖ softmax(s/T)) on labelled and unlabelled slices alike (the teacher's dark knowledge
is what the unlabelled pool carries) plus soft Dice against the ground truth on labelled slices. Batches
come from training's BatchFactory with the teacher's own augmentation, so the student sees what the
teacher was trained on. The student is validated on the validation volumes every ``val_every`` steps
with training's evaluation code and the best one is returned; the config is a small YAML file
(``configs/distill/small.yaml``), validated on load like every config.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mpcl.errors import ConfigError
from mpcl.export.channel_selection import init_from_teacher_channels
from mpcl.export.parity import mean_dice
from mpcl.nn.folding import fold_batch_norm
from mpcl.nn.unet import UNet
from mpcl.training.config import AugmentConfig, dataclass_from_dict, read_yaml
from mpcl.training.data.base import SegmentationData
from mpcl.training.data.batches import BatchFactory, prefetch
from mpcl.training.losses.dice import soft_dice_loss
from mpcl.training.trainer import poly_lr, select_device


@dataclass
class DistillConfig:
    """Student widths and the distillation schedule (keys of the YAML file)."""

    channels: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    dropout: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5])
    iterations: int = 1500
    labeled_batch: int = 8
    unlabeled_batch: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    temperature: float = 4.0
    kd_weight: float = 1.0
    dice_weight: float = 1.0
    val_every: int = 250
    seed: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = None
    # random: a fresh network; teacher_channels: start from the teacher's most important channels
    # (export/channel_selection.py), so distillation repairs a pruned teacher instead of starting over
    init: Literal["random", "teacher_channels"] = "random"


def _check(config: DistillConfig) -> None:
    checks = [
        (
            len(config.channels) == 5 and all(c > 0 for c in config.channels),
            "channels must be 5 positive widths",
        ),
        (
            len(config.dropout) == 5 and all(0 <= d < 1 for d in config.dropout),
            "dropout must be 5 rates in [0, 1)",
        ),
        (config.iterations > 0, "iterations must be > 0"),
        (config.labeled_batch > 0, "labeled_batch must be > 0"),
        (config.unlabeled_batch >= 0, "unlabeled_batch must be >= 0"),
        (config.lr > 0, "lr must be > 0"),
        (config.temperature > 0, "temperature must be > 0"),
        (config.kd_weight >= 0 and config.dice_weight >= 0, "kd_weight and dice_weight must be >= 0"),
        (config.kd_weight + config.dice_weight > 0, "kd_weight and dice_weight cannot both be 0"),
        (config.val_every > 0, "val_every must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def load_distill_config(path: str | Path) -> DistillConfig:
    """Read and validate a distillation YAML file; problems name the file and the key."""
    data = read_yaml(path, "distillation config")
    try:
        config = dataclass_from_dict(DistillConfig, data, "distill")
        _check(config)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return config


@dataclass
class DistillResult:
    student: UNet  # the best student by validation Dice, eval mode, on the CPU
    student_dice: float
    teacher_dice: float
    best_iteration: int
    iterations: int
    history: list[dict] = field(default_factory=list)  # {"iteration", "loss", "val_dice"} rows

    @property
    def retention(self) -> float:
        """Student Dice as a fraction of the teacher's."""
        return self.student_dice / self.teacher_dice if self.teacher_dice > 0 else float("nan")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    config: DistillConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """kd_weight·T²·KL(teacher ‖ student) over all slices + dice_weight·soft Dice on the first len(labels)."""
    t = config.temperature
    kd = F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1), reduction="none"
    )
    kd = kd.sum(1).mean() * t * t
    dice = soft_dice_loss(torch.softmax(student_logits[: len(labels)], dim=1), labels)
    return config.kd_weight * kd + config.dice_weight * dice, {"kd": kd.detach(), "dice": dice.detach()}


def distill(
    teacher: nn.Module,
    data: SegmentationData,
    config: DistillConfig,
    patch_size: tuple[int, int],
    augment: AugmentConfig,
    teacher_dice: float,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    resize: str = "linear",
) -> DistillResult:
    """Train a ``config.channels`` U-Net from ``teacher``'s soft predictions; returns the best student.
    ``teacher`` is the trained network with its batch norms (a folded copy makes the soft labels).
    ``echo`` gets one line per validation, so a run without a progress bar still reports."""
    device = select_device(config.device)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    student = UNet(1, data.num_classes, config.channels, config.dropout, upsampling=_upsampling(teacher))
    if config.init == "teacher_channels":
        if not isinstance(teacher, UNet):
            raise ConfigError("init: teacher_channels needs a U-Net teacher")
        init_from_teacher_channels(student, teacher)
    student = student.to(device)
    teacher = fold_batch_norm(teacher).to(device).requires_grad_(False)
    try:
        factory = BatchFactory(
            data.labeled,
            data.unlabeled,
            tuple(patch_size),
            config.labeled_batch,
            config.unlabeled_batch if data.unlabeled else 0,
            augment,
            config.seed,
        )
    except ValueError as error:
        raise ConfigError(f"distillation data: {error}") from None
    optimizer = torch.optim.SGD(
        student.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    best_dice, best_iteration, best_state = -1.0, 0, copy.deepcopy(student.state_dict())
    history: list[dict] = []
    bar = tqdm(total=config.iterations, desc="distill", unit="it", disable=not progress)
    try:
        for iteration, batch in enumerate(prefetch(factory, 0, config.iterations)):
            batch = batch.to(device)
            images = torch.cat([batch.labeled_image, batch.unlabeled_image])
            with torch.no_grad():
                teacher_logits = teacher(images)
            student.train()
            loss, terms = distillation_loss(student(images), teacher_logits, batch.labeled_label, config)
            lr = poly_lr(config.lr, iteration, config.iterations, config.poly_power)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done = iteration + 1
            row = {"iteration": done, "loss": float(loss.item()), **{k: float(v) for k, v in terms.items()}}
            if done % config.val_every == 0 or done == config.iterations:
                student.eval()
                row["val_dice"] = mean_dice(student, data.val_volumes, data.class_names, patch_size, resize)
                if row["val_dice"] > best_dice:
                    best_dice, best_iteration = row["val_dice"], done
                    best_state = copy.deepcopy(student.state_dict())
                if echo is not None:
                    echo(
                        f"distill iteration {done}/{config.iterations}: loss {row['loss']:.4f}, validation "
                        f"Dice {row['val_dice']:.4f} (best {best_dice:.4f} at {best_iteration})"
                    )
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", best_dice=f"{max(best_dice, 0):.3f}")
            bar.update(1)
    finally:
        bar.close()
    student.load_state_dict(best_state)
    return DistillResult(
        student.cpu().eval(), best_dice, teacher_dice, best_iteration, config.iterations, history
    )


def _upsampling(teacher: nn.Module) -> str:
    """The teacher's upsampling, so the student keeps the teacher's architecture apart from widths."""
    return teacher.hyperparameters()["upsampling"] if isinstance(teacher, UNet) else "transposed"


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
