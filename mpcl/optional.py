"""Optional dependencies (onnxruntime's siblings, torch, triton, TensorRT, OpenVINO): whether one is
installed, asked without importing it, so ``import mpcl`` and backend choice stay cheap."""

from __future__ import annotations

import importlib.util


def module_available(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it (a broken or blocked install is absent)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
