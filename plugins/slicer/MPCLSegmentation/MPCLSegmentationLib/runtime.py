"""Is the mpcl runtime importable in this Python, can it be installed here, and can it use a GPU?

Kept free of slicer and Qt so that the module can show the runtime's state (and the widget can offer
to install it with ``slicer.util.pip_install``) before anything else is imported.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

MINIMUM_PYTHON = (3, 10)  # mpcl's requires-python; Slicer 5.10 and later ship Python 3.12
DEFAULT_REQUIREMENT = "mpcl"
_PROJECT_NAME = re.compile(r'^name\s*=\s*"mpcl"\s*$', re.MULTILINE)


def python_supported(version_info: tuple[int, ...] = tuple(sys.version_info[:2])) -> bool:
    return tuple(version_info[:2]) >= MINIMUM_PYTHON


def runtime_version() -> str | None:
    """The installed mpcl version, "unknown" if importable without metadata, or None if absent."""
    importlib.invalidate_caches()  # a pip install in this session must be seen without a restart
    try:
        if importlib.util.find_spec("mpcl") is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        return importlib.metadata.version("mpcl")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def unsupported_python_message(version_info: tuple[int, ...] = tuple(sys.version_info[:2])) -> str:
    found = ".".join(str(v) for v in version_info[:2])
    needed = ".".join(str(v) for v in MINIMUM_PYTHON)
    return (
        f"The mpcl runtime needs Python {needed} or newer, but this Slicer runs Python {found}. "
        "Use 3D Slicer 5.10 or later."
    )


def default_requirement(module_dir: str | os.PathLike) -> str:
    """What to pip-install: the MPCL source checkout this module was loaded from, if it was (the
    "Add module path" workflow: plugins/slicer/MPCLSegmentation inside the repository), else "mpcl"."""
    try:
        root = Path(module_dir).resolve().parents[2]
    except IndexError:
        return DEFAULT_REQUIREMENT
    pyproject = root / "pyproject.toml"
    try:
        if _PROJECT_NAME.search(pyproject.read_text(encoding="utf-8")):
            return str(root)
    except (OSError, UnicodeDecodeError):
        pass
    return DEFAULT_REQUIREMENT


# -- which devices to offer --------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuSupport:
    """Whether a runtime in this Python can run the network on an NVIDIA GPU, and one line saying
    which one can or why none can (shown as the device choice's tooltip)."""

    usable: bool
    detail: str


def nvidia_driver_present() -> bool:
    """A cheap check for an NVIDIA driver (the runtime's own ``gpu_present`` test, without importing it)."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def onnxruntime_cuda() -> str | None:
    """None when ONNX Runtime has its CUDA execution provider here, else why not."""
    if not _module_available("onnxruntime"):
        return "not installed"
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return None
    return "this build has no CUDAExecutionProvider (replace onnxruntime with onnxruntime-gpu)"


def torch_cuda() -> str | None:
    """None when torch can use CUDA here, else why not (torch is imported only if installed)."""
    if not _module_available("torch"):
        return "not installed"
    import torch

    return None if torch.cuda.is_available() else "torch.cuda.is_available() is False"


GPU_PROBES: dict[str, Callable[[], str | None]] = {"onnxruntime": onnxruntime_cuda, "torch": torch_cuda}


def gpu_support(
    probes: Mapping[str, Callable[[], str | None]] | None = None,
    driver_present: Callable[[], bool] = nvidia_driver_present,
) -> GpuSupport:
    """Ask each runtime (ONNX Runtime, then torch) whether it can use CUDA here; the first that can wins.

    A probe returns None when its runtime can use the GPU, else a reason; a probe that raises counts as
    unusable (a broken GPU install must not stop the module from loading).
    """
    if not driver_present():
        return GpuSupport(False, "No NVIDIA GPU driver was found; segmentation runs on the CPU.")
    reasons = []
    for name, probe in (GPU_PROBES if probes is None else probes).items():
        try:
            reason = probe()
        except Exception as error:  # an ImportError of a CUDA library, a driver mismatch, ...
            reason = f"{type(error).__name__}: {error}"
        if reason is None:
            return GpuSupport(True, f"{name} can use the NVIDIA GPU (device cuda).")
        reasons.append(f"{name}: {reason}")
    return GpuSupport(False, "No runtime here can use the GPU (" + "; ".join(reasons) + ").")


def offered_devices(support: GpuSupport) -> tuple[str, ...]:
    """The device choices to offer: ``cuda`` only where a runtime can use it."""
    return ("auto", "cpu", "cuda") if support.usable else ("auto", "cpu")
