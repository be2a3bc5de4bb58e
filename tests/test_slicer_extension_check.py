"""``.ci/check_slicer_extension.py``: the Extensions Index's description rules, offline.

Checked on this repository (it must pass: CI runs the script), on a good copy of the files the rules
read, and on that copy with one defect at a time, each of which must fail with a sentence naming it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
SCRIPT = REPOSITORY / ".ci" / "check_slicer_extension.py"
FILES = (
    "CMakeLists.txt",
    "LICENSE",
    "pyproject.toml",
    "plugins/slicer/MPCL.json",
    "plugins/slicer/CMakeLists.txt",
    "plugins/slicer/MPCLSegmentation/Resources/Icons/MPCLSegmentation.png",
    "plugins/slicer/Screenshots/1.png",
    "plugins/slicer/MPCLSegmentation/CMakeLists.txt",
    "plugins/slicer/Utilities/build_runtime_wheel.py",
)
MODULE_CMAKE = "plugins/slicer/MPCLSegmentation/CMakeLists.txt"
ICON_URL = (
    "https://raw.githubusercontent.com/mpcl-project/mpcl/main/plugins/slicer/MPCLSegmentation/Resources/"
    "Icons/MPCLSegmentation.png"
)


def _load():
    spec = importlib.util.spec_from_file_location("check_slicer_extension", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load()


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def tree(tmp_path):
    """A copy of exactly the files the rules read."""
    for name in FILES:
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPOSITORY / name, target)
    return tmp_path


def _errors(root: Path) -> list[str]:
    checker = check.Checker(root)
    checker.run()
    return checker.errors


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def test_this_repository_passes_as_ci_runs_it():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "checks passed" in result.stdout


def test_a_good_tree_passes_and_a_bad_one_fails_from_the_command_line(tree):
    assert _errors(tree) == []
    assert check.main(["--root", str(tree)]) == 0
    (tree / "LICENSE").unlink()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(tree)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "error: The repository root has no LICENSE file." in result.stderr


def test_the_icon_screenshot_and_extension_values_match_the_readme_and_index():
    root = (REPOSITORY / "CMakeLists.txt").read_text()
    assert check.cmake_variable(root, "EXTENSION_ICONURL") == ICON_URL
    assert check.png_size((REPOSITORY / FILES[5]).read_bytes()) == (128, 128)
    screenshot = check.cmake_variable(root, "EXTENSION_SCREENSHOTURLS")
    readme = (REPOSITORY / "plugins" / "slicer" / "README.md").read_text()
    assert "Screenshots/1.png" in screenshot and "Screenshots/1.png" in readme  # the README shows it


def _replace_in_root(tree, old, new):
    _edit(tree / "CMakeLists.txt", old, new)


DEFECTS = {
    "no icon variable": (
        lambda tree: _replace_in_root(tree, f'set(EXTENSION_ICONURL "{ICON_URL}")', ""),
        "does not set EXTENSION_ICONURL",
    ),
    "icon built from a variable": (
        lambda tree: _replace_in_root(
            tree, ICON_URL, "${MPCL_REPOSITORY_URL}/raw/main/plugins/slicer/MPCLSegmentation.png"
        ),
        "EXTENSION_ICONURL uses a CMake variable",
    ),
    "icon over http": (
        lambda tree: _replace_in_root(tree, f'"{ICON_URL}"', f'"{ICON_URL.replace("https", "http")}"'),
        "must start with https://",
    ),
    "icon on a web page, not a raw file": (
        lambda tree: _replace_in_root(
            tree, ICON_URL, "https://github.com/mpcl-project/mpcl/blob/main/plugins/slicer/icon.png"
        ),
        "not a raw file address",
    ),
    "icon in another repository": (
        lambda tree: _replace_in_root(
            tree, "mpcl-project/mpcl/main/plugins/slicer/MPCLSeg", "other/repo/main/x/y"
        ),
        "not in the repository mpcl-project/mpcl",
    ),
    "icon of the wrong size": (
        lambda tree: (tree / FILES[5]).write_bytes(_png(64, 64)),
        "must be a 128x128 PNG",
    ),
    "icon file missing": (lambda tree: (tree / FILES[5]).unlink(), "which is not in the repository"),
    "empty screenshots": (
        lambda tree: _replace_in_root(
            tree,
            check.cmake_variable((tree / "CMakeLists.txt").read_text(), "EXTENSION_SCREENSHOTURLS"),
            "",
        ),
        "EXTENSION_SCREENSHOTURLS is empty",
    ),
    "screenshot missing": (lambda tree: (tree / FILES[6]).unlink(), "Screenshots/1.png, which is not"),
    "screenshot not an image": (
        lambda tree: (tree / FILES[6]).write_text("not an image"),
        "must be a PNG, JPEG or GIF image",
    ),
    "no license": (lambda tree: (tree / "LICENSE").unlink(), "no LICENSE file"),
    "license not the declared one": (
        lambda tree: (tree / "LICENSE").write_text(
            "MIT License\n\nPermission is hereby granted, free of charge"
        ),
        "not the Apache-2.0 license text",
    ),
    "no root CMakeLists.txt": (lambda tree: (tree / "CMakeLists.txt").unlink(), "has no CMakeLists.txt"),
    "project name differs": (
        lambda tree: _replace_in_root(tree, "project(MPCL)", "project(MPCLSegmentation)"),
        "differs from the entry's name 'MPCL'",
    ),
    "values differ between the two CMake files": (
        lambda tree: _edit(
            tree / "plugins/slicer/CMakeLists.txt",
            'set(EXTENSION_CONTRIBUTORS "MPCL project")',
            'set(EXTENSION_CONTRIBUTORS "someone else")',
        ),
        "EXTENSION_CONTRIBUTORS differs between",
    ),
    "category differs": (
        lambda tree: _replace_in_root(
            tree, 'set(EXTENSION_CATEGORY "Segmentation")', 'set(EXTENSION_CATEGORY "Quantification")'
        ),
        "differs from the entry's category",
    ),
    "entry without scm_url, over ftp": (
        lambda tree: (tree / "plugins/slicer/MPCL.json").write_text(
            json.dumps({"$schema": "x", "category": "Segmentation", "scm_url": "ftp://example.org/mpcl"})
        ),
        "must be an https:// or git:// address",
    ),
    "no runtime wheel step": (
        lambda tree: _edit(tree / MODULE_CMAKE, "build_runtime_wheel.py", "something_else.py"),
        "does not build the mpcl runtime wheel at build time",
    ),
    "runtime wheel script missing": (
        lambda tree: (tree / "plugins/slicer/Utilities/build_runtime_wheel.py").unlink(),
        "build_runtime_wheel.py, which is missing",
    ),
    "runtime wheel not built by default": (
        lambda tree: _edit(tree / MODULE_CMAKE, "RuntimeWheel ALL DEPENDS", "RuntimeWheel DEPENDS"),
        "does not build the runtime wheel by default",
    ),
    "runtime wheel not installed": (
        lambda tree: _edit(tree / MODULE_CMAKE, "install(DIRECTORY", "message(STATUS"),
        "does not install the runtime wheel into Resources/Wheels",
    ),
    "runtime wheel written elsewhere": (
        lambda tree: _edit(tree / MODULE_CMAKE, 'Resources/Wheels")', 'Wheels")'),
        "does not write to Resources/Wheels",
    ),
    "a package folder does not rebuild the wheel": (
        lambda tree: _edit(tree / MODULE_CMAKE, '"${MPCL_SOURCE_ROOT}/export/*.py"', ""),
        "when export/ changes",
    ),
    "entry with CRLF": (
        lambda tree: (tree / "plugins/slicer/MPCL.json").write_bytes(
            (tree / "plugins/slicer/MPCL.json").read_bytes().replace(b"\n", b"\r\n")
        ),
        "CR line endings",
    ),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_each_defect_fails_with_a_sentence(tree, defect):
    make, expected = DEFECTS[defect]
    make(tree)
    errors = _errors(tree)
    assert errors, f"{defect}: not detected"
    assert any(expected in error for error in errors), errors
    assert all(error.endswith(".") for error in errors)  # sentences


def test_repository_name_is_a_warning_not_an_error(tree):
    checker = check.Checker(tree)
    assert checker.run()
    assert any("does not start with 'Slicer'" in warning for warning in checker.warnings)
