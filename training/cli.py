"""Command-line entry points: ``mpcl-train`` and ``mpcl-eval``.

Errors the user can fix (missing files, config typos, bad data) are printed as one sentence with exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from mpcl.errors import MPCLError


def _friendly_errors(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except MPCLError as error:
            click.echo(f"Error: {error}", err=True)
            sys.exit(2)

    return wrapper


def _setup_logging(log_file: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="YAML experiment config.")
@click.option("--data-root", type=str, help="Override data.root (e.g. ../shared/data/acdc).")
@click.option("--output-dir", type=click.Path(path_type=Path), help="Override output_dir.")
@click.option("--iterations", type=int, help="Override train.iterations.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Override train.device.")
@click.option(
    "--resume", type=click.Path(path_type=Path), help="Continue exactly from a checkpoint (latest.pt)."
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar (logs still go to train.log).")
@_friendly_errors
def train_main(config_path, data_root, output_dir, iterations, device, resume, no_progress) -> None:
    """Train a segmentation model with the method named in the config."""
    from mpcl.training.config import load_config
    from mpcl.training.data.loading import load_data
    from mpcl.training.trainer import Trainer, config_of_checkpoint

    overrides = {
        key: value
        for key, value in {
            "data.root": data_root,
            "output_dir": str(output_dir) if output_dir else None,
            "train.iterations": iterations,
            "train.device": device,
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
    out = Path(config.output_dir)
    _setup_logging(out / "train.log")
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
    if resume is not None:
        trainer.resume_from(resume)
    result = trainer.fit(progress=not no_progress)
    click.echo(
        f"best checkpoint: {result.best_checkpoint} (validation mean Dice {result.best_val_dice:.4f} "
        f"at iteration {result.best_iteration}); {result.seconds_per_iteration:.3f} s/iteration"
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="A checkpoint (best.pt).")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--data-root", type=str, help="Override the data root stored in the checkpoint's config.")
@click.option("--output", type=click.Path(path_type=Path), help="JSON file for per-case and summary metrics.")
@click.option("--save-predictions", type=click.Path(path_type=Path), help="Folder for NIfTI label maps.")
@click.option(
    "--save-images",
    type=click.Path(path_type=Path),
    help="Folder for the evaluated images as NIfTI (intensity-normalised, as the network saw them), "
    "e.g. to try mpcl-segment on them.",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@_friendly_errors
def eval_main(checkpoint, split, data_root, output, save_predictions, save_images, device) -> None:
    """Evaluate a checkpoint: per-volume, per-class Dice, Jaccard, HD95 and ASD."""
    import torch

    from mpcl.io import ImageGeometry, write_atomically, write_image
    from mpcl.training.checkpoint import load_checkpoint
    from mpcl.training.config import config_from_dict
    from mpcl.training.data.loading import load_data
    from mpcl.training.evaluate import evaluate_volumes
    from mpcl.training.metrics import format_table
    from mpcl.training.trainer import inference_model_from_checkpoint, select_device

    _setup_logging()
    state = load_checkpoint(checkpoint)
    stored = state["config"]
    if data_root is not None:
        stored = {**stored, "data": {**stored["data"], "root": data_root}}
    config = config_from_dict(stored, f"{checkpoint} (stored config)")
    data = load_data(config.data)
    volumes = data.test_volumes if split == "test" else data.val_volumes
    if not volumes:
        raise click.UsageError(f"the dataset has no {split} volumes")
    model = inference_model_from_checkpoint(state, config, data.num_classes)
    target = select_device(device)
    model.to(target)
    result = evaluate_volumes(
        model,
        volumes,
        data.class_names,
        tuple(config.data.patch_size),
        target,
        prediction_dir=save_predictions,
        progress=True,
    )
    result.update(
        {
            "checkpoint": str(checkpoint),
            "split": split,
            "iteration": state["iteration"],
            "method": config.method.name,
            "torch": torch.__version__,
        }
    )
    click.echo(f"{config.experiment} — {split} ({len(volumes)} volumes), checkpoint {checkpoint}")
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
