"""Building a model package folder safely: read the source, stage every file, publish atomically.

A package is assembled in a hidden staging folder beside its destination. model.json is rewritten in
the stage each time a file is added, so every artefact is checked through the real runtime loader and
backends (checksums, shapes, precision choice) exactly as ``Segmenter`` will later see it; a refused
artefact is removed from the stage and its entry dropped. Only a finished stage is renamed into place,
so a reader never sees half a package and a failure leaves the previous package untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mpcl.errors import InputError
from mpcl.io import follow_umask
from mpcl.model_package import (
    MODEL_JSON,
    ModelPackage,
    load_model_package,
    sha256_of,
    write_model_json,
)
from mpcl.nn.checkpoint import load_checkpoint, save_checkpoint

SLIM_KEYS = ("iteration", "student", "metadata", "config")
POSTPROCESSING_KEYS = ("largest_component", "fill_holes")


def load_source(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint, or the model.pt of an existing package folder (its deployment student)."""
    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_JSON).is_file():
            raise InputError(
                f"{path}: is a folder but not a model package (no {MODEL_JSON}); give a checkpoint"
            )
        package = load_model_package(path)
        if not package.has("torch"):
            raise InputError(f"{path}: the package has no torch weights (model.pt) to export from")
        return load_checkpoint(package.path_of("torch"))
    return load_checkpoint(path)


def package_postprocessing(
    source: str | os.PathLike, requested: Mapping[str, Any] | None, class_names: Sequence[str]
) -> dict[str, Any] | None:
    """The ``postprocessing`` entry of the exported model.json.

    ``requested`` (``{"largest_component": true or [class names], "fill_holes": ...}``, a key left out:
    none) replaces the source's; None keeps what a source package has (a checkpoint has none). Names are
    checked here, before any work, so a typo is one sentence rather than a failed package.
    """
    if requested is None:
        source = Path(source)
        if not source.is_dir():
            return None
        package = load_model_package(source)
        names = {label.value: label.name for label in package.classes}
        settings = package.postprocessing
        return {
            "largest_component": [names[value] for value in settings.largest_component],
            "fill_holes": [names[value] for value in settings.fill_holes],
        }
    unknown_keys = sorted(set(requested) - set(POSTPROCESSING_KEYS))
    if unknown_keys:
        raise InputError(f"postprocessing keys {unknown_keys} are not known; use {list(POSTPROCESSING_KEYS)}")
    foreground = list(class_names)[1:]
    result: dict[str, Any] = {}
    for key in POSTPROCESSING_KEYS:
        spec = requested.get(key, [])
        if isinstance(spec, bool):
            result[key] = spec
            continue
        wrong = [name for name in spec if name not in foreground]
        if wrong:
            raise InputError(
                f"postprocessing {key}: {wrong} not among the model's foreground classes {foreground} "
                "(or give 'all')"
            )
        result[key] = list(dict.fromkeys(spec))
    return result


def refuse_existing(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise InputError(f"{out_dir}: already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder; refusing to replace it")
    if out_dir.exists() and not (out_dir / MODEL_JSON).is_file() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir}: exists and is not a model package; refusing to replace it")


def publish(stage: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished folder into place; an existing package is replaced only with ``overwrite``."""
    refuse_existing(out_dir, overwrite)
    if out_dir.exists():
        backup = Path(tempfile.mkdtemp(prefix=".old-", dir=out_dir.parent))
        backup.rmdir()
        out_dir.rename(backup)
        stage.rename(out_dir)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        stage.rename(out_dir)


class PackageStage:
    """A staging folder plus the model.json content being built in it (use as a context manager)."""

    def __init__(self, out_dir: Path, model_json: dict[str, Any]) -> None:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.root = Path(tempfile.mkdtemp(prefix=".tmp-package-", dir=out_dir.parent))
        follow_umask(self.root, 0o777)  # mkdtemp makes 0700 folders; a package follows the umask
        self.data = dict(model_json)
        self.data.setdefault("files", {})

    def __enter__(self) -> PackageStage:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def save_weights(self, name: str, state: Mapping[str, Any]) -> Path:
        """A slim checkpoint (weights, metadata, config: no optimiser, teacher or banks)."""
        return save_checkpoint(self.root / name, {key: state[key] for key in SLIM_KEYS})

    def add_file(self, role: str, name: str, **info: Any) -> ModelPackage:
        """Record a file already written into the stage; returns the stage loaded as a package."""
        self.data["files"][role] = {"path": name, "sha256": sha256_of(self.root / name), **info}
        return self.write()

    def update_file(self, role: str, **info: Any) -> None:
        self.data["files"][role].update(info)
        self.write()

    def drop_file(self, role: str) -> None:
        """Forget a refused artefact: its entry and its file."""
        entry = self.data["files"].pop(role)
        (self.root / entry["path"]).unlink(missing_ok=True)
        self.write()

    def write(self) -> ModelPackage:
        write_model_json(self.root, self.data)
        return load_model_package(self.root)

    def publish(self, overwrite: bool) -> ModelPackage:
        self.write()
        publish(self.root, self.out_dir, overwrite)
        return load_model_package(self.out_dir)
