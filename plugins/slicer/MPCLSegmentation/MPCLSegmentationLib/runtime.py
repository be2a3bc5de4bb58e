"""Is the mpcl runtime importable in this Python, where does it install from, is it the version this
module was built with, and can it use a GPU?

Kept free of slicer and Qt so that the module can show the runtime's state (and the widget can offer
to install it with ``slicer.util.pip_install``) before anything else is imported.

Where the runtime installs from (:func:`runtime_source`), first match wins:

1. a source the user set (the ``MPCLSegmentation/PipRequirement`` setting: a wheel, a folder, a name);
2. the wheel bundled with a built extension: ``Resources/Wheels/mpcl-VERSION-py3-none-any.whl`` whose
   VERSION is the one in ``Resources/Wheels/mpcl-version.txt`` (both written by the extension build,
   ``plugins/slicer/Utilities/build_runtime_wheel.py``): exactly that file, no package index for mpcl;
3. the MPCL source checkout the module was loaded from (the "Add module path" workflow);
4. ``mpcl`` from the package index, said plainly (it needs the network and a published mpcl).

The version the module expects (:func:`expected_version`) is the one its build recorded, or in a source
checkout the ``pyproject.toml`` version; :func:`check_versions` compares it with the installed runtime's.
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
WHEELS_FOLDER = ("Resources", "Wheels")  # relative to the module's folder
VERSION_FILE = "mpcl-version.txt"  # in WHEELS_FOLDER: the version the extension was built with
_PROJECT_NAME = re.compile(r'^name\s*=\s*"mpcl"\s*$', re.MULTILINE)
_PROJECT_VERSION = re.compile(r'^version\s*=\s*"([^"]+)"\s*$', re.MULTILINE)
_DUNDER_VERSION = re.compile(r'^__version__\s*=\s*["\']([^"\']+)["\']', re.MULTILINE)
# mpcl-VERSION(-BUILD)?-PYTHON-ABI-PLATFORM.whl; the runtime is pure Python: py3-none-any.
_WHEEL_NAME = re.compile(r"^mpcl-(?P<version>[^-]+)(?:-\d[^-]*)?-(?P<tags>[^-]+-[^-]+-[^-]+)\.whl$")
PURE_PYTHON_TAGS = ("py3-none-any",)


def python_supported(version_info: tuple[int, ...] = tuple(sys.version_info[:2])) -> bool:
    return tuple(version_info[:2]) >= MINIMUM_PYTHON


def _version_in_source(origin: str | None) -> str | None:
    """``__version__`` as written in mpcl/__init__.py (read, not imported)."""
    if not origin:
        return None
    try:
        match = _DUNDER_VERSION.search(Path(origin).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None
    return match.group(1) if match else None


def runtime_version() -> str | None:
    """The installed mpcl version (its distribution's, else ``mpcl.__version__`` read from its source
    without importing it), "unknown" if importable but neither says, or None if absent."""
    importlib.invalidate_caches()  # a pip install in this session must be seen without a restart
    try:
        spec = importlib.util.find_spec("mpcl")
        if spec is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        return importlib.metadata.version("mpcl")
    except importlib.metadata.PackageNotFoundError:
        return _version_in_source(spec.origin) or "unknown"


def unsupported_python_message(version_info: tuple[int, ...] = tuple(sys.version_info[:2])) -> str:
    found = ".".join(str(v) for v in version_info[:2])
    needed = ".".join(str(v) for v in MINIMUM_PYTHON)
    return (
        f"The mpcl runtime needs Python {needed} or newer, but this Slicer runs Python {found}. "
        "Use 3D Slicer 5.10 or later."
    )


# -- where the runtime comes from ------------------------------------------------------------------


def source_checkout(module_dir: str | os.PathLike) -> Path | None:
    """The MPCL source checkout this module was loaded from (plugins/slicer/MPCLSegmentation inside
    the repository: the "Add module path" workflow), or None (a built or installed extension)."""
    try:
        root = Path(module_dir).resolve().parents[2]
    except IndexError:
        return None
    try:
        if _PROJECT_NAME.search((root / "pyproject.toml").read_text(encoding="utf-8")):
            return root
    except (OSError, UnicodeDecodeError):
        pass
    return None


def default_requirement(module_dir: str | os.PathLike) -> str:
    """The source checkout to pip-install when the module was loaded from one, else "mpcl"."""
    root = source_checkout(module_dir)
    return DEFAULT_REQUIREMENT if root is None else str(root)


def checkout_version(root: str | os.PathLike) -> str | None:
    """The ``[project] version`` of a source checkout's pyproject.toml."""
    try:
        text = (Path(root) / "pyproject.toml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    project = text.split("[project]", 1)[1] if "[project]" in text else ""
    project = re.split(r"^\[", project, maxsplit=1, flags=re.MULTILINE)[0]  # up to the next table
    match = _PROJECT_VERSION.search(project)
    return match.group(1) if match else None


def wheels_folder(module_dir: str | os.PathLike) -> Path:
    return Path(module_dir).joinpath(*WHEELS_FOLDER)


def built_version(module_dir: str | os.PathLike) -> str | None:
    """The runtime version the extension build recorded beside the wheel it bundled, or None."""
    try:
        text = (wheels_folder(module_dir) / VERSION_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def expected_version(module_dir: str | os.PathLike) -> str | None:
    """The runtime version this module belongs with: its build's record, else (loaded from a source
    checkout) the checkout's pyproject version; None when neither is known."""
    recorded = built_version(module_dir)
    if recorded:
        return recorded
    root = source_checkout(module_dir)
    return None if root is None else checkout_version(root)


def wheel_version(path: str | os.PathLike) -> str | None:
    """The version in an mpcl wheel's file name (None for any other file name)."""
    match = _WHEEL_NAME.match(Path(path).name)
    return match.group("version") if match else None


def same_version(a: str | None, b: str | None) -> bool:
    """Equal versions (PEP 440 comparison where ``packaging`` is importable, e.g. 1.0 == 1.0.0)."""
    if a is None or b is None:
        return False
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return a.strip() == b.strip()
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a.strip() == b.strip()


def bundled_wheel(module_dir: str | os.PathLike, version: str | None = None) -> Path | None:
    """The bundled runtime wheel of ``version`` (default: the build's record), or None.

    A wheel of any other version (one left from an earlier build, one copied there by hand) is never
    chosen, nor one without the pure-Python tag.
    """
    version = version or built_version(module_dir)
    folder = wheels_folder(module_dir)
    if not version or not folder.is_dir():
        return None
    for path in sorted(folder.glob("mpcl-*.whl")):
        match = _WHEEL_NAME.match(path.name)
        if (
            match
            and path.is_file()
            and match.group("tags") in PURE_PYTHON_TAGS
            and same_version(match.group("version"), version)
        ):
            return path
    return None


@dataclass(frozen=True)
class RuntimeSource:
    """Where "Install runtime" installs mpcl from.

    ``kind``: "setting" (the user's), "wheel" (bundled), "checkout" (source folder) or "index" (PyPI).
    ``requirement``: what pip is given. ``version``: the version it installs, where known.
    ``description``: one phrase for the user (confirmation, status line).
    """

    kind: str
    requirement: str
    version: str | None
    description: str

    @property
    def needs_index(self) -> bool:
        return self.kind == "index"


def runtime_source(module_dir: str | os.PathLike, override: str | None = None) -> RuntimeSource:
    """The first of: the user's setting, the bundled wheel, the source checkout, the package index."""
    if override and str(override).strip():
        requirement = str(override).strip()
        return RuntimeSource(
            "setting",
            requirement,
            wheel_version(requirement),
            f"'{requirement}' (set in the MPCLSegmentation/PipRequirement setting)",
        )
    wheel = bundled_wheel(module_dir)
    if wheel is not None:
        return RuntimeSource(
            "wheel",
            str(wheel),
            wheel_version(wheel),
            f"the runtime bundled with this extension ({wheel.name}, no download of mpcl needed)",
        )
    root = source_checkout(module_dir)
    if root is not None:
        return RuntimeSource(
            "checkout", str(root), checkout_version(root), f"the MPCL source checkout {root}"
        )
    expected = expected_version(module_dir)
    wanted = f"mpcl=={expected}" if expected else DEFAULT_REQUIREMENT
    return RuntimeSource(
        "index",
        wanted,
        expected,
        f"the package index ('{wanted}'): this module carries no runtime wheel "
        f"({'/'.join(WHEELS_FOLDER)} has none of its version) and is not in a source checkout, so this "
        "needs the network and an mpcl release on the index",
    )


def pip_arguments(source: RuntimeSource, installed: str | None = None, upgrade: bool = False) -> list[str]:
    """The arguments for ``slicer.util.pip_install`` (a list: a path with spaces stays one argument).

    The bundled wheel is installed as exactly that file; its folder is also given to pip as a place to
    find wheels, so the runtime's dependencies (ONNX Runtime, nibabel, click) put there install offline
    too. Reinstalling the version that is already installed replaces mpcl's files only (--force-reinstall
    --no-deps); any other installed version is replaced by the wheel's.
    """
    if source.kind == "wheel":
        arguments = [source.requirement, "--find-links", str(Path(source.requirement).parent)]
        if installed is not None and same_version(installed, source.version):
            arguments += ["--force-reinstall", "--no-deps"]
        return arguments
    return ["--upgrade", source.requirement] if upgrade else [source.requirement]


# -- is the installed runtime the module's -----------------------------------------------------------


@dataclass(frozen=True)
class VersionCheck:
    """The installed runtime's version against the module's. ``ok``: segmenting may go ahead without
    asking (the runtime is installed and no different version is expected)."""

    expected: str | None
    installed: str | None

    @property
    def mismatch(self) -> bool:
        return (
            self.installed is not None
            and self.expected is not None
            and not same_version(self.installed, self.expected)
        )

    @property
    def ok(self) -> bool:
        return self.installed is not None and not self.mismatch

    @property
    def message(self) -> str:
        """One sentence for the status line and the log."""
        if self.installed is None:
            return "The mpcl runtime is not installed in Slicer's Python."
        if self.mismatch:
            return (
                f"The installed mpcl runtime is version {self.installed}, but this module was built for "
                f"{self.expected}: reinstall the runtime (mpcl runtime > Reinstall) so that they match."
            )
        if self.expected is None:
            return (
                f"mpcl {self.installed} is installed (this module does not record which runtime version "
                "it was built with, so the versions were not compared)."
            )
        return f"mpcl {self.installed} is installed, the version this module was built with."

    @property
    def refusal(self) -> str:
        """Why segmenting is refused with a mismatched runtime: one sentence naming both versions."""
        return self.refusal_message()

    def refusal_message(self, override: str = "confirm") -> str:
        """The refusal, saying how to run anyway (``override``: "confirm" in the panel; the Python
        console passes an argument instead)."""
        return (
            f"Segmenting was not started: the installed mpcl runtime is version {self.installed} but this "
            f"module was built for {self.expected}; reinstall the runtime, or {override} to run with "
            f"{self.installed} anyway."
        )


def check_versions(expected: str | None, installed: str | None) -> VersionCheck:
    return VersionCheck(expected, installed)


def check_runtime(module_dir: str | os.PathLike) -> VersionCheck:
    """The module in ``module_dir`` against the runtime installed in this Python."""
    return VersionCheck(expected_version(module_dir), runtime_version())


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
