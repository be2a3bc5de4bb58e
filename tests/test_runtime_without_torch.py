"""The runtime package (mpcl, mpcl.io, mpcl.preprocessing, mpcl.errors) must work where torch is absent."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

RUNTIME_MODULES = ["mpcl", "mpcl.errors", "mpcl.preprocessing", "mpcl.io"]

_BLOCKER = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "torch" or fullname.startswith("torch."):
                raise ImportError(f"torch is blocked in this test (import of {fullname!r})")
            return None


    sys.meta_path.insert(0, BlockTorch())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKER + textwrap.dedent(code)],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )


def test_blocker_really_blocks_torch():
    """Control: without this the main test would pass even if the blocker did nothing."""
    result = _run(
        """
        for name in ("torch", "torch.nn"):
            try:
                __import__(name)
            except ImportError as error:
                assert "blocked" in str(error), error
            else:
                raise SystemExit(f"{name} was importable")
        print("blocked")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "blocked"


def test_runtime_imports_without_torch():
    result = _run(
        f"""
        import importlib
        import json

        for name in {RUNTIME_MODULES!r}:
            importlib.import_module(name)

        import numpy as np
        import mpcl
        from mpcl.errors import InputError
        from mpcl.preprocessing import normalize_intensity, resize_2d

        assert isinstance(mpcl.__version__, str)
        assert resize_2d(normalize_intensity(np.arange(16.0).reshape(4, 4)), (2, 2)).shape == (2, 2)
        try:
            normalize_intensity(np.array([np.nan]))
        except InputError:
            pass
        else:
            raise SystemExit("InputError expected")
        loaded = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
        print(json.dumps(loaded))
        """
    )
    assert result.returncode == 0, f"runtime import failed without torch:\n{result.stderr}"
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_runtime_import_does_not_load_torch():
    """Even where torch is installed, importing the runtime must not pull it in (startup time, footprint)."""
    code = (
        "import json, sys\n"
        + "".join(f"import {name}\n" for name in RUNTIME_MODULES)
        + "print(json.dumps(sorted(n for n in sys.modules if n == 'torch' or n.startswith('torch.'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
