"""Command-line entry points: ``mpcl-train`` and ``mpcl-eval``.

Errors the user can fix (missing files, config typos, bad data) are printed as one sentence with exit
code 2; Ctrl-C exits with 130 and SIGTERM with 143 (``mpcl.cli_common``); anything else is a bug and keeps
its traceback.

These commands are the top layer: ``mpcl-train`` trains (``mpcl.training``) and then writes the model
package (``mpcl.export``), so this module, and no other module of ``mpcl.training``, uses the export.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from mpcl.backends import BACKEND_NAMES
from mpcl.cli_common import (
    CONTEXT_SETTINGS,
    PRECISION_CHOICES,
    friendly_errors,
    no_progress_option,
    threads_option,
    version_option,
)
from mpcl.io import check_writable_file, check_writable_folder

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def _setup_logging(log_file: Path | None = None, rank: int | None = None) -> None:
    """INFO to the console and ``log_file``; with several training processes (``rank`` given) only
    process 0 does that, the others print warnings and errors, tagged with their rank."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None and not rank:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    tag = "" if rank is None else f"[rank {rank}] "
    logging.basicConfig(
        level=logging.INFO if not rank else logging.WARNING,
        format=f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="YAML experiment config.")
@click.option("--data-root", type=str, help="Override data.root (e.g. ../shared/data/acdc).")
@click.option(
    "-o",
    "--output-dir",
    type=click.Path(path_type=Path),
    help="Override output_dir (checkpoints, logs and the model package).",
)
@click.option("--iterations", type=int, help="Override train.iterations.")
@click.option("--device", type=click.Choice(DEVICE_CHOICES), help="Override train.device.")
@threads_option("Override train.num_threads (CPU threads for torch; default: all cores).")
@click.option(
    "--resume", type=click.Path(path_type=Path), help="Continue exactly from a checkpoint (latest.pt)."
)
@no_progress_option("Hide the progress bar (logs still go to train.log).")
@version_option()
@friendly_errors
def train_main(config_path, data_root, output_dir, iterations, device, threads, resume, no_progress) -> None:
    """Train a segmentation model with the method named in the config; the run ends with the model
    package <output_dir>/model/ (what mpcl-segment and Segmenter load). Launched by torchrun
    (torchrun --nproc_per_node N --no-python mpcl-train ...) it trains data-parallel in N processes."""
    from mpcl.training import distributed
    from mpcl.training.config import load_config
    from mpcl.training.trainer import config_of_checkpoint

    overrides = {
        key: value
        for key, value in {
            "data.root": data_root,
            "output_dir": str(output_dir) if output_dir else None,
            "train.iterations": iterations,
            "train.device": device,
            "train.num_threads": threads,
        }.items()
        if value is not None
    }
    if config_path is None and resume is None:
        raise click.UsageError("give --config, or --resume with a checkpoint")
    if config_path is not None:
        config = load_config(config_path, overrides)
    else:
        config = config_of_checkpoint(resume)
        if overrides:
            raise click.UsageError(
                "with --resume and no --config the checkpoint's own config is used; overrides are not allowed"
            )
    world = distributed.init_from_env(config.train.device)  # one process unless torchrun started several
    try:
        _train(config, world, resume, no_progress)
    finally:
        distributed.cleanup()


def _train(config, world, resume: Path | None, no_progress: bool) -> None:
    from mpcl.training import distributed
    from mpcl.training.data.loading import load_data
    from mpcl.training.trainer import Trainer

    out = check_writable_folder(config.output_dir)
    _setup_logging(out / "train.log", world.rank if world.distributed else None)
    log = logging.getLogger("mpcl.train")
    log.info(
        "experiment %s: method %s, data %s, %d iterations, output %s",
        config.experiment,
        config.method.name,
        config.data.kind,
        config.train.iterations,
        out,
    )
    data = load_data(config.data)
    log.info(
        "data: %d labelled and %d unlabelled slices, %d validation and %d test volumes, classes %s",
        len(data.labeled),
        len(data.unlabeled),
        len(data.val_volumes),
        len(data.test_volumes),
        data.class_names,
    )
    trainer = Trainer(config, data)
    log.info(
        "training on %s in %s, %s%s",
        trainer.device,
        trainer.precision,
        "channels-last" if trainer.channels_last else "NCHW",
        ", compiled" if config.train.compile else "",
    )
    if world.distributed:
        log.info(
            "data-parallel over %d processes (%s on %s), batch-norm statistics %s",
            world.size,
            distributed.backend_for(trainer.device),
            trainer.device.type,
            "of the global batch (train.sync_batchnorm)" if config.train.sync_batchnorm else "per process",
        )
    if resume is not None:
        trainer.resume_from(resume)
    result = trainer.fit(progress=not no_progress)
    if not world.is_main:
        return
    _write_model_package(out)
    click.echo(
        f"best checkpoint: {result.best_checkpoint} (validation mean Dice {result.best_val_dice:.4f} "
        f"at iteration {result.best_iteration}); {result.seconds_per_iteration:.3f} s/iteration"
    )


def _write_model_package(output_dir: Path) -> None:
    """The deployable package (model.json + weights [+ ONNX]) that ``mpcl.Segmenter`` loads, written to
    ``<output_dir>/model`` from the run's best checkpoint (its latest if there is no best)."""
    from mpcl.export.pipeline import write_model_package

    best = output_dir / "best.pt"
    source = best if best.exists() else output_dir / "latest.pt"
    with_onnx = all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))
    write_model_package(source, output_dir / "model", onnx=with_onnx, overwrite=True)
    logging.getLogger("mpcl.train").info(
        "model package written to %s%s",
        output_dir / "model",
        "" if with_onnx else " (torch weights only: install mpcl[export] for the ONNX model)",
    )


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--checkpoint", type=click.Path(path_type=Path), help="A training checkpoint (best.pt).")
@click.option(
    "--model",
    "package_path",
    type=click.Path(path_type=Path),
    help="A model package (end of training or mpcl-export) instead of a checkpoint: scores what is "
    "deployed, each scan segmented by Segmenter as mpcl-segment does (the package's normalisation, "
    "backend, precision and post-processing). NIfTI-folder data are read from their scan files; ACDC "
    "and phantom volumes exist only min-max normalised, and are given to Segmenter as such (the "
    "package's min-max normalisation leaves them unchanged).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="Experiment YAML whose data section names the volumes (required with --model).",
)
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--data-root", type=str, help="Override the data root (of the checkpoint or --config).")
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), help="JSON file for per-case and summary metrics."
)
@click.option("--save-predictions", type=click.Path(path_type=Path), help="Folder for NIfTI label maps.")
@click.option(
    "--save-images",
    type=click.Path(path_type=Path),
    help="Folder for the evaluated images as NIfTI (intensity-normalised, as the network saw them), "
    "e.g. to try mpcl-segment on them.",
)
@click.option("--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True)
@click.option(
    "--backend",
    type=click.Choice(("auto", *BACKEND_NAMES)),
    default="auto",
    show_default=True,
    help="With --model: the runtime backend.",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISION_CHOICES),
    default="auto",
    show_default=True,
    help="With --model and ONNX Runtime or OpenVINO: which precision (auto: the fastest checked one).",
)
@threads_option("CPU threads for the backend (--model) or torch (--checkpoint); default: all cores.")
@no_progress_option("Hide the progress bar.")
@version_option()
@friendly_errors
def eval_main(
    checkpoint,
    package_path,
    config_path,
    split,
    data_root,
    output,
    save_predictions,
    save_images,
    device,
    backend,
    precision,
    threads,
    no_progress,
) -> None:
    """Evaluate a checkpoint or a model package: per-volume, per-class Dice, Jaccard, HD95 and ASD."""
    import torch

    from mpcl.io import ImageGeometry, write_atomically, write_image
    from mpcl.training.config import load_config
    from mpcl.training.data.loading import load_data
    from mpcl.training.evaluate import score_volumes
    from mpcl.training.metrics import format_table

    if (checkpoint is None) == (package_path is None):
        raise click.UsageError("give either --checkpoint or --model")
    if package_path is not None and config_path is None:
        raise click.UsageError("--model needs --config, the experiment YAML whose data to evaluate on")
    if checkpoint is not None and config_path is not None:
        raise click.UsageError("--config goes with --model; a checkpoint carries its own config")
    if output is not None:
        check_writable_file(output)
    for folder in (save_predictions, save_images):
        if folder is not None:
            check_writable_folder(folder)
    _setup_logging()
    state = None
    if checkpoint is not None:
        from mpcl.nn.checkpoint import load_checkpoint
        from mpcl.training.trainer import stored_config

        state = load_checkpoint(checkpoint)
        config = stored_config(state, checkpoint, data_root)
    else:
        config = load_config(config_path, {"data.root": data_root} if data_root else None)
    data = load_data(config.data)
    volumes = data.test_volumes if split == "test" else data.val_volumes
    if not volumes:
        raise click.UsageError(f"the dataset has no {split} volumes")
    if state is not None:
        if threads:
            torch.set_num_threads(threads)
        scored = _checkpoint_network(checkpoint, state, config, data.num_classes, device)
    else:
        scored = _package_network(package_path, config, data, split, device, backend, precision, threads)
    result = score_volumes(
        scored.predict,
        volumes,
        data.class_names,
        prediction_dir=save_predictions,
        progress=not no_progress,
        empty_prediction=config.evaluation.empty_prediction,
    )
    result.update({**scored.record, "split": split, "torch": torch.__version__})
    click.echo(f"{config.experiment} — {split} ({len(volumes)} volumes), {scored.described}")
    click.echo(format_table(result["summary"], data.class_names))
    if output is not None:
        write_atomically(output, lambda temporary: temporary.write_text(json.dumps(result, indent=2)))
        click.echo(f"metrics written to {output}")
    if save_predictions is not None:
        click.echo(f"predictions written to {save_predictions}/")
    if save_images is not None:
        for volume in volumes:
            geometry = ImageGeometry(volume.spacing, volume.origin, volume.direction)
            write_image(volume.image, geometry, save_images / f"{volume.name}.nii.gz")
        click.echo(f"images written to {save_images}/")


@dataclass
class _Scored:
    """What mpcl-eval scores: a function from a volume to its labels, and where they come from."""

    predict: Callable  # Volume -> uint8 labels on the volume's grid
    record: dict  # facts about the source, stored with the metrics
    described: str  # the source, for the printed header


def _checkpoint_network(checkpoint: Path, state: dict, config, num_classes: int, device: str) -> _Scored:
    """A checkpoint's network as validation used it (e.g. BARL's branch average), through the inference
    core with the config's patch size and resize; the data loader's volumes are already normalised."""
    from mpcl.training.evaluate import volume_predictor
    from mpcl.training.trainer import inference_model_from_checkpoint, select_device

    target = select_device(device)
    model = inference_model_from_checkpoint(state, config, num_classes).to(target)
    record = {"checkpoint": str(checkpoint), "iteration": state["iteration"], "method": config.method.name}
    predict = volume_predictor(model, tuple(config.data.patch_size), target, config.evaluation.resize)
    return _Scored(predict, record, f"checkpoint {checkpoint}")


def _package_network(
    path: Path, config, data, split: str, device: str, backend: str, precision: str, threads: int | None
) -> _Scored:
    """A model package scored as deployed: each volume goes through ``Segmenter``, so the package's
    normalisation, patch size, resize, backend, precision and post-processing all apply.

    What Segmenter is given is what a user would give it: for NIfTI-folder data the scan files
    themselves (mpcl-segment on the same files gives the same labels); ACDC (h5) and phantom volumes
    exist only min-max normalised, so those arrays, with their geometry.
    """
    import SimpleITK as sitk

    from mpcl.errors import InputError, ModelPackageError
    from mpcl.io import ImageGeometry
    from mpcl.model_package import load_model_package
    from mpcl.segmenter import Segmenter

    package = load_model_package(path)
    if package.class_names != data.class_names:
        raise ModelPackageError(
            f"{path}: the package's classes {package.class_names} are not the data's {data.class_names}"
        )
    if config.data.kind == "nifti_folder":
        from mpcl.training.data.nifti_folder import image_files

        folder = Path(config.data.root) / ("imagesTs" if split == "test" else "imagesTr")
        files = image_files(folder)

        def source(volume):
            if volume.name not in files:
                raise InputError(f"{folder}: no scan file for case {volume.name!r}")
            return files[volume.name]

        inputs = "scan files"
    else:
        # the arrays are the data loader's normalised images: the package must normalise the same way
        # (then its normalisation of an already normalised volume changes nothing)
        if package.normalization.get("scheme") != data.normalization.get("scheme"):
            raise ModelPackageError(
                f"{path}: the package normalises with {package.normalization}, the data with "
                f"{data.normalization}"
            )

        def source(volume):
            geometry = ImageGeometry(volume.spacing, volume.origin, volume.direction)
            return geometry.apply_to(sitk.GetImageFromArray(volume.image))

        inputs = f"{data.normalization.get('scheme')}-normalised arrays"
    segmenter = Segmenter(package, backend, device, precision=precision, threads=threads)
    runtime = segmenter.backend
    record = {
        "model": str(path),
        "backend": f"{runtime.name} on {runtime.device}: {runtime.describe()}",
        "inputs": inputs,
        "postprocessing": segmenter.postprocess and package.postprocessing.enabled,
    }
    described = f"model package {path} through Segmenter ({record['backend']}; {inputs})"
    return _Scored(lambda volume: segmenter(source(volume)).label_map, record, described)
