"""Inference backends behind one small interface: ``run(batch (N, 1, H, W) float32) -> logits (N, C, H, W)``.

Everything around the network (reading, normalisation, resizing, softmax, post-processing) is numpy code
shared by all backends, so a backend only has to run the network. Each backend module is imported only
when it is chosen, so ``import mpcl`` never loads onnxruntime, torch or TensorRT.

``select_backend(package, "auto")`` tries, in order: TensorRT (an engine in the package and a GPU),
ONNX Runtime with CUDA, torch with CUDA, OpenVINO on CPU (an optional extra), ONNX Runtime on CPU, torch
on CPU, and logs what it picked and why the faster ones were skipped.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import shutil
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from mpcl.errors import ConfigError, ModelPackageError
from mpcl.model_package import ModelPackage

log = logging.getLogger("mpcl.segment")

BACKEND_NAMES = ("onnxruntime", "openvino", "torch", "tensorrt")
DEVICES = ("auto", "cpu", "cuda")
_MODULES = {
    "onnxruntime": "mpcl.backends.onnxruntime_backend",
    "openvino": "mpcl.backends.openvino_backend",
    "torch": "mpcl.backends.torch_backend",
    "tensorrt": "mpcl.backends.tensorrt_backend",
}


@runtime_checkable
class Backend(Protocol):
    """A loaded network. ``name`` is the backend, ``device`` where it runs ("cpu", "cuda", "cuda:1")."""

    name: str
    device: str

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, C, H, W) float32 for a contiguous (N, 1, H, W) float32 batch."""
        ...

    def describe(self) -> str:
        """One line for the log, e.g. 'onnxruntime 1.20 (CPUExecutionProvider)'."""
        ...


def module_available(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it (a broken or blocked install is absent)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def gpu_present() -> bool:
    """Cheap check for an NVIDIA GPU that imports nothing heavy (so 'auto' on a CPU box stays fast)."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def check_io_shape(path, what: str, shape, channels: int, patch: tuple[int, int]) -> None:
    """Refuse a network file whose static channel or spatial sizes contradict model.json (``shape``: one
    entry per axis, an int where the file fixes the size, anything else where it is dynamic)."""
    if len(shape) != 4:
        raise ModelPackageError(f"{path}: {what} has rank {len(shape)}; expected (N, C, H, W)")
    expected = (None, channels, *patch)
    for axis, (actual, wanted) in enumerate(zip(shape, expected, strict=True)):
        if wanted is not None and isinstance(actual, int) and actual != wanted:
            label = "channels/classes" if axis == 1 else "patch size"
            raise ModelPackageError(
                f"{path}: {what} shape {list(shape)} does not match model.json "
                f"({label}: expected {expected[1] if axis == 1 else list(patch)})"
            )


def _check_device(device: str) -> str:
    if device in DEVICES or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise ConfigError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N")


def _candidates(name: str, device: str) -> list[tuple[str, str]]:
    """(backend, device) pairs to try, fastest first."""
    if name != "auto":
        if name not in BACKEND_NAMES:
            raise ConfigError(f"unknown backend {name!r}; expected auto or one of {list(BACKEND_NAMES)}")
        if device == "auto":
            return [(name, "cuda"), (name, "cpu")] if gpu_present() or name == "tensorrt" else [(name, "cpu")]
        return [(name, device)]
    cpu = [("openvino", "cpu"), ("onnxruntime", "cpu"), ("torch", "cpu")]
    if device == "cpu":
        return cpu
    gpu = [("tensorrt", device if device != "auto" else "cuda")]
    gpu += [("onnxruntime", gpu[0][1]), ("torch", gpu[0][1])]
    if device != "auto":
        return gpu
    return (gpu if gpu_present() else []) + cpu


def select_backend(package: ModelPackage, name: str = "auto", device: str = "auto", **options) -> Backend:
    """Load the package's network on the fastest usable backend (or the one named) and log the choice.

    ``options`` go to the backend constructor (e.g. ``threads`` for ONNX Runtime and torch on CPU).
    Raises ConfigError naming every backend tried and why it could not be used.
    """
    device = _check_device(device)
    reasons = []
    for backend_name, backend_device in _candidates(name, device):
        module = importlib.import_module(_MODULES[backend_name])
        reason = module.unavailable_reason(package, backend_device)
        if reason is not None:
            reasons.append(f"{backend_name} on {backend_device}: {reason}")
            continue
        backend = module.create(package, backend_device, **options)
        if reasons:
            log.info("backend: skipped %s", "; ".join(reasons))
        log.info("backend: %s on %s (%s)", backend.name, backend.device, backend.describe())
        return backend
    raise ConfigError(
        f"no usable backend for {package.root} (backend={name}, device={device}): " + "; ".join(reasons)
    )
