"""Slice-wise inference on whole volumes and the SSL4MIS evaluation protocol.

Each slice (taken along the through-plane axis) is resized to the patch, segmented, and its class
probabilities are resized back to the slice's own size before the argmax, using the numpy resize in
``mpcl.preprocessing`` that every inference backend shares (for labels alone, its ``resized_argmax``,
which gives the same labels while interpolating only class-boundary pixels). With ``resize="nearest"``
(the SSL4MIS/BCP test scripts) the slice is zoomed to the patch with order 0 and the predicted labels
are zoomed back with order 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mpcl.io import ImageGeometry, write_image
from mpcl.preprocessing import resize_2d, resized_argmax, through_plane_axis, zoom_nearest
from mpcl.training.data.base import Volume
from mpcl.training.metrics import multiclass_metrics, summarize


def resize_slices(data: np.ndarray, out_hw: tuple[int, int], resize: str) -> np.ndarray:
    """``linear``: bilinear (``resize_2d``); ``nearest``: scipy's order-0 zoom (``zoom_nearest``)."""
    return resize_2d(data, out_hw, order=1) if resize == "linear" else zoom_nearest(data, out_hw)


@torch.no_grad()
def _patch_probabilities(
    model: torch.nn.Module,
    slices: np.ndarray,
    patch_size: tuple[int, int],
    device: torch.device,
    batch_size: int,
    resize: str = "linear",
) -> Iterator[np.ndarray]:
    """Softmax probabilities (b, C, h, w) at patch size, batch by batch, for (D, H, W) slices."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, slices.shape[0], batch_size):
            batch = resize_slices(slices[start : start + batch_size], patch_size, resize)[:, None]
            logits = model(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
            yield torch.softmax(logits.float(), dim=1).cpu().numpy()
    finally:
        model.train(was_training)


def predict_probabilities(
    model: torch.nn.Module,
    volume: Volume,
    patch_size: tuple[int, int],
    device: torch.device,
    batch_size: int = 16,
    resize: str = "linear",
) -> np.ndarray:
    """Class probabilities (C, D, H, W) for a (D, H, W) volume, in the volume's own grid."""
    axis = through_plane_axis(volume.spacing)
    slices = np.moveaxis(volume.image, axis, 0)
    chunks = [
        resize_slices(chunk, slices.shape[1:], resize)
        for chunk in _patch_probabilities(model, slices, patch_size, device, batch_size, resize)
    ]
    stacked = np.concatenate(chunks, axis=0)  # (D', C, H', W') along the slicing axis
    return np.moveaxis(np.moveaxis(stacked, 1, 0), 1, axis + 1)


def predict_labels(
    model, volume: Volume, patch_size, device, batch_size: int = 16, resize: str = "linear"
) -> np.ndarray:
    """uint8 labels (D, H, W): the argmax of :func:`predict_probabilities` (computed by ``resized_argmax``),
    or with ``resize="nearest"`` the patch-size argmax zoomed back with order 0."""
    axis = through_plane_axis(volume.spacing)
    slices = np.moveaxis(volume.image, axis, 0)
    back = (
        resized_argmax
        if resize == "linear"
        else lambda chunk, size: zoom_nearest(chunk.argmax(axis=1).astype(np.uint8), size)
    )
    chunks = [
        back(chunk, slices.shape[1:])
        for chunk in _patch_probabilities(model, slices, patch_size, device, batch_size, resize)
    ]
    return np.moveaxis(np.concatenate(chunks, axis=0), 0, axis)


class BackendModule(nn.Module):
    """An ``mpcl.backends`` backend seen as a torch module, so training's evaluation code can score it."""

    def __init__(self, backend) -> None:
        super().__init__()
        self.backend = backend

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.backend.run(array))


def evaluate_volumes(
    model: torch.nn.Module,
    volumes: Sequence[Volume],
    class_names: list[str],
    patch_size: tuple[int, int],
    device: torch.device,
    prediction_dir: str | Path | None = None,
    progress: bool = False,
    resize: str = "linear",
    empty_prediction: str = "undefined",
) -> dict:
    """Per-volume, per-class Dice/Jaccard/HD95/ASD plus their summary; optionally writes predictions.
    ``resize`` and ``empty_prediction`` are the config's ``evaluation`` keys."""
    cases = []
    for volume in tqdm(volumes, desc="evaluate", unit="vol", disable=not progress, leave=False):
        prediction = predict_labels(model, volume, patch_size, device, resize=resize)
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
