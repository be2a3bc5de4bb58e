"""The one training loop shared by every method.

Per step: build the two-stream batch for iteration t, ask the method for its named loss terms, sum and
back-propagate them, step SGD with poly learning-rate decay, move the teacher as the method says (EMA or
frozen: the trainer owns the teacher, copies the student into it at stage switches and saves it); every
``val_every`` steps evaluate the student on the validation volumes and keep the best checkpoint.
A checkpoint holds everything that changes during training (weights, optimiser, method state, torch RNG,
logs up to that step); batches are a pure function of (seed, t), so a resumed run continues exactly as
the uninterrupted run would have. The method's step runs in ``train.precision`` (autocast; what stays
float32 is in ``mpcl.training.precision``), and a run keeps its precision across resumes.

Under ``torchrun`` the same loop runs in N processes (``mpcl.training.distributed`` says how a step is
split so that the N processes compute what one would): process 0 alone validates, logs and writes
checkpoints, and the others wait for it at each validation and stage switch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mpcl.errors import ConfigError
from mpcl.nn.checkpoint import build_metadata, load_checkpoint, save_checkpoint
from mpcl.nn.unet import UNet
from mpcl.training import distributed
from mpcl.training.batchnorm import recalibrate_batch_norm, sample_slices
from mpcl.training.compilation import compiled
from mpcl.training.config import ExperimentConfig, config_from_dict
from mpcl.training.data.base import SegmentationData
from mpcl.training.data.batches import Batch, BatchFactory, prefetch
from mpcl.training.evaluate import evaluate_volumes
from mpcl.training.methods import Models, StepInfo, TeacherUpdate, build_method
from mpcl.training.precision import autocast, cpu_has_native_bf16, grad_scaler, resolve_precision
from mpcl.training.run_log import CsvLog, plot_curves

log = logging.getLogger("mpcl.train")


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA GPU is available; use 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_network(config: ExperimentConfig, num_classes: int) -> UNet:
    model = config.model
    return UNet(
        1,
        num_classes,
        model.channels,
        model.dropout,
        model.decoder_dropout,
        model.deep_supervision,
        model.upsampling,
    )


def poly_lr(base_lr: float, iteration: int, total: int, power: float) -> float:
    return base_lr * (1.0 - iteration / total) ** power if power > 0 else base_lr


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """teacher ← decay·teacher + (1 − decay)·student, on parameters (buffers are the teacher's own)."""
    for teacher_param, student_param in zip(teacher.parameters(), student.parameters(), strict=True):
        teacher_param.mul_(decay).add_(student_param.detach(), alpha=1 - decay)


def update_teacher(models: Models, update: TeacherUpdate, iteration: int) -> None:
    """The teacher after step ``iteration``, as the method's ``teacher_update`` says: an EMA step with the
    decay ramped as min(1 − 1/(t+1), decay), or nothing for a frozen teacher."""
    if models.teacher is None or update.kind == "frozen":
        return
    decay = min(1 - 1 / (iteration + 1), update.decay)
    ema_update(models.teacher, models.student, decay)
    if models.teacher_extra is not None:
        ema_update(models.teacher_extra, models.extra, decay)


def resolve_channels_last(setting: bool | str, device: torch.device) -> bool:
    """``train.channels_last`` for a run on ``device``: ``auto`` is on for a CPU, where
    ``benchmarks/train_speed.py`` measured every method faster channels-last, and off on a GPU, where it
    has not been measured yet."""
    return device.type == "cpu" if setting == "auto" else bool(setting)


def _channels_last(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Image batches (B, C, H, W) in channels-last memory format; labels (B, H, W) and None as they are."""
    if tensor is None or tensor.dim() != 4:
        return tensor
    return tensor.contiguous(memory_format=torch.channels_last)


@dataclass
class TrainResult:
    output_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_val_dice: float
    best_iteration: int
    seconds_per_iteration: float
    iterations_run: int


class Trainer:
    def __init__(
        self, config: ExperimentConfig, data: SegmentationData, output_dir: str | Path | None = None
    ):
        self.config = config
        self.data = data
        self.output_dir = Path(output_dir or config.output_dir)
        self.world = distributed.current()  # one process unless torchrun started several
        self.device = select_device(config.train.device)
        if self.world.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)
        self.precision = resolve_precision(config.train.precision, self.device)  # auto resolved
        self.scaler = grad_scaler(self.precision, self.device)  # fp16 only
        if config.train.num_threads:
            torch.set_num_threads(config.train.num_threads)
        torch.manual_seed(config.seed)
        self.method = build_method(config.method, data.num_classes)
        student = build_network(config, data.num_classes).to(self.device)
        self.channels_last = resolve_channels_last(config.train.channels_last, self.device)
        if self.channels_last:  # the teacher and extra modules below inherit the layout
            student = student.to(memory_format=torch.channels_last)
        if self.world.distributed and config.train.sync_batchnorm:  # before the teacher copies it
            student = distributed.convert_batch_norm(student)
        teacher = None
        if self.method.uses_teacher:
            teacher = copy.deepcopy(student)
            teacher.requires_grad_(False)
        extra_modules = self.method.build_extra_modules(student)
        extra = torch.nn.ModuleDict(extra_modules).to(self.device) if extra_modules else None
        if extra is not None and self.channels_last:
            extra = extra.to(memory_format=torch.channels_last)
        teacher_extra = None
        if teacher is not None and extra is not None:
            teacher_extra = copy.deepcopy(extra)
            teacher_extra.requires_grad_(False)
        self.models = Models(student, teacher, extra, teacher_extra)
        for module in (student, teacher, extra, teacher_extra):  # as DDP: process 0's initial weights
            distributed.broadcast_module(module)
        self.step_models = self._step_models()
        parameters = list(student.parameters()) + (list(extra.parameters()) if extra is not None else [])
        train = config.train
        self.optimizer = torch.optim.SGD(
            parameters, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
        )
        unlabeled_batch = train.unlabeled_batch if self.method.uses_unlabeled else 0
        self.batches = BatchFactory(
            data.labeled,
            data.unlabeled,
            tuple(config.data.patch_size),
            train.labeled_batch,
            unlabeled_batch,
            config.augment,
            config.seed,
            strong_views=self.method.uses_strong_views,
            shard=(self.world.rank, self.world.size),
        )
        self.metadata = build_metadata(
            config.to_dict(), data.class_names, data.normalization, config.method.name
        )
        self.stage_switches = {
            switch.iteration: switch for switch in self.method.stage_switches(train.iterations)
        }
        self.start_iteration = 0
        self.best_dice = -1.0
        self.best_iteration = -1
        if self.world.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        self.train_log = CsvLog(self.output_dir / "train_log.csv")
        self.val_log = CsvLog(self.output_dir / "val_log.csv")

    def _step_models(self) -> Models:
        """The networks as the method sees them in a training step: under ``train.compile`` the student and
        teacher through ``torch.compile``; with several processes they run this process's rows of each
        pass and return every process's outputs."""
        models = self.models
        student, teacher = models.student, models.teacher
        if self.config.train.compile:  # the eager modules stay in self.models (validation, checkpoints)
            student, teacher = compiled(student), compiled(teacher)
        if self.world.distributed:
            seed = self.config.seed

            def shard(network) -> distributed.ShardedNetwork | None:
                return None if network is None else distributed.ShardedNetwork(network, seed)

            student, teacher = shard(student), shard(teacher)
        return Models(student, teacher, models.extra, models.teacher_extra)

    # -- checkpoints ---------------------------------------------------------------------------
    def _state(self, iteration: int) -> dict:
        models = self.models
        return {
            "iteration": iteration,
            "student": models.student.state_dict(),
            "teacher": models.teacher.state_dict() if models.teacher is not None else None,
            "extra": models.extra.state_dict() if models.extra is not None else None,
            "teacher_extra": models.teacher_extra.state_dict() if models.teacher_extra is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "method_state": self.method.state_dict(),
            "torch_rng": torch.get_rng_state(),
            # dropout on a GPU draws from the device's generator
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "precision": self.precision,  # a run keeps one precision (resume_from)
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "best": {"dice": self.best_dice, "iteration": self.best_iteration},
            "metadata": self.metadata,
            "config": self.config.to_dict(),
        }

    def save(self, name: str, iteration: int) -> Path:
        return save_checkpoint(self.output_dir / name, self._state(iteration))

    def resume_from(self, path: str | Path) -> None:
        """Restore every piece of training state saved by ``save`` at the end of an iteration."""
        state = load_checkpoint(path)
        self.method.upgrade_checkpoint(state, str(path))
        trained_in = state.get("precision", "fp32")  # checkpoints from before train.precision: fp32
        if trained_in != self.precision:
            raise ConfigError(
                f"{path}: checkpoint was trained in {trained_in} but this run trains in {self.precision}; "
                f"resume with train.precision: {trained_in} (a run keeps one precision, so that it "
                "continues exactly as it would have)"
            )
        if checkpoint_config(state) != self.config.to_dict():
            raise ConfigError(
                f"{path}: checkpoint was written with a different config; resume with its own "
                "config (mpcl-train --resume without --config)"
            )
        self.models.student.load_state_dict(state["student"])
        if self.models.teacher is not None:
            self.models.teacher.load_state_dict(state["teacher"])
        if self.models.extra is not None:
            self.models.extra.load_state_dict(state["extra"])
        if self.models.teacher_extra is not None:
            self.models.teacher_extra.load_state_dict(state["teacher_extra"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method_state"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.best_dice = float(state["best"]["dice"])
        self.best_iteration = int(state["best"]["iteration"])
        self.start_iteration = int(state["iteration"])
        if self.world.is_main:
            self.train_log.truncate_after(self.start_iteration)
            self.val_log.truncate_after(self.start_iteration)
        log.info(
            "resumed from %s at iteration %d (best val Dice %.4f)", path, self.start_iteration, self.best_dice
        )

    # -- validation ----------------------------------------------------------------------------
    def _validate_on_main(self, iteration: int) -> None:
        """Process 0 validates (and may write best.pt); the others wait for it and take its best."""
        if self.world.is_main:
            self.validate(iteration)
        self.best_dice, self.best_iteration = distributed.broadcast_object(
            (self.best_dice, self.best_iteration)
        )

    def validate(self, iteration: int) -> float:
        volumes = self.data.val_volumes
        if self.config.data.val_volumes is not None:
            volumes = volumes[: self.config.data.val_volumes]
        model = self.method.inference_model(self.models)
        self.recalibrate_batch_norm(model, iteration)
        result = evaluate_volumes(
            model,
            volumes,
            self.data.class_names,
            tuple(self.config.data.patch_size),
            self.device,
            resize=self.config.evaluation.resize,
            empty_prediction=self.config.evaluation.empty_prediction,
        )
        summary = result["summary"]
        mean_dice = float(summary["mean"]["dice"]["mean"])
        row = {"iteration": iteration, "mean_dice": mean_dice, "mean_hd95": summary["mean"]["hd95"]["mean"]}
        row.update({f"dice_{name}": summary[name]["dice"]["mean"] for name in self.data.class_names[1:]})
        self.val_log.append(row)
        if mean_dice > self.best_dice:
            self.best_dice, self.best_iteration = mean_dice, iteration
            self.save("best.pt", iteration)
        log.info(
            "iteration %d: validation mean Dice %.4f (best %.4f at %d)",
            iteration,
            mean_dice,
            self.best_dice,
            self.best_iteration,
        )
        return mean_dice

    def recalibrate_batch_norm(self, model: torch.nn.Module, iteration: int) -> None:
        """With ``train.bn_recalibration_slices`` > 0: the inference network's batch-norm statistics from
        clean training slices (a fixed sample per iteration, so a resumed run does the same)."""
        count = self.config.train.bn_recalibration_slices
        if count == 0:
            return
        pool = [item.image for item in (*self.data.labeled, *self.data.unlabeled)]
        images = sample_slices(pool, count, seed=self.config.seed * 100_003 + iteration)
        train = self.config.train
        batch_size = min(len(images), train.labeled_batch + train.unlabeled_batch)
        recalibrate_batch_norm(model, images, tuple(self.config.data.patch_size), batch_size, self.device)

    # -- stages --------------------------------------------------------------------------------
    def start_stage(self, iteration: int) -> None:
        """A method's new stage begins at ``iteration`` (see ``StageSwitch``): restore the stage's best
        validation state if asked (kept as ``best_stage_end_<iteration>.pt``), copy the student into
        the teacher, and pick ``best.pt`` among the new stage's validations only."""
        switch, models = self.stage_switches[iteration], self.models
        best = self.output_dir / "best.pt"
        if switch.restore == "best" and best.exists():
            state = load_checkpoint(best)
            models.student.load_state_dict(state["student"])
            if models.extra is not None:
                models.extra.load_state_dict(state["extra"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.method.load_state_dict(state["method_state"])
            distributed.barrier()  # every process has read best.pt before process 0 renames it
            if self.world.is_main:
                best.replace(self.output_dir / f"best_stage_end_{iteration}.pt")
            log.info(
                "iteration %d: new stage starts from the previous stage's best (iteration %d, Dice %.4f)",
                iteration,
                self.best_iteration,
                self.best_dice,
            )
        if models.teacher is not None:
            models.teacher.load_state_dict(models.student.state_dict())
        if models.teacher_extra is not None:
            models.teacher_extra.load_state_dict(models.extra.state_dict())
        self.best_dice, self.best_iteration = -1.0, -1

    # -- the loop ------------------------------------------------------------------------------
    def train_step(self, iteration: int, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        """One optimisation step at ``iteration``: returns the total loss, its named terms and the lr."""
        train, models = self.config.train, self.models
        lr = poly_lr(train.lr, iteration, train.iterations, train.poly_power)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = distributed.gather_batch(batch.to(self.device))  # each process built its share
        if self.channels_last:
            batch = Batch(*(_channels_last(getattr(batch, name)) for name in batch.__dataclass_fields__))
        step_models = self._begin_step(iteration)
        # forward passes and losses in the run's precision; the losses themselves, prototype similarities
        # and banks stay float32 inside it (mpcl.training.precision); backward, SGD and EMA outside it
        with autocast(self.precision, self.device), distributed.synchronised_batch_norm(train.sync_batchnorm):
            terms = self.method.training_step(batch, step_models, StepInfo(iteration, train.iterations))
        loss = torch.stack([value.float() for value in terms.values()]).sum()
        if not torch.isfinite(loss):
            values = {name: round(value.item(), 6) for name, value in terms.items()}
            raise FloatingPointError(
                f"loss became {loss.item()} at iteration {iteration} (terms {values}); "
                "lower train.lr or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self._reduce_gradients()
            self.optimizer.step()
        else:  # fp16: gradients scaled up so that small ones do not underflow; steps with inf/NaN skipped
            self.scaler.scale(loss).backward()
            self._reduce_gradients()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        update_teacher(models, self.method.teacher_update(), iteration)
        return loss.detach(), {name: value.detach() for name, value in terms.items()}, lr

    def _begin_step(self, iteration: int) -> Models:
        """The step's view of the networks. With several processes: process 0's batch-norm buffers on
        every process (as DDP broadcasts them; they may differ after a shard's statistics or process 0's
        recalibration), and the sharded networks' random streams set to this iteration."""
        models = self.models
        if not self.world.distributed:
            return self.step_models
        distributed.broadcast_module(models.student, buffers_only=True)
        distributed.broadcast_module(models.teacher, buffers_only=True)
        for network in (self.step_models.student, self.step_models.teacher):
            if network is not None:
                network.begin_step(iteration)
        return self.step_models

    def _reduce_gradients(self) -> None:
        """With several processes: the student's per-process shares of the gradient summed, the extra
        modules' (computed whole on every process) averaged."""
        if not self.world.distributed:
            return
        distributed.reduce_gradients(self.models.student.parameters(), average=False)
        if self.models.extra is not None:
            distributed.reduce_gradients(self.models.extra.parameters(), average=True)

    def fit(self, stop_at: int | None = None, progress: bool = True) -> TrainResult:
        """Train from ``start_iteration`` to the configured budget (or ``stop_at``, for interruptions)."""
        train = self.config.train
        total = train.iterations
        stop = min(stop_at, total) if stop_at is not None else total
        models = self.models
        models.student.train()
        for module in (models.extra, models.teacher, models.teacher_extra):
            if module is not None:
                module.train()  # as SSL4MIS: the teacher sees dropout and batch statistics
        main = self.world.is_main  # the one process that validates, logs and writes checkpoints
        progress = progress and main
        if main and train.compile:
            log.info("train.compile: the first steps compile the networks (a minute or more on a CPU)")
        if main and self.precision == "bf16" and self.device.type == "cpu" and not cpu_has_native_bf16():
            log.warning(
                "train.precision bf16 on a CPU without native bf16 (no AVX512_BF16 or AMX): its "
                "convolutions fall back to torch's slow reference kernels, many times slower than fp32; "
                "use fp32 on this machine"
            )
        bar = tqdm(
            total=stop - self.start_iteration, desc=self.config.experiment, unit="it", disable=not progress
        )
        postfix: dict[str, str] = {}  # the bar's loss and best Dice, updated after each log and validation
        logs_above_bar = contextlib.ExitStack()
        if progress:  # console log lines are printed above the bar instead of glued to its end
            logs_above_bar.enter_context(logging_redirect_tqdm())
        started = time.perf_counter()
        validation_seconds = 0.0
        completed = self.start_iteration  # steps whose update is in the weights
        try:
            for iteration, batch in enumerate(
                prefetch(self.batches, self.start_iteration, stop), self.start_iteration
            ):
                if iteration in self.stage_switches:
                    self.start_stage(iteration)
                loss, terms, lr = self.train_step(iteration, batch)
                completed = done = iteration + 1
                if main and (done % train.log_every == 0 or done == stop):
                    row = {"iteration": done, "lr": lr, "loss": loss.item()}
                    row.update({f"loss_{name}": value.item() for name, value in terms.items()})
                    row.update(self.method.diagnostics())
                    self.train_log.append(row)
                    postfix["loss"] = f"{loss.item():.4f}"
                    postfix["best_dice"] = f"{max(self.best_dice, 0):.3f}"
                    bar.set_postfix(postfix)
                bar.update(1)
                if done % train.val_every == 0 or done == total or done in self.stage_switches:
                    validation_started = time.perf_counter()
                    self._validate_on_main(done)
                    validation_seconds += time.perf_counter() - validation_started
                    postfix["best_dice"] = f"{max(self.best_dice, 0):.3f}"  # this validation included
                    bar.set_postfix(postfix)
                if main and (done % train.checkpoint_every == 0 or done == stop):
                    self.save("latest.pt", done)
        except KeyboardInterrupt:
            if not main:
                raise
            self.save("latest.pt", completed)
            log.warning(
                "interrupted after iteration %d; resume with --resume %s",
                completed,
                self.output_dir / "latest.pt",
            )
            raise
        finally:
            bar.close()
            logs_above_bar.close()
        elapsed = time.perf_counter() - started - validation_seconds  # training steps only
        run = stop - self.start_iteration
        result = TrainResult(
            self.output_dir,
            self.output_dir / "best.pt",
            self.output_dir / "latest.pt",
            self.best_dice,
            self.best_iteration,
            elapsed / max(run, 1),
            run,
        )
        if main:
            self._finish(result)
        distributed.barrier()  # the run's files are complete before any process moves on
        return result

    def _finish(self, result: TrainResult) -> None:
        plot_curves(
            self.train_log.rows(), self.val_log.rows(), self.output_dir / "curves.png", self.config.experiment
        )
        summary = {
            "experiment": self.config.experiment,
            "method": self.config.method.name,
            "best_val_mean_dice": result.best_val_dice,
            "best_iteration": result.best_iteration,
            "iterations_run": result.iterations_run,
            "seconds_per_iteration": result.seconds_per_iteration,
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.channels_last,
            "compile": self.config.train.compile,
        }
        (self.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        log.info(
            "finished: %d iterations at %.3f s/it; best validation mean Dice %.4f at iteration %d",
            result.iterations_run,
            result.seconds_per_iteration,
            result.best_val_dice,
            result.best_iteration,
        )


def inference_model_from_checkpoint(
    state: dict, config: ExperimentConfig, num_classes: int
) -> torch.nn.Module:
    """The network a checkpoint segments with, as validation used it (``Method.inference_model``): the
    student for most methods; e.g. BARL with ``infer: avg`` also needs its second branch from ``extra``."""
    method = build_method(config.method, num_classes)
    student = build_network(config, num_classes)
    student.load_state_dict(state["student"])
    extra_modules = method.build_extra_modules(student)
    extra = torch.nn.ModuleDict(extra_modules) if extra_modules else None
    if extra is not None:
        extra.load_state_dict(state["extra"])
    return method.inference_model(Models(student, None, extra))


# config keys added after checkpoints were first written, with the values that reproduce how a checkpoint
# written without them trained (e.g. before protocols the earlier choices were the legacy protocol's)
LATER_KEYS: dict[str, Any] = {
    "protocol": "legacy",
    "train": {"precision": "fp32", "channels_last": False, "sync_batchnorm": False, "compile": False},
    "data": {
        "slicing_axis": "auto",
        "target_spacing": None,
        "crop_to_nonzero": False,
        "ct_normalization": None,
    },
}


def checkpoint_config(state: dict) -> dict:
    """The config a checkpoint was trained with, as a dict, keys it predates filled from ``LATER_KEYS``."""
    stored = copy.deepcopy(state["config"])
    for key, default in LATER_KEYS.items():
        if isinstance(default, dict):
            section = stored.setdefault(key, {})
            for name, value in default.items():
                section.setdefault(name, value)
        else:
            stored.setdefault(key, default)
    return stored


def stored_config(state: dict, source: str | Path, data_root: str | Path | None = None) -> ExperimentConfig:
    """The validated config a loaded checkpoint was trained with, its data read from ``data_root`` if
    given; errors name ``source``."""
    stored = checkpoint_config(state)
    if data_root:
        stored["data"]["root"] = str(data_root)
    return config_from_dict(stored, f"{source} (stored config)")


def config_of_checkpoint(path: str | Path) -> ExperimentConfig:
    """The validated config a checkpoint was trained with."""
    return stored_config(load_checkpoint(path), path)
