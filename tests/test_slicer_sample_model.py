"""The sample model the Slicer extension ships (``MPCLSegmentation/Resources/SampleModel``).

A small cardiac model (RV, myocardium, LV), int8-quantised, distilled from a BCP model trained on ACDC
with 3 labelled patients: its package must validate (every file against its SHA-256), be small enough to
ship (a few MB at most), carry SNOMED CT terminology for its classes, and state its training data,
method, distillation and test Dice (its own and its teacher's) in model.json (the text the module
shows). Segmenting with it in a built extension's layout: ``tests/test_slicer_runtime.py``. No Slicer
needed here.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from mpcl.errors import ModelPackageError
from mpcl.model_package import load_model_package

REPOSITORY = Path(__file__).resolve().parents[1]
PLUGIN = REPOSITORY / "plugins" / "slicer" / "MPCLSegmentation"
SAMPLE = PLUGIN / "Resources" / "SampleModel"
if str(PLUGIN) not in sys.path:
    sys.path.insert(0, str(PLUGIN))

from MPCLSegmentationLib.samplemodel import (  # noqa: E402
    SAMPLE_MODEL_LABEL,
    has_sample_model,
    is_sample_model,
    model_description,
    sample_model_path,
)
from MPCLSegmentationLib.terminology import (  # noqa: E402
    ANATOMICAL_STRUCTURE,
    LEFT_VENTRICLE,
    MYOCARDIUM,
    RIGHT_VENTRICLE,
    SOURCE_MODEL_JSON,
    declared_by_class,
    terminology_for_class,
)

CLASSES = ["background", "RV", "myocardium", "LV"]
MAX_SHIPPED_BYTES = 3_000_000  # the int8 ONNX, the fp32 ONNX it is derived from and model.json


def _model_json() -> dict:
    return json.loads((SAMPLE / "model.json").read_text(encoding="utf-8"))


def test_the_sample_model_loads_and_every_file_matches_its_checksum(tmp_path):
    package = load_model_package(SAMPLE)
    assert package.class_names == CLASSES
    assert set(package.files) == {"onnx", "onnx_int8"}  # what ONNX Runtime needs; no torch checkpoint
    assert package.files["onnx"].info["precision"] == "fp32"
    assert package.files["onnx_int8"].info["precision"] == "int8"
    for role in package.files:
        assert package.read_verified(role)  # raises on a checksum mismatch
    assert package.patch_size == (128, 128) and package.normalization_scheme == "minmax"
    assert package.resize == "nearest"  # the published ACDC protocol the test Dice was measured with

    tampered = tmp_path / "SampleModel"
    shutil.copytree(SAMPLE, tampered)
    data = bytearray((tampered / "model.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / "model.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelPackageError):
        load_model_package(tampered).read_verified("onnx_int8")


def test_the_sample_model_is_small_enough_to_ship():
    files = sorted(p.name for p in SAMPLE.iterdir())
    listed = {entry["path"] for entry in _model_json()["files"].values()}
    assert files == sorted({"model.json", *listed}), "a file in SampleModel that model.json does not name"
    total = sum(p.stat().st_size for p in SAMPLE.iterdir())
    assert total <= MAX_SHIPPED_BYTES, f"SampleModel holds {total} bytes"
    assert (SAMPLE / "model.int8.onnx").stat().st_size < 1_000_000


def test_the_classes_carry_snomed_ct_terminology_that_matches_their_names():
    declared = declared_by_class(_model_json())
    assert sorted(declared) == sorted(CLASSES[1:])  # every foreground class declares its codes
    expected = {"RV": RIGHT_VENTRICLE, "myocardium": MYOCARDIUM, "LV": LEFT_VENTRICLE}
    for name, code in expected.items():
        entry, source = terminology_for_class(name, declared[name])
        assert source == SOURCE_MODEL_JSON
        assert (entry.category, entry.type) == (ANATOMICAL_STRUCTURE, code)
        assert entry == terminology_for_class(name)[0]  # the same as the module's name mapping
        assert f"~SCT^{code.value}^{code.meaning}~" in entry.entry()


def test_model_json_states_data_method_and_test_dice():
    data = _model_json()
    assert data["name"] == SAMPLE_MODEL_LABEL
    card = data["model_card"]
    for key in ("intended_use", "training_data", "method", "deployment", "test_protocol", "test_dice"):
        assert isinstance(card[key], (str, dict)) and card[key], key
    assert "not for clinical use" in card["intended_use"]
    assert "3 labelled" in card["training_data"] and "train_slices.list" in card["training_data"]
    assert "unlabelled" in card["training_data"] and "no test volume" in card["training_data"]
    assert "distill" in card["method"] and "BCP" in card["method"] and "1500 iterations" in card["method"]
    assert "int8" in card["deployment"]
    assert "40 ACDC test volumes" in card["test_protocol"]
    assert "Utilities/sample_model_distill.yaml" in card["source"] and "bcp_l3_s1" in card["source"]
    distillation = data["export"]["distillation"]  # what mpcl-export --distill recorded
    assert distillation["channels"] == data["network"]["channels"]
    assert distillation["teacher_channels"] == [16, 32, 64, 128, 256]
    assert (PLUGIN.parent / "Utilities" / "sample_model_distill.yaml").is_file()
    dice = card["test_dice"]
    assert {"int8_onnxruntime", "student_checkpoint", "teacher_checkpoint"} <= set(dice)
    for scores in dice.values():
        assert set(scores) == {"RV", "myocardium", "LV", "mean"}
        assert all(0.5 < value < 1.0 for value in scores.values()), scores
        classes = [scores[name] for name in ("RV", "myocardium", "LV")]
        assert scores["mean"] == pytest.approx(sum(classes) / 3, abs=1e-3)
    assert dice["student_checkpoint"]["mean"] - dice["int8_onnxruntime"]["mean"] < 0.02  # int8 costs little
    assert dice["teacher_checkpoint"]["mean"] - dice["int8_onnxruntime"]["mean"] < 0.04  # so does distilling

    description = model_description(SAMPLE)  # what the module shows when the sample is chosen
    assert description == data["description"]
    for needle in ("not for clinical use", "ACDC", "3 labelled patients", "distilled from a BCP model"):
        assert needle in description, needle
    for key in ("int8_onnxruntime", "teacher_checkpoint"):
        for name in ("RV", "myocardium", "LV"):
            assert f"{name} {dice[key][name]:.2f}" in description


def test_the_module_finds_the_sample_and_reads_descriptions_without_the_runtime(tmp_path):
    assert sample_model_path(PLUGIN) == sample_model_path() == SAMPLE
    assert has_sample_model(PLUGIN) and not has_sample_model(tmp_path)
    assert is_sample_model(SAMPLE, PLUGIN) and is_sample_model(str(SAMPLE / "model.json"), PLUGIN)
    assert not is_sample_model(PLUGIN / "Resources" / "TestModel", PLUGIN) and not is_sample_model("", PLUGIN)
    assert model_description(PLUGIN / "Resources" / "TestModel") == ""  # no description: no text
    (tmp_path / "model.json").write_text("{not json")
    assert model_description(tmp_path) == "" and model_description(tmp_path / "missing") == ""
