"""The runtime package (mpcl, its Segmenter, model packages, the ONNX Runtime backend and mpcl-segment)
must work where torch is absent."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.segment_helpers import auto_cpu_backend

REPO_ROOT = Path(__file__).resolve().parents[1]

RUNTIME_MODULES = [
    "mpcl",
    "mpcl.errors",
    "mpcl.preprocessing",
    "mpcl.io",
    "mpcl.model_package",
    "mpcl.inputs",
    "mpcl.postprocessing",
    "mpcl.backends",
    "mpcl.backends.onnxruntime_backend",
    "mpcl.backends.openvino_backend",
    "mpcl.segmenter",
    "mpcl.cli_segment",
]

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
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
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


def test_import_mpcl_does_no_work():
    """``import mpcl`` loads no backend library; ``from mpcl import Segmenter`` still loads no torch."""
    code = (
        "import json, sys\n"
        "import mpcl\n"
        "heavy = ('torch', 'onnxruntime', 'openvino', 'mpcl.segmenter')\n"
        "heavy = sorted(n for n in heavy if n in sys.modules)\n"
        "from mpcl import Segmenter, load_model_package\n"
        "print(json.dumps([heavy, 'torch' in sys.modules]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [[], False]


@pytest.mark.slow
def test_segmenter_and_cli_run_without_torch(tmp_path):
    """A package made by training (with torch) is used where torch cannot be imported."""
    from mpcl.io import write_image
    from tests.segment_helpers import GEOMETRY, make_package, phantom_volume

    package = make_package(tmp_path)
    scan = write_image(phantom_volume(), GEOMETRY, tmp_path / "case.nii.gz")
    result = _run(
        f"""
        import json
        import numpy as np
        from mpcl import Segmenter
        from mpcl.cli_segment import segment_main
        from mpcl.errors import ConfigError

        segmenter = Segmenter.from_pretrained({str(package)!r})
        result = segmenter({str(scan)!r}, uncertainty=True)
        result.save({str(tmp_path / "api.seg.nrrd")!r})
        cli_args = [{str(scan)!r}, "-o", {str(tmp_path / "cli.nii.gz")!r}, "--model", {str(package)!r}]
        code = segment_main(cli_args)
        try:
            Segmenter.from_pretrained({str(package)!r}, backend="torch")
        except ConfigError as error:
            torch_error = str(error)
        print(json.dumps([segmenter.backend.name, int(result.label_map.max()) >= 0, code, torch_error,
                          "torch" in sys.modules]))
        """
    )
    assert result.returncode == 0, result.stderr
    backend, ok, code, torch_error, torch_loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert (backend, ok, code, torch_loaded) == (auto_cpu_backend(), True, 0, False)
    assert "torch is not installed" in torch_error
    assert (tmp_path / "api.seg.nrrd").is_file() and (tmp_path / "cli.nii.gz").is_file()
