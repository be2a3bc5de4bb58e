"""The sample model the module ships (``Resources/SampleModel``) and the text a model package shows.

The sample is a small cardiac model (RV, myocardium, LV), int8-quantised, distilled from one this project
trained on ACDC short-axis cine MRI with 3 labelled patients (BCP, a short CPU budget); its model.json
states the training data, the method and the test Dice (``description`` and ``model_card``), assembled by
``plugins/slicer/Utilities/build_sample_model.py``. It is a demonstration model, not for clinical use.

Pure Python: reading the description needs neither mpcl nor Qt, so the module shows it before the
runtime is installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SAMPLE_MODEL_LABEL = "Sample model: ACDC cardiac (demo)"
SAMPLE_MODEL_FOLDER = ("Resources", "SampleModel")


def sample_model_path(module_dir: str | os.PathLike | None = None) -> Path:
    """The bundled sample model package (``Resources/SampleModel`` of the module folder)."""
    root = Path(module_dir) if module_dir is not None else Path(__file__).resolve().parent.parent
    return root.joinpath(*SAMPLE_MODEL_FOLDER)


def has_sample_model(module_dir: str | os.PathLike | None = None) -> bool:
    return sample_model_path(module_dir).joinpath("model.json").is_file()


def is_sample_model(path: str | os.PathLike | None, module_dir: str | os.PathLike | None = None) -> bool:
    """Whether ``path`` (a folder or its model.json) is the bundled sample model."""
    if not path:
        return False
    path = Path(path)
    if path.name == "model.json":
        path = path.parent
    try:
        return path.resolve() == sample_model_path(module_dir).resolve()
    except OSError:
        return False


def model_description(path: str | os.PathLike | None) -> str:
    """The free-text ``description`` of a model package's model.json ("" when it has none or cannot be
    read: validating the package is the runtime's job, this is only what the package says about itself)."""
    if not path:
        return ""
    path = Path(path)
    where = path if path.name == "model.json" else path / "model.json"
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return ""
    description = data.get("description") if isinstance(data, dict) else None
    return description.strip() if isinstance(description, str) else ""
