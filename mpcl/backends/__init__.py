"""Inference backends behind one small interface: ``run(batch (N, 1, H, W) float32) -> logits (N, C, H, W)``.

Everything around the network (reading, normalisation, resizing, softmax, post-processing) is numpy code
shared by all backends (``mpcl.inference``), so a backend only has to run the network. What a backend can
do beyond that is declared, not probed: ``capabilities`` says which precision runs and whether the
backend also implements ``segment_slices`` (the fused GPU pre/post-processing of :class:`FusedBackend`).
Each backend module is imported only when it is chosen, so ``import mpcl`` never loads onnxruntime,
torch or TensorRT.

Every backend's ``create(package, device, *, threads, fused_kernels, precision)`` takes the same options
and refuses, with one sentence, a value it cannot honour (``precision="int8"`` on torch, ``device="cuda"``
on OpenVINO, ``fused_kernels="on"`` anywhere but torch) instead of silently running something else.

``select_backend(package, "auto")`` tries, in order: TensorRT (an engine in the package and a GPU),
ONNX Runtime with CUDA, torch with CUDA, OpenVINO on CPU (an optional extra), ONNX Runtime on CPU, torch
on CPU, and logs what it picked and why the faster ones were skipped (including backends that cannot
run the precision or fused kernels asked for).
"""

from __future__ import annotations

import importlib
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from mpcl.errors import ConfigError, ModelPackageError
from mpcl.kernels import FUSED_KERNEL_MODES
from mpcl.model_package import ModelPackage
from mpcl.optional import module_available  # noqa: F401  (re-exported: the backends use it from here)

if TYPE_CHECKING:  # the kernels' types, for annotations only
    from mpcl.kernels.reference import Flip, HeadOutputs, NormalizationAffine

log = logging.getLogger("mpcl.segment")

BACKEND_NAMES = ("onnxruntime", "openvino", "torch", "tensorrt")
DEVICES = ("auto", "cpu", "cuda")
# the options every backend's create() takes, and select_backend passes on
CREATE_OPTIONS = ("threads", "fused_kernels", "precision")
_MODULES = {
    "onnxruntime": "mpcl.backends.onnxruntime_backend",
    "openvino": "mpcl.backends.openvino_backend",
    "torch": "mpcl.backends.torch_backend",
    "tensorrt": "mpcl.backends.tensorrt_backend",
}


@dataclass(frozen=True)
class Capabilities:
    """What a loaded backend offers beyond ``run``, declared so that callers never probe attributes.

    ``precision``: the arithmetic the network runs in (``fp32``, ``fp16``, ``int8``, ``bf16``).
    ``fused_kernels``: the backend is a :class:`FusedBackend` whose ``segment_slices`` may be called;
    ``fused_reason`` says why not when it is False (for the log and for ``fused_kernels="on"`` errors).
    """

    precision: str = "fp32"
    fused_kernels: bool = False
    fused_reason: str = ""


@runtime_checkable
class Backend(Protocol):
    """A loaded network. ``name`` is the backend, ``device`` where it runs ("cpu", "cuda", "cuda:1"),
    ``capabilities`` what else it offers. ``run`` and ``describe`` are all a caller may rely on unless
    ``capabilities.fused_kernels`` says the backend is also a :class:`FusedBackend`."""

    name: str
    device: str
    capabilities: Capabilities

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, C, H, W) float32 for a contiguous (N, 1, H, W) float32 batch."""
        ...

    def describe(self) -> str:
        """One line for the log, e.g. 'onnxruntime 1.20 (CPUExecutionProvider)'."""
        ...


@runtime_checkable
class FusedBackend(Backend, Protocol):
    """A backend that also runs the whole per-batch work (normalise, resize, network, softmax, flips,
    resize back, argmax, entropy) on its device; only when ``capabilities.fused_kernels`` is True."""

    def segment_slices(
        self,
        slices: np.ndarray,
        affine: NormalizationAffine,
        patch_hw: Sequence[int],
        flips: Sequence[Flip],
        probabilities: bool,
        uncertainty: bool,
        timings: dict[str, float],
    ) -> HeadOutputs:
        """Raw (b, H, W) slices to labels (and the maps asked for) on their own grid."""
        ...


def refuse_unsupported(
    backend: str,
    device: str,
    devices: Sequence[str],
    precision: str,
    precisions: Sequence[str],
    fused_kernels: str,
    fused_reason: str | None,
    precision_note: str = "int8, fp16 and bf16 variants run on the onnxruntime and openvino backends",
) -> None:
    """The ConfigError a backend's ``create`` raises for an option value it cannot honour.

    ``devices``: ``cpu`` and/or ``cuda`` (which also admits ``cuda:N``). ``fused_reason``: None where the
    backend can run the fused kernels (it then checks ``fused_kernels='on'`` itself), else why not.
    """
    kind, _, index = device.partition(":")
    if kind not in devices or (index and not (kind == "cuda" and index.isdigit())):
        raise ConfigError(f"the {backend} backend runs on {' or '.join(devices)}, not on device {device!r}")
    if precision not in precisions:
        runs = ", ".join(p for p in precisions if p != "auto")
        raise ConfigError(
            f"the {backend} backend cannot run precision {precision!r} (it runs {runs}); {precision_note}"
        )
    if fused_kernels not in FUSED_KERNEL_MODES:
        raise ConfigError(f"fused_kernels must be one of {FUSED_KERNEL_MODES}, got {fused_kernels!r}")
    if fused_kernels == "on" and fused_reason is not None:
        raise ConfigError(f"fused_kernels='on' needs the torch backend on a CUDA GPU: {fused_reason}")


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


def _refused_by(module, options: dict) -> str | None:
    """Why a backend module cannot honour the options at all (for ``auto``, which then tries the next)."""
    precision = options.get("precision", "auto")
    if precision not in module.PRECISIONS:
        return f"it runs no {precision} model"
    if options.get("fused_kernels", "auto") == "on" and not module.FUSED_KERNELS:
        return "it has no fused kernels (fused_kernels='on')"
    return None


def select_backend(package: ModelPackage, name: str = "auto", device: str = "auto", **options) -> Backend:
    """Load the package's network on the fastest usable backend (or the one named) and log the choice.

    ``options`` (``threads``, ``fused_kernels``, ``precision``) go to the backend's ``create``. With
    ``auto``, backends that cannot honour them are skipped; a named backend refuses them with a
    ConfigError. Raises ConfigError naming every backend tried and why it could not be used.
    """
    device = _check_device(device)
    unknown = sorted(set(options) - set(CREATE_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown backend option(s) {unknown}; expected some of {list(CREATE_OPTIONS)}")
    reasons = []
    for backend_name, backend_device in _candidates(name, device):
        module = importlib.import_module(_MODULES[backend_name])
        reason = module.unavailable_reason(package, backend_device)
        if reason is None and name == "auto":
            reason = _refused_by(module, options)
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
