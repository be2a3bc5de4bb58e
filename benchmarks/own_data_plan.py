"""What ``mpcl-plan`` changes on a user's own data: test Dice with the plan against the fixed default.

A held-out own-data layout that is not ACDC: the built-in cardiac phantom written as an nnU-Net v2 raw
dataset at mixed resolutions. Every case shows the same anatomy (a 192 mm field of view) at one of several
in-plane spacings, inside a zero-filled border of its own width (scanners with other fields of view), so
the whole-slice zoom to 128² of the unplanned default sees the heart at a different scale in every case.
The test cases are at spacings and borders no training case has.

Two runs, the same seed, network, method (supervised), batch and iterations:

* **planned**: ``mpcl-plan --config-out`` (crop to the non-zero region, median in-plane target spacing,
  the planned patch as a window at that spacing, per-case z-score for MR, linear resampling);
* **default**: the same config without the plan's geometry keys and with ``data.patch_size: [128, 128]``:
  each case's own coarsest axis, each whole slice zoomed to 128² (normalisation and everything else as
  the planned run, so only the geometry differs).

Each run ends with its model package; ``Segmenter`` (torch backend, no post-processing) segments the test
scans and Dice is measured against their labels on the scans' own grids.

    python benchmarks/own_data_plan.py                          # about 10-15 minutes on one thread
    python benchmarks/own_data_plan.py --iterations 50 --tag smoke

It appends the run to ``--output`` (default benchmarks/results/own_data_plan_cpu.json).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mpcl.training.data.phantom import CLASS_NAMES
from mpcl.training.data.phantom_raw import (
    FIELD_OF_VIEW_MM,
    SLICES,
    TEST_CASES,
    THROUGH_PLANE_MM,
    TRAIN_CASES,
    write_phantom_raw_dataset,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import append_run, machine_record  # noqa: E402  (benchmarks/ is not a package)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MODEL_CHANNELS = [8, 16, 32, 64, 128]


def planned_config(root: Path, args: argparse.Namespace) -> tuple[dict, dict]:
    """The mpcl-plan config with this benchmark's budget (network, method, batch, iterations)."""
    from mpcl.training.dataset_fingerprint import dataset_fingerprint
    from mpcl.training.dataset_plan import config_from_plan, make_plan

    plan = make_plan(dataset_fingerprint(root, progress=False), "cpu")
    config = config_from_plan(plan, root, method="supervised")
    config["seed"] = args.seed
    config["model"] = {"channels": MODEL_CHANNELS}
    config["train"].update(
        iterations=args.iterations,
        labeled_batch=args.batch,
        unlabeled_batch=args.batch,
        val_every=max(10, args.iterations // 5),
        checkpoint_every=args.iterations,
        log_every=50,
        device="cpu",
        num_threads=args.threads,
    )
    return config, plan


def default_config(planned: dict) -> dict:
    """The planned config without the plan's geometry: whole slices, each case's own axis, 128²."""
    config = copy.deepcopy(planned)
    for key in ("slicing_axis", "target_spacing", "crop_to_nonzero"):
        config["data"].pop(key, None)
    config["data"]["patch_size"] = [128, 128]
    return config


def dice_scores(prediction: np.ndarray, label: np.ndarray) -> list[float]:
    scores = []
    for value in range(1, len(CLASS_NAMES)):
        pred, truth = prediction == value, label == value
        total = int(pred.sum()) + int(truth.sum())
        scores.append(1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total)
    return scores


def train_and_test(name: str, config: dict, root: Path, work: Path) -> dict:
    """Train ``config``, package its best checkpoint, segment the test scans with Segmenter."""
    import SimpleITK as sitk

    from mpcl import Segmenter
    from mpcl.export.pipeline import write_model_package
    from mpcl.training.config import config_from_dict
    from mpcl.training.data.loading import load_data
    from mpcl.training.trainer import Trainer

    config = {**config, "experiment": name, "output_dir": str(work / name)}
    validated = config_from_dict(config, name)
    started = time.perf_counter()
    data = load_data(validated.data)
    trainer = Trainer(validated, data)
    result = trainer.fit(progress=False)
    seconds = time.perf_counter() - started
    package = write_model_package(result.best_checkpoint, work / name / "model", onnx=False, overwrite=True)
    segmenter = Segmenter(package, backend="torch", postprocess=False, threads=validated.train.num_threads)
    cases = []
    for path in sorted((root / "imagesTs").glob("*.nii.gz")):
        case = path.name.replace("_0000.nii.gz", "")
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "labelsTs" / f"{case}.nii.gz")))
        output = segmenter(path)
        image = sitk.ReadImage(str(path))
        same_grid = output.to_sitk().GetSize() == image.GetSize() and np.allclose(
            output.to_sitk().GetSpacing(), image.GetSpacing()
        )
        scores = dice_scores(output.label_map, label)
        cases.append(
            {
                "case": case,
                "spacing_mm": float(image.GetSpacing()[0]),
                "size": list(image.GetSize()),
                "dice": dict(zip(CLASS_NAMES[1:], scores, strict=True)),
                "mean_dice": float(np.mean(scores)),
                "output_on_scan_grid": bool(same_grid),
            }
        )
    per_class = {c: float(np.mean([case["dice"][c] for case in cases])) for c in CLASS_NAMES[1:]}
    summary = {
        "data": {key: value for key, value in config["data"].items() if key != "root"},
        "training_samples": {
            "labelled": len(data.labeled),
            "sample_shape": list(data.labeled[0].image.shape),
        },
        "train_seconds": round(seconds, 1),
        "best_val_dice": result.best_val_dice,
        "best_iteration": result.best_iteration,
        "test_mean_dice": float(np.mean([case["mean_dice"] for case in cases])),
        "test_dice_per_class": per_class,
        "test_cases": cases,
    }
    print(
        f"{name:8} test mean Dice {100 * summary['test_mean_dice']:.2f} "
        f"(val {100 * result.best_val_dice:.2f} at {result.best_iteration}), {seconds:.0f} s",
        flush=True,
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--batch", type=int, default=4, help="labelled slices per step (both runs)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS / "own_data_plan_cpu.json")
    parser.add_argument("--tag", default="")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mpcl-own-data-plan-") as scratch:
        work = Path(scratch)
        root = write_phantom_raw_dataset(work / "Dataset900_PhantomMixed", args.seed)
        planned, plan = planned_config(root, args)
        runs = {
            "planned": train_and_test("planned", planned, root, work),
            "default": train_and_test("default", default_config(planned), root, work),
        }
    difference = runs["planned"]["test_mean_dice"] - runs["default"]["test_mean_dice"]
    print(f"planned - default: {100 * difference:+.2f} Dice points on {len(TEST_CASES)} test scans")
    report = {
        "machine": machine_record(args.threads, args.note, with_torch=True),
        "dataset": {
            "kind": "built-in cardiac phantom as an nnU-Net raw layout at mixed resolutions",
            "field_of_view_mm": FIELD_OF_VIEW_MM,
            "train_cases_spacing_border": TRAIN_CASES,
            "test_cases_spacing_border": TEST_CASES,
            "slices_per_case": SLICES,
            "through_plane_mm": THROUGH_PLANE_MM,
        },
        "plan": {
            "target_spacing_mm": plan["resampling"]["target_spacing_mm"],
            "patch_size": plan["patch_size"]["size"],
            "slicing_axis": plan["slicing_axis"]["name"],
            "normalization": plan["normalization"]["scheme"],
            "cases_cropped": plan["cropping"]["cases_cropped"],
        },
        "settings": {
            "iterations": args.iterations,
            "labeled_batch": args.batch,
            "seed": args.seed,
            "method": "supervised",
            "model_channels": MODEL_CHANNELS,
            "test_inference": "Segmenter, torch backend, no post-processing, on the scans' own grids",
        },
        "variants": runs,
        "planned_minus_default_dice_points": 100 * difference,
    }
    append_run(report, args.output, "own_data_plan", args.tag)


if __name__ == "__main__":
    main()
