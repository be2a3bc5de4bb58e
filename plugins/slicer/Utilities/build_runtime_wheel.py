#!/usr/bin/env python3
"""Build the ``mpcl`` runtime wheel from this source tree into the Slicer module's resources.

The extension build runs this (``plugins/slicer/MPCLSegmentation/CMakeLists.txt``, with Slicer's Python)
so that the packaged extension carries the runtime it was built with: *Install runtime* installs that
file, with no package index needed for mpcl itself. The tests build their wheel the same way.

1. The files the wheel is made of are copied to a clean staging folder: ``pyproject.toml``, its readme,
   the license files and every folder of ``[tool.setuptools] package-dir``. A wheel built in the source
   tree itself could carry stale modules from an earlier ``build/lib`` (setuptools keeps them).
2. ``python -m pip wheel --no-deps`` builds it; without build isolation (offline) when this Python
   already has what ``[build-system] requires`` asks for, with isolation (setuptools from the index)
   otherwise.
3. ``--dest`` receives exactly one ``mpcl-VERSION-py3-none-any.whl`` (earlier mpcl wheels there are
   removed) and ``mpcl-version.txt`` holding VERSION (as in the wheel's name, the version pip records):
   the version the module expects its runtime to be.

Usage: ``python build_runtime_wheel.py --source REPO --work BUILD/runtime-wheel --dest .../Resources/Wheels``
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

VERSION_FILE = "mpcl-version.txt"
WHEEL_PATTERN = "mpcl-*.whl"
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "*.egg-info")


def read_pyproject(source: Path) -> dict:
    """pyproject.toml as a dict: tomllib (Python 3.11+), else tomli, else :func:`read_pyproject_subset`
    (Slicer releases before 5.10 run Python 3.9, and the Extensions Index builds for them too)."""
    path = source / "pyproject.toml"
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            return read_pyproject_subset(path.read_text(encoding="utf-8"))
    with path.open("rb") as handle:
        return tomllib.load(handle)


def _table(text: str, name: str) -> str:
    """The body of ``[name]`` up to the next table header."""
    match = re.search(rf"^\[{re.escape(name)}\]\s*$(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    return match.group(1) if match else ""


def read_pyproject_subset(text: str) -> dict:
    """The keys this script reads, without a TOML parser: [project] version and readme (a string), and
    [tool.setuptools] package-dir (an inline table of strings)."""
    project, setuptools = _table(text, "project"), _table(text, "tool.setuptools")
    result: dict = {"project": {}, "tool": {"setuptools": {}}}
    for key in ("version", "readme"):
        match = re.search(rf'^{key}\s*=\s*"([^"]*)"', project, re.MULTILINE)
        if match:
            result["project"][key] = match.group(1)
    match = re.search(r"^package-dir\s*=\s*\{([^}]*)\}", setuptools, re.MULTILINE)
    if match:
        pairs = re.findall(r'"([^"]+)"\s*=\s*"([^"]*)"', match.group(1))
        result["tool"]["setuptools"]["package-dir"] = dict(pairs)
    return result


def project_version(pyproject: dict) -> str:
    version = pyproject.get("project", {}).get("version")
    if not isinstance(version, str) or not version:
        raise SystemExit("pyproject.toml has no static [project] version; the bundled wheel needs one.")
    return version


def staged_paths(source: Path, pyproject: dict) -> list[str]:
    """What the wheel is built from, relative to ``source``: pyproject, readme, licenses, package folders."""
    project = pyproject.get("project", {})
    paths = ["pyproject.toml"]
    readme = project.get("readme")
    if isinstance(readme, dict):
        readme = readme.get("file")
    if isinstance(readme, str):
        paths.append(readme)
    paths += sorted(p.name for p in source.iterdir() if p.is_file() and re.match(r"LICEN[CS]E", p.name))
    package_dir = pyproject.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    folders = sorted({folder.split("/")[0] for folder in package_dir.values() if folder})
    if not folders:
        raise SystemExit("pyproject.toml's [tool.setuptools] package-dir names no package folder.")
    return paths + folders


def stage(source: Path, staging: Path, pyproject: dict) -> None:
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for relative in staged_paths(source, pyproject):
        origin = source / relative
        if origin.is_dir():
            shutil.copytree(origin, staging / relative, ignore=_IGNORED)
        elif origin.is_file():
            shutil.copy2(origin, staging / relative)
        else:
            raise SystemExit(f"{origin} is missing; the mpcl wheel cannot be built without it.")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def build_backend_available() -> bool:
    """True when this Python can build the wheel without fetching anything: setuptools>=68 (what
    pyproject's [build-system] requires) and, before setuptools 70.1, the ``wheel`` package."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    version = _version_tuple(setuptools.__version__)
    return version >= (68,) and (version >= (70, 1) or importlib.util.find_spec("wheel") is not None)


def build_wheel(staging: Path, out: Path, isolation: str = "auto") -> Path:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", str(out)]
    if isolation == "off" or (isolation == "auto" and build_backend_available()):
        command += ["--no-build-isolation", "--no-index"]  # nothing to download: works offline
    # mpcl needs Python 3.10+; the pure-Python wheel can still be built by an older Slicer's Python
    # (the module then says which Slicer it needs).
    command += ["--ignore-requires-python", str(staging)]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    wheels = sorted(out.glob(WHEEL_PATTERN))
    if len(wheels) != 1:
        raise SystemExit(f"pip wheel wrote {[w.name for w in wheels]} to {out}; expected one mpcl wheel.")
    return wheels[0]


def wheel_version(path: Path) -> str:
    """The (normalised) version in a wheel's file name: what pip records as the installed version."""
    return path.name.split("-")[1]


def same_version(a: str, b: str) -> bool:
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return a.strip() == b.strip()
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a.strip() == b.strip()


def install_into(wheel: Path, version: str, dest: Path) -> Path:
    """Put ``wheel`` and the version record into ``dest``, replacing any earlier mpcl wheel there."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob(WHEEL_PATTERN):
        old.unlink()
    target = dest / wheel.name
    shutil.copy2(wheel, target)
    (dest / VERSION_FILE).write_text(version + "\n", encoding="utf-8")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="the MPCL repository (pyproject.toml)")
    parser.add_argument("--work", type=Path, required=True, help="a scratch folder (staging, pip output)")
    parser.add_argument("--dest", type=Path, required=True, help="the module's Resources/Wheels folder")
    parser.add_argument("--isolation", choices=("auto", "on", "off"), default="auto")
    args = parser.parse_args(argv)
    source = args.source.resolve()
    pyproject = read_pyproject(source)
    version = project_version(pyproject)
    staging = args.work / "source"
    stage(source, staging, pyproject)
    wheel = build_wheel(staging, args.work / "wheels", args.isolation)
    if not same_version(wheel_version(wheel), version):
        raise SystemExit(f"pip wheel built {wheel.name}, but pyproject.toml says version {version}.")
    target = install_into(wheel, wheel_version(wheel), args.dest)
    print(f"mpcl {wheel_version(wheel)} runtime wheel: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
