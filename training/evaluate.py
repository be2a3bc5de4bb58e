"""Scoring whole volumes under the SSL4MIS evaluation protocol, with the deployment inference core.

Predictions come from ``mpcl.inference`` (the code ``Segmenter`` runs): a torch network becomes a
backend with ``TorchBackend.from_module``, so validation, ``mpcl-eval --checkpoint`` and the export's
Dice gate slice, resize and turn logits into labels exactly as deployment does. Volumes arrive
intensity-normalised by the data loader, so no normalisation is applied here and the package's
post-processing is not either: a checkpoint is scored as training produced it (``mpcl-eval --model``
scores a package through ``Segmenter``, clean-ups included). ``resize`` is the config's ``evaluation``
key: ``linear`` (corner-aligned bilinear, probabilities resized back) or ``nearest`` (the SSL4MIS/BCP
test scripts: order-0 zoom to the patch, labels zoomed back with order 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mpcl.backends.torch_backend import TorchBackend
from mpcl.inference import InferenceSettings, segment_volume
from mpcl.io import ImageGeometry, write_image
from mpcl.training.data.base import Volume
from mpcl.training.metrics import multiclass_metrics, summarize

EVALUATION_BATCH = 16  # slices per network call; the labels do not depend on it


def as_backend(model: Any, device: Any = None):
    """``model`` as an ``mpcl.backends`` backend: a torch network through ``TorchBackend.from_module``
    (batches go to ``device``), a backend (anything with ``run``, e.g. an exported artefact) as it is."""
    if isinstance(model, torch.nn.Module):
        return TorchBackend.from_module(model, device)
    if callable(getattr(model, "run", None)):
        return model
    raise TypeError(f"cannot evaluate a {type(model).__name__}: expected a torch module or a backend")


def volume_predictor(
    model: Any,
    patch_size: Sequence[int],
    device: Any = None,
    resize: str = "linear",
    batch_size: int = EVALUATION_BATCH,
) -> Callable[[Volume], np.ndarray]:
    """A function from a (normalised) volume to its uint8 labels (D, H, W) on the volume's own grid."""
    backend = as_backend(model, device)
    settings = InferenceSettings(tuple(patch_size), resize=resize, batch_size=batch_size)

    def predict(volume: Volume) -> np.ndarray:
        return segment_volume(volume.image, volume.spacing, backend, settings, planned=volume.planned).labels

    return predict


def score_volumes(
    predict: Callable[[Volume], np.ndarray],
    volumes: Sequence[Volume],
    class_names: list[str],
    prediction_dir: str | Path | None = None,
    progress: bool = False,
    empty_prediction: str = "undefined",
) -> dict:
    """Per-volume, per-class Dice/Jaccard/HD95/ASD of ``predict(volume)`` plus their summary; optionally
    writes each prediction as ``<prediction_dir>/<name>.nii.gz`` on the volume's geometry."""
    cases = []
    for volume in tqdm(volumes, desc="evaluate", unit="vol", disable=not progress, leave=False):
        prediction = predict(volume)
        if prediction_dir is not None:
            geometry = ImageGeometry(volume.spacing, volume.origin, volume.direction)
            write_image(prediction, geometry, Path(prediction_dir) / f"{volume.name}.nii.gz")
        if volume.label is None:
            continue
        metrics = multiclass_metrics(
            prediction,
            volume.label,
            len(class_names),
            volume.array_spacing,
            empty_prediction=empty_prediction,
        )
        cases.append({"name": volume.name, "metrics": metrics})
    summary = summarize([case["metrics"] for case in cases], class_names) if cases else {}
    per_case = [
        {"name": case["name"], **{class_names[c]: values for c, values in case["metrics"].items()}}
        for case in cases
    ]
    return {"summary": summary, "cases": per_case}


def evaluate_volumes(
    model: Any,
    volumes: Sequence[Volume],
    class_names: list[str],
    patch_size: tuple[int, int],
    device: Any,
    prediction_dir: str | Path | None = None,
    progress: bool = False,
    resize: str = "linear",
    empty_prediction: str = "undefined",
) -> dict:
    """:func:`score_volumes` of a torch network (run on ``device``) or an ``mpcl.backends`` backend.
    ``resize`` and ``empty_prediction`` are the config's ``evaluation`` keys."""
    predict = volume_predictor(model, patch_size, device, resize)
    return score_volumes(predict, volumes, class_names, prediction_dir, progress, empty_prediction)
