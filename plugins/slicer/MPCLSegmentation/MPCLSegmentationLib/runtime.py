"""Is the mpcl runtime importable in this Python, and can it be installed here at all?

Kept free of slicer and Qt so that the module can show the runtime's state (and the widget can offer
to install it with ``slicer.util.pip_install``) before anything else is imported.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
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
