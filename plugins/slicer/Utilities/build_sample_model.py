#!/usr/bin/env python3
"""Assemble the Slicer module's bundled sample model (``MPCLSegmentation/Resources/SampleModel``).

The sample is a small student distilled from the ACDC cardiac model this project trained with BCP on 3
labelled patients (``benchmarks/ssl_acdc.py``, ``cpu`` budget, seed 1): ``mpcl-export --distill
sample_model_distill.yaml --onnx --int8`` (the YAML beside this script) trains it with the project's
``distill`` method (the teacher's soft labels on the labelled and unlabelled training slices, Dice on the
3 labelled patients' slices, best.pt chosen on the 20 validation volumes; no test volume) and exports
the int8 ONNX the module runs on the CPU plus the fp32 ONNX it was derived from (the package format
requires it); the export's ``model.pt`` is left out (the ONNX Runtime backend does not need it).

What this script adds to the export's model.json: a name, the SNOMED CT terminology of each class, a
``description`` (the text the module shows) and a ``model_card`` with the training data, the method and
the test Dice of the package as shipped (each precision/backend measured by ``mpcl-eval --model``), of the
student checkpoint and of the teacher it was distilled from. How the files were made (1 thread each)::

    mpcl-export bcp_l3_s1/best.pt -o EXPORT --onnx --int8 \
        --distill plugins/slicer/Utilities/sample_model_distill.yaml --max-dice-drop 3 --threads 1
    # a copy of EXPORT without model.pt (PKG), evaluated per backend/precision on the 40 test volumes:
    mpcl-eval --model PKG --config configs/acdc_bcp_3labeled.yaml --data-root ACDC --threads 1 \
        --backend onnxruntime --precision int8 -o ort_int8.json     # (and fp32, and openvino int8)
    mpcl-eval --checkpoint EXPORT.student.pt --data-root ACDC --threads 1 -o student.json
    mpcl-eval --model TEACHER_PKG ... --precision int8 -o teacher_int8.json  # the teacher's int8 package
    python build_sample_model.py --export EXPORT --teacher-result bcp_l3_s1.result.json \
        --eval int8_onnxruntime=ort_int8.json --eval fp32_onnxruntime=ort_fp32.json \
        --eval int8_openvino=ov_int8.json --eval student_checkpoint=student.json \
        --eval teacher_int8_onnxruntime=teacher_int8.json --commit SOURCE_COMMIT \
        --dest plugins/slicer/MPCLSegmentation/Resources/SampleModel

Needs ``mpcl`` with torch (to validate model.json, to count the student's parameters) and the module's
``MPCLSegmentationLib`` (terminology).
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
DISTILL_CONFIG = "plugins/slicer/Utilities/sample_model_distill.yaml"
TRAINING_DATA = (
    "ACDC (Automated Cardiac Diagnosis Challenge, Bernard et al., IEEE TMI 2018), short-axis cardiac cine "
    "MRI in the SSL4MIS layout: 3 labelled training patients (patient038, patient050, patient099: the "
    "first 68 lines of train_slices.list), the 1244 slices of the other 67 training patients unlabelled. "
    "The teacher (BCP) was trained on exactly these; the distillation used the same slices (the teacher's "
    "soft predictions on all of them, ground truth only on the 3 labelled patients' slices) and no other "
    "labels. Both chose their checkpoint on the 20 validation volumes; no test volume was used before "
    "testing. ACDC is for research use only, as the challenge's terms require."
)
TEACHER = (
    "BCP (bidirectional copy-paste) semi-supervised training of a 2D U-Net (16-256 channels, 1.8 M "
    "parameters), 1500 iterations (375 of them supervised pre-training), 128x128 patches, 8 labelled + 8 "
    "unlabelled slices per step, seed 1: the 'cpu' budget of benchmarks/ssl_acdc.py, far shorter than the "
    "published schedule"
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


def _scores(dice: dict[str, float]) -> str:
    return ", ".join(f"{name} {dice[name]:.2f}" for name in CLASSES) + f" (mean {dice['mean']:.2f})"


def describe(test_dice: dict[str, dict[str, float]], parameters: int) -> str:
    """The one-paragraph text the module shows for the package (model.json ``description``)."""
    shipped, teacher = test_dice["int8_onnxruntime"], test_dice["teacher_checkpoint"]
    return (
        f"{NOT_CLINICAL}. Segments the right ventricle (RV), the myocardium and the left ventricle (LV) "
        f"on short-axis cardiac cine MRI. A small network ({parameters / 1000:.0f} k parameters, int8) "
        "distilled from a BCP model this project trained on ACDC with only 3 labelled patients (SSL4MIS "
        "split) plus 67 unlabelled ones, on a short CPU budget. Test Dice on the 40 ACDC test volumes: "
        f"{_scores(shipped)} as shipped (int8 ONNX); the BCP model it was distilled from: "
        f"{_scores(teacher)}. ACDC data are for research use only."
    )


def _parameters(export: Path) -> int:
    import torch

    state = torch.load(export / "model.pt", map_location="cpu", weights_only=False)
    return int(sum(value.numel() for value in state["student"].values()))


def build(export: Path, teacher_result: Path, evaluations: dict[str, Path], commit: str, dest: Path) -> Path:
    from mpcl.model_package import load_model_package, read_model_json, write_model_json

    data = read_model_json(export)
    distillation = data.get("export", {}).get("distillation")
    assert distillation, "the export must come from mpcl-export --distill"
    parameters = _parameters(export)
    data["files"].pop("torch", None)
    assert {"onnx", "onnx_int8"} <= set(data["files"]), "the export must hold the fp32 and int8 ONNX"
    result = json.loads(teacher_result.read_text())
    test_dice = {key: _dice(json.loads(path.read_text())["summary"]) for key, path in evaluations.items()}
    test_dice["teacher_checkpoint"] = _dice(result["test"])
    runs = {}
    for key, path in evaluations.items():
        record = json.loads(path.read_text())
        runs[key] = record.get("backend") or (
            f"{Path(record['checkpoint']).name} (iteration {record['iteration']}), torch {record['torch']}"
        )
        if key.startswith("teacher_"):
            runs[key] = f"the teacher's package (mpcl-export --onnx --int8 of its best.pt): {runs[key]}"
    data["name"] = NAME
    for entry in data["classes"]:
        if entry["value"]:
            entry["terminology"] = _terminology(entry["name"])
    data["description"] = describe(test_dice, parameters)
    data["model_card"] = {
        "intended_use": f"{NOT_CLINICAL}: it shows what the MPCL Slicer extension does. It was trained "
        "on few labels for a short time and its contours must not be used for diagnosis or treatment.",
        "training_data": TRAINING_DATA,
        "method": f"Knowledge distillation (the project's distill method run by its Trainer, "
        f"{DISTILL_CONFIG}): a 2D U-Net with channels {distillation['channels']} ({parameters} parameters; "
        f"the teacher's: {distillation['teacher_channels']}) started from the teacher's most important "
        "channels, trained for "
        f"{distillation['iterations']} iterations (best.pt at {distillation['best_iteration']}) on the "
        "teacher's temperature-softened predictions (T = 4) plus soft Dice on the labelled slices, 8 "
        "labelled + 8 unlabelled 128x128 slices per step. The teacher: " + TEACHER + ".",
        "deployment": "int8-quantised (static QDQ, per-channel int8 weights, activations calibrated on 128 "
        "training slices): the int8 ONNX the module runs on the CPU. The fp32 ONNX it was derived from is "
        "included (the package format requires it; --precision fp32 runs it).",
        "test_protocol": PROTOCOL,
        "test_dice": test_dice,
        "test_dice_runs": {
            **runs,
            "teacher_checkpoint": f"BCP best.pt (iteration {result['best_iteration']}), torch "
            f"{result['torch']} on {result['device']}; validation mean Dice "
            f"{result['best_val_mean_dice']:.4f}",
        },
        "source": f"mpcl-export --distill {DISTILL_CONFIG} with the code of commit {commit[:12]}, from "
        f"benchmarks/ssl_acdc.py run bcp_l3_s1 (commit {result['commit'][:12]}, config "
        f"{result['config_hash']})",
    }
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.iterdir():
        if stale.is_file():
            stale.unlink()
    for entry in data["files"].values():
        shutil.copyfile(export / entry["path"], dest / entry["path"])
    write_model_json(dest, data)
    package = load_model_package(dest)
    for role in package.files:
        package.read_verified(role)  # the checksums hold
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, required=True, help="mpcl-export --distill's package folder")
    parser.add_argument(
        "--teacher-result", type=Path, required=True, help="the teacher's benchmark result JSON"
    )
    parser.add_argument("--eval", action="append", required=True, metavar="KEY=JSON", help="mpcl-eval output")
    parser.add_argument("--commit", required=True, help="the source commit the export ran at")
    parser.add_argument("--dest", type=Path, required=True)
    args = parser.parse_args(argv)
    evaluations = {key: Path(path) for key, path in (item.split("=", 1) for item in args.eval)}
    if "int8_onnxruntime" not in evaluations:
        parser.error("--eval int8_onnxruntime=JSON is required (what the module runs by default)")
    print(build(args.export, args.teacher_result, evaluations, args.commit, args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
