"""Write a model package (model.json + model.onnx + model.pt) from a training checkpoint.

The package is what the runtime (``mpcl.Segmenter``, ``mpcl-segment``, the Slicer module) loads; its
model.json is derived from the checkpoint's metadata (``checkpoint.build_metadata``), so class names,
normalisation and patch size cannot drift from training. The ONNX file is checked against torch before
the package is published, and the folder appears atomically (built beside the target, then renamed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpcl.errors import InputError
from mpcl.io import _UMASK
from mpcl.model_package import (
    MODEL_JSON,
    ModelPackage,
    build_model_json,
    load_model_package,
    sha256_of,
    write_model_json,
)
from mpcl.training.checkpoint import load_checkpoint, save_checkpoint
from mpcl.training.networks.unet import UNet

ONNX_OPSET = 17
ONNX_PARITY_TOLERANCE = 1e-4


def build_network_from_spec(spec: Mapping[str, Any], in_channels: int, num_classes: int) -> UNet:
    """The network described by checkpoint metadata / model.json ``network`` (only the 2D U-Net so far)."""
    spec = dict(spec)
    name = spec.pop("name", "unet2d")
    if name != "unet2d":
        raise InputError(f"network {name!r} is not known to this mpcl (expected 'unet2d')")
    keys = ("channels", "dropout", "decoder_dropout", "deep_supervision")
    return UNet(in_channels, num_classes, **{key: spec[key] for key in keys if key in spec})


def export_onnx(model: torch.nn.Module, path: Path, in_channels: int, patch_size: tuple[int, int]) -> None:
    """Export logits with a dynamic batch axis (opset 17) as one self-contained .onnx file.

    torch >= 2.9 defaults to the torch.export-based exporter, which needs onnxscript and may write
    external weight files; the TorchScript exporter (``dynamo=False``) traces this static-shape CNN
    exactly and gives a single file that every ONNX Runtime and TensorRT version reads.
    """
    model = model.eval()
    example = torch.zeros(1, in_channels, *patch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )


def check_onnx_parity(
    model: torch.nn.Module, path: Path, in_channels: int, patch_size: tuple[int, int]
) -> float:
    """Largest |logit difference| between ONNX Runtime and torch on a random batch of 3; refuses drift."""
    import onnxruntime

    batch = torch.rand(3, in_channels, *patch_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model.eval()(batch).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(None, {"image": batch.numpy()})[0]
    difference = float(np.abs(actual - expected).max())
    if not difference <= ONNX_PARITY_TOLERANCE * max(1.0, float(np.abs(expected).max())):
        raise RuntimeError(f"{path}: ONNX Runtime output differs from torch by {difference:.3g}")
    return difference


def _publish(stage: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished folder into place; an existing package is replaced only with ``overwrite``."""
    if out_dir.exists():
        if not overwrite:
            raise InputError(f"{out_dir}: already exists; pass overwrite=True to replace the model package")
        if not (out_dir / MODEL_JSON).is_file() and any(out_dir.iterdir()):
            raise InputError(f"{out_dir}: exists and is not a model package; refusing to replace it")
        backup = Path(tempfile.mkdtemp(prefix=".old-", dir=out_dir.parent))
        backup.rmdir()
        out_dir.rename(backup)
        stage.rename(out_dir)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        stage.rename(out_dir)


def write_model_package(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    *,
    onnx: bool = True,
    overwrite: bool = False,
    name: str = "",
    postprocessing: Mapping[str, Any] | None = None,
    colors: Mapping[str, tuple[int, int, int]] | None = None,
) -> ModelPackage:
    """Build ``out_dir`` = model.json + model.pt (student weights only) [+ model.onnx] from a checkpoint.

    ``postprocessing`` is stored in model.json (``{"largest_component": [...] | true, "fill_holes": ...}``)
    and applied by the runtime; ``colors`` maps class names to 0-255 RGB (defaults: Slicer's palette).
    """
    checkpoint_path, out_dir = Path(checkpoint_path), Path(out_dir)
    state = load_checkpoint(checkpoint_path)
    metadata = state["metadata"]
    patch_size = (int(metadata["patch_size"][0]), int(metadata["patch_size"][1]))
    in_channels, num_classes = int(metadata.get("in_channels", 1)), int(metadata["num_classes"])
    if out_dir.exists() and not overwrite:
        raise InputError(f"{out_dir}: already exists; pass overwrite=True to replace the model package")
    model = build_network_from_spec(metadata.get("network", {}), in_channels, num_classes)
    model.load_state_dict(state["student"])
    model.eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".tmp-package-", dir=out_dir.parent))
    os.chmod(stage, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders; a package follows the umask
    try:
        slim = {key: state[key] for key in ("iteration", "student", "metadata", "config")}
        save_checkpoint(stage / "model.pt", slim)
        files: dict[str, dict[str, Any]] = {
            "torch": {
                "path": "model.pt",
                "sha256": sha256_of(stage / "model.pt"),
                "source": checkpoint_path.name,
            }
        }
        if onnx:
            export_onnx(model, stage / "model.onnx", in_channels, patch_size)
            difference = check_onnx_parity(model, stage / "model.onnx", in_channels, patch_size)
            files["onnx"] = {
                "path": "model.onnx",
                "sha256": sha256_of(stage / "model.onnx"),
                "opset": ONNX_OPSET,
                "input": "image",
                "output": "logits",
                "max_abs_logit_difference_vs_torch": difference,
            }
        data = build_model_json(
            metadata, files, name=name or out_dir.name, colors=colors, postprocessing=postprocessing
        )
        data["training"] = {"checkpoint": checkpoint_path.name, "iteration": int(state["iteration"])}
        write_model_json(stage, data)
        _publish(stage, out_dir, overwrite)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return load_model_package(out_dir)
