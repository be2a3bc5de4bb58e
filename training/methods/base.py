"""The Method protocol: what a semi-supervised method is to the one training loop.

A method is data, not a loop: it declares what it needs (an EMA teacher, unlabelled data, strong views),
owns its parameters and extra modules, and turns one batch into a dict of named, already-weighted loss
terms. The trainer sums the terms, logs each by name (so ablations are visible), steps the optimiser and
owns the teacher's lifecycle: it creates the teacher as a copy of the student, copies the student into it
at every stage switch, moves it after each step as the method's ``teacher_update`` says, and saves it with
the checkpoints. A method only reads ``models.teacher``; it never keeps a teacher of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from mpcl.errors import ConfigError
from mpcl.training.data.batches import Batch
from mpcl.training.losses.consistency import sigmoid_rampup


@dataclass
class Models:
    """The networks of a run. ``teacher`` is an EMA copy of the student when the method asks for one."""

    student: nn.Module
    teacher: nn.Module | None = None
    extra: nn.ModuleDict | None = None  # trainable method-specific heads (projection heads, ...)
    teacher_extra: nn.ModuleDict | None = None  # EMA copies of ``extra`` when the method has a teacher


@dataclass(frozen=True)
class StepInfo:
    iteration: int  # 0-based index of the current step
    total_iterations: int


@dataclass(frozen=True)
class TeacherUpdate:
    """How the trainer moves the teacher after each optimiser step: ``ema`` (teacher ← d·teacher +
    (1 − d)·student on parameters, d = min(1 − 1/(t+1), ``decay``)) or ``frozen`` (the teacher stays as it
    was copied from the student at the run's start or at the last stage switch). Either way its batch-norm
    buffers are its own: a teacher in training mode keeps updating them."""

    kind: Literal["ema", "frozen"] = "ema"
    decay: float = 0.99


@dataclass(frozen=True)
class StageSwitch:
    """A new training stage starts at ``iteration``: the trainer puts the student (with its optimiser
    and method state) back to the stage's ``best`` validation checkpoint or keeps the ``last`` step,
    copies it into the teacher, and chooses ``best.pt`` among the new stage's checkpoints only."""

    iteration: int
    restore: Literal["best", "last"]


def delayed_ramp(step: StepInfo, start: int, length: int | None, stair: int = 1) -> float:
    """0 before iteration ``start``, then the sigmoid ramp-up normalised to 1 (``sigmoid_rampup``, counted
    from iteration 0 over ``length`` iterations, None: the whole run, moving every ``stair`` iterations).
    The one schedule of every ramped loss term; methods multiply it by their weight λ."""
    if step.iteration < start:
        return 0.0
    return sigmoid_rampup(step.iteration, step.total_iterations if length is None else length, stair)


def check_params(checks: Iterable[tuple[bool, str]]) -> None:
    """Raise ``ConfigError("method.params.<message>")`` for the first ``(ok, message)`` that is not ok:
    the value checks of a method's parameter dataclass (``__post_init__``)."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"method.params.{message}")


class Method:
    """Base class; subclasses set the class attributes and implement ``training_step``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type] = object  # a dataclass of the method's config keys (method.params)
    uses_teacher: ClassVar[bool] = False
    uses_unlabeled: ClassVar[bool] = False
    uses_strong_views: ClassVar[bool] = False

    def __init__(self, params: Any, num_classes: int) -> None:
        self.params = params
        self.num_classes = num_classes

    @property
    def ema_decay(self) -> float:
        """Upper bound of the teacher's EMA decay (the trainer ramps it as min(1 − 1/(t+1), decay))."""
        return float(getattr(self.params, "ema_decay", 0.99))

    def teacher_update(self) -> TeacherUpdate:
        """How the trainer moves this method's teacher (only asked when ``uses_teacher``)."""
        return TeacherUpdate("ema", self.ema_decay)

    @classmethod
    def check_batches(cls, params: Any, labeled_batch: int, unlabeled_batch: int) -> str | None:
        """A sentence saying why these batch sizes cannot work for the method, or None if they can."""
        return None

    def stage_switches(self, total_iterations: int) -> list[StageSwitch]:
        """Where the method's training stages change (e.g. BCP's pre-training → self-training)."""
        return []

    def build_extra_modules(self, student: nn.Module) -> dict[str, nn.Module]:
        """Trainable modules besides the student (optimised with it, saved with checkpoints; the teacher
        gets EMA copies). ``student`` tells their input sizes."""
        return {}

    def training_step(self, batch: Batch, models: Models, step: StepInfo) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def inference_model(self, models: Models) -> nn.Module:
        """The network that segments (validation, best-checkpoint choice, evaluation): the student,
        unless the method predicts with something else, e.g. an ensemble of two co-trained branches."""
        return models.student

    def diagnostics(self) -> dict[str, float]:
        """Numbers about the method's state worth logging next to the losses (not optimised)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Non-trainable method state that must survive a resume (e.g. a prototype bank)."""
        return {}

    def upgrade_checkpoint(self, checkpoint: dict[str, Any], source: str) -> None:
        """Rewrite, in place, a whole checkpoint written by an earlier version of the method into this
        version's layout before a resume loads it, or raise ``ConfigError`` naming ``source`` and saying why
        it cannot continue. The default accepts every checkpoint as it is."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} has no state to load, got keys {sorted(state)}")
