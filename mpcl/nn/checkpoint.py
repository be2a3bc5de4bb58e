"""Checkpoints: weights plus the metadata a deployed model needs, loaded with ``weights_only=True``.

A checkpoint is a plain dict of tensors and primitive values, so it loads without unpickling arbitrary
objects; anything that is not an MPCL checkpoint of a known format version is refused with one sentence.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import torch

import mpcl
from mpcl.errors import InputError
from mpcl.io import write_atomically
from mpcl.planned_geometry import planned_geometry_metadata

CHECKPOINT_FORMAT = "mpcl-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "student", "metadata", "config", "iteration")


def build_metadata(config: dict, class_names: list[str], normalization: dict, method: str) -> dict[str, Any]:
    """What inference needs to reproduce training's preprocessing and to name the outputs."""
    metadata = {
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "in_channels": 1,
        "normalization": dict(normalization),
        "patch_size": list(config["data"]["patch_size"]),
        "resize": (config.get("evaluation") or {}).get("resize", "linear"),
        "method": method,
        "network": {"name": "unet2d", **config["model"]},
        "mpcl_version": mpcl.__version__,
    }
    planned = planned_geometry_metadata(config["data"])  # only for a planned dataset: else as before
    if planned is not None:
        metadata["planned_geometry"] = planned
    return metadata


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (a crash mid-save never corrupts the previous one)."""
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **state}
    return write_atomically(path, lambda temporary: _torch_save(payload, temporary))


def _torch_save(payload: dict[str, Any], path: Path) -> None:
    """torch.save, whose zip writer reports a full disk as a RuntimeError ('iostream error'): made an
    OSError so the atomic write names the checkpoint and removes the temporary."""
    try:
        torch.save(payload, path)
    except RuntimeError:
        raise OSError(errno.EIO, "the checkpoint was not written completely; is the disk full?") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint file does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types (UnpicklingError, KeyError, RuntimeError...)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: not a loadable MPCL checkpoint ({reason[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not an MPCL checkpoint (no '{CHECKPOINT_FORMAT}' format marker)")
    if payload.get("format_version") != CHECKPOINT_VERSION:
        raise InputError(
            f"{path}: checkpoint format version {payload.get('format_version')} is not supported "
            f"(this mpcl {mpcl.__version__} reads version {CHECKPOINT_VERSION})"
        )
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise InputError(f"{path}: checkpoint is missing {missing}")
    return payload
