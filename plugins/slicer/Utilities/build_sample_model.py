#!/usr/bin/env python3
"""Assemble the Slicer module's bundled sample model (``MPCLSegmentation/Resources/SampleModel``).

The sample is the ACDC cardiac model this project trained with BCP on 3 labelled patients
(``benchmarks/ssl_acdc.py``, ``cpu`` budget, seed 1), exported by ``mpcl-export --onnx --int8``: the
int8 ONNX the module runs on the CPU plus the fp32 ONNX it was derived from (model.json requires it);
the export's ``model.pt`` is left out (the ONNX Runtime backend does not need it). It is int8-quantised,
not distilled: the same network as the checkpoint.

What this script adds to the export's model.json: a name, the SNOMED CT terminology of each class, a
``description`` (the text the module shows) and a ``model_card`` with the training data, the method and
the test Dice of the package as shipped (each precision/backend measured by ``mpcl-eval --model``) and of
the checkpoint (its benchmark result JSON). How the files were made::

    OMP_NUM_THREADS=1 mpcl-export best.pt -o EXPORT --onnx --int8 --threads 1 --data-root ACDC --no-progress
    # a copy of EXPORT without model.pt, evaluated per backend/precision:
    OMP_NUM_THREADS=1 mpcl-eval --model PKG --config configs/acdc_bcp_3labeled.yaml --data-root ACDC \
        --threads 1 --backend onnxruntime --precision int8 -o ort_int8.json   # (and openvino int8, fp32)
    python build_sample_model.py --export EXPORT --checkpoint-result bcp_l3_s1.result.json \
        --eval int8_onnxruntime=ort_int8.json --eval int8_openvino=ov_int8.json \
        --eval fp32_onnxruntime=ort_fp32.json --dest plugins/slicer/MPCLSegmentation/Resources/SampleModel

Needs ``mpcl`` (to validate model.json) and the module's ``MPCLSegmentationLib`` (terminology).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

MODULE = Path(__file__).resolve().parents[1] / "MPCLSegmentation"
CLASSES = ("RV", "myocardium", "LV")
NAME = "Sample model: ACDC cardiac (demo)"
NOT_CLINICAL = "Demonstration model, not for clinical use"
TRAINING_DATA = (
    "ACDC (Automated Cardiac Diagnosis Challenge, Bernard et al., IEEE TMI 2018), short-axis cardiac cine "
    "MRI in the SSL4MIS layout: 3 labelled training patients (patient038, patient050, patient099: the "
    "first 68 lines of train_slices.list), the 1244 slices of the other 67 training patients unlabelled; "
    "checkpoint chosen on the 20 validation volumes. ACDC is for research use only, as the challenge's "
    "terms require."
)
METHOD = (
    "BCP (bidirectional copy-paste) semi-supervised training of a 2D U-Net (16-256 channels, 1.8 M "
    "parameters), 1500 iterations (375 of them supervised pre-training), 128x128 patches, 8 labelled + 8 "
    "unlabelled slices per step, seed 1: the 'cpu' budget of benchmarks/ssl_acdc.py, far shorter than the "
    "published schedule."
)
DEPLOYMENT = (
    "int8-quantised (static QDQ, per-channel int8 weights, activations calibrated on 128 training slices), "
    "not distilled: the same network as the checkpoint. The fp32 ONNX it was derived from is included "
    "(the package format requires it; --precision fp32 runs it)."
)
PROTOCOL = (
    "40 ACDC test volumes (20 patients, SSL4MIS test.list), slice by slice, nearest-neighbour resize to "
    "128x128 and back (the published protocol), no post-processing; Dice per class, mean over volumes."
)


def _dice(summary: dict) -> dict[str, float]:
    return {name: round(float(summary[name]["dice"]["mean"]), 4) for name in (*CLASSES, "mean")}


def _terminology(name: str) -> dict:
    sys.path.insert(0, str(MODULE))
    from MPCLSegmentationLib.terminology import terminology_for_class

    entry, _source = terminology_for_class(name)
    return {
        "category": [entry.category.scheme, entry.category.value, entry.category.meaning],
        "type": [entry.type.scheme, entry.type.value, entry.type.meaning],
    }


def describe(test_dice: dict[str, dict[str, float]]) -> str:
    """The one-paragraph text the module shows for the package (model.json ``description``)."""
    shipped, checkpoint = test_dice["int8_onnxruntime"], test_dice["checkpoint"]

    def scores(dice: dict[str, float]) -> str:
        return ", ".join(f"{name} {dice[name]:.2f}" for name in CLASSES) + f" (mean {dice['mean']:.2f})"

    return (
        f"{NOT_CLINICAL}. Segments the right ventricle (RV), the myocardium and the left ventricle (LV) "
        "on short-axis cardiac cine MRI. Trained on ACDC with only 3 labelled patients (SSL4MIS split) plus "
        "67 unlabelled ones, by BCP semi-supervised learning on a short CPU budget (1500 iterations). "
        f"Test Dice on the 40 ACDC test volumes: {scores(shipped)} as shipped (int8 ONNX); the checkpoint "
        f"it was quantised from: {scores(checkpoint)}. int8-quantised, not distilled. ACDC data are for "
        "research use only."
    )


def build(export: Path, checkpoint_result: Path, evaluations: dict[str, Path], dest: Path) -> Path:
    from mpcl.model_package import load_model_package, read_model_json, write_model_json

    data = read_model_json(export)
    data["files"].pop("torch", None)
    assert {"onnx", "onnx_int8"} <= set(data["files"]), "the export must hold the fp32 and int8 ONNX"
    result = json.loads(checkpoint_result.read_text())
    test_dice = {key: _dice(json.loads(path.read_text())["summary"]) for key, path in evaluations.items()}
    test_dice["checkpoint"] = _dice(result["test"])
    backends = {key: json.loads(path.read_text())["backend"] for key, path in evaluations.items()}
    data["name"] = NAME
    for entry in data["classes"]:
        if entry["value"]:
            entry["terminology"] = _terminology(entry["name"])
    data["description"] = describe(test_dice)
    data["model_card"] = {
        "intended_use": f"{NOT_CLINICAL}: it shows what the MPCL Slicer extension does. It was trained "
        "on few labels for a short time and its contours must not be used for diagnosis or treatment.",
        "training_data": TRAINING_DATA,
        "method": METHOD,
        "deployment": DEPLOYMENT,
        "test_protocol": PROTOCOL,
        "test_dice": test_dice,
        "test_dice_runs": {
            **backends,
            "checkpoint": f"best.pt (iteration {result['best_iteration']}), torch {result['torch']} on "
            f"{result['device']}; validation mean Dice {result['best_val_mean_dice']:.4f}",
        },
        "source": f"benchmarks/ssl_acdc.py run bcp_l3_s1 (commit {result['commit'][:12]}, "
        f"config {result['config_hash']})",
    }
    dest.mkdir(parents=True, exist_ok=True)
    for entry in data["files"].values():
        shutil.copyfile(export / entry["path"], dest / entry["path"])
    write_model_json(dest, data)
    package = load_model_package(dest)
    for role in package.files:
        package.read_verified(role)  # the checksums hold
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, required=True, help="mpcl-export's package folder")
    parser.add_argument("--checkpoint-result", type=Path, required=True, help="the run's result JSON")
    parser.add_argument(
        "--eval", action="append", required=True, metavar="KEY=JSON", help="mpcl-eval --model output"
    )
    parser.add_argument("--dest", type=Path, required=True)
    args = parser.parse_args(argv)
    evaluations = {key: Path(path) for key, path in (item.split("=", 1) for item in args.eval)}
    if "int8_onnxruntime" not in evaluations:
        parser.error("--eval int8_onnxruntime=JSON is required (what the module runs by default)")
    print(build(args.export, args.checkpoint_result, evaluations, args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
