"""Shared fixtures: tiny configs on the synthetic phantom so training tests run in seconds on a CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Triton decorates its own library functions (tl.max, tl.argmax, ...) when it is first imported, reading
# TRITON_INTERPRET then; torch may import triton early (e.g. during ONNX export), so the kernel tests'
# CPU interpreter has to be chosen before any test imports torch.
os.environ.setdefault("TRITON_INTERPRET", "1")

ACDC_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc"


def tiny_config_dict(
    output_dir: Path, method: str = "mean_teacher", iterations: int = 6, **method_params
) -> dict:
    """A phantom experiment small enough for unit tests: 32x32 patches, a slim U-Net, 2+2 per step."""
    return {
        "experiment": f"tiny_{method}",
        "output_dir": str(output_dir),
        "seed": 7,
        "data": {
            "kind": "phantom",
            "patch_size": [32, 32],
            "phantom": {
                "seed": 3,
                "n_labeled": 2,
                "n_unlabeled": 2,
                "n_val": 1,
                "n_test": 1,
                "size": [48, 48],
                "slices_per_volume": 4,
            },
        },
        "model": {"channels": [4, 8, 8, 16, 16]},
        "train": {
            "iterations": iterations,
            "labeled_batch": 2,
            "unlabeled_batch": 2,
            "val_every": 3,
            "checkpoint_every": 3,
            "log_every": 1,
            "device": "cpu",
        },
        "method": {"name": method, "params": method_params},
    }


def write_tiny_config(tmp_path: Path, text: str | None = None, **changes) -> Path:
    """A 3-iteration Mean Teacher phantom config as YAML in ``tmp_path`` (runs in ``tmp_path/run``), with
    dotted-key ``changes`` (``train.lr=...``) applied, or ``text`` written verbatim instead."""
    import yaml

    data = tiny_config_dict(tmp_path / "run", "mean_teacher", iterations=3, consistency_start=0)
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / "config.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data))
    return path


@pytest.fixture
def tiny_config(tmp_path):
    from mpcl.training.config import config_from_dict

    def make(method: str = "mean_teacher", iterations: int = 6, subdir: str = "run", **params):
        return config_from_dict(tiny_config_dict(tmp_path / subdir, method, iterations, **params))

    return make


@pytest.fixture(scope="session")
def package_dir(tmp_path_factory):
    """One small model package (tiny U-Net, ONNX + weights) shared read-only by the runtime tests."""
    from tests.segment_helpers import make_package

    return make_package(tmp_path_factory.mktemp("package"))


def straight_and_resumed(make_trainer, tmp_path: Path, stop_at: int = 2):
    """Train once straight through, and once interrupted at ``stop_at`` then resumed from latest.pt.

    ``make_trainer(subdir)`` builds a fresh trainer writing to ``tmp_path / subdir``; returns
    (straight, resumed) so a test can compare their final states.
    """
    straight = make_trainer("straight")
    straight.fit(progress=False)
    make_trainer("interrupted").fit(stop_at=stop_at, progress=False)
    resumed = make_trainer("interrupted")
    resumed.resume_from(tmp_path / "interrupted" / "latest.pt")
    resumed.fit(progress=False)
    return straight, resumed
