"""mpcl-export end to end on a small model trained on the phantom: gates keep and refuse, no half writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from mpcl import Segmenter
from mpcl.model_package import MODEL_JSON, load_model_package
from tests.segment_helpers import auto_cpu_backend

pytestmark = pytest.mark.slow  # every test exports a freshly trained model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.export_helpers import train_tiny_checkpoint

    return train_tiny_checkpoint(tmp_path_factory.mktemp("trained"))


def _export(*args):
    from mpcl.export.cli import export_main

    return CliRunner().invoke(export_main, [str(a) for a in args], catch_exceptions=False)


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith((".tmp-", ".old-", ".quantize-"))]


@pytest.fixture(scope="module")
def int8_package(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "model"
    result = _export(
        checkpoint, "-o", out, "--int8", "--fp16", "--max-dice-drop", 25, "--threads", 1, "--no-progress"
    )
    return out, result


def test_onnx_int8_fp16_package_is_written_with_its_checks(int8_package):
    out, result = int8_package
    assert result.exit_code == 0, result.output
    assert "onnx fp32: max |logit diff|" in result.output and "(limit " in result.output  # thresholds shown
    assert "onnx int8: validation Dice" in result.output and "max drop 25" in result.output
    names = ["model.fp16.onnx", "model.int8.onnx", "model.json", "model.onnx", "model.pt"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert "onnx fp16: kept" in result.output and _fp16_parity_passed(out)
    data = json.loads((out / MODEL_JSON).read_text())
    int8 = data["files"]["onnx_int8"]
    source_dice = data["export"]["source_validation_dice"]
    assert source_dice > 0.2  # the fixture network really segments, so the gate measures something
    assert int8["dice"]["source_validation_dice"] == source_dice
    assert int8["dice"]["dice_drop_points"] == pytest.approx(
        100 * (source_dice - int8["dice"]["validation_dice"])
    )
    assert int8["dice"]["dice_drop_points"] <= 25
    assert int8["quantization"]["format"] == "QDQ" and int8["quantization"]["calibration_slices"] > 0
    assert (
        data["files"]["onnx"]["parity"]["max_abs_logit_difference"]
        <= data["files"]["onnx"]["parity"]["logit_tolerance"]
    )
    assert data["files"]["onnx"]["opset"] >= 17
    assert not _leftovers(out.parent)


def _fp16_parity_passed(out) -> bool:
    parity = json.loads((out / MODEL_JSON).read_text())["files"]["onnx_fp16"]["parity"]
    return (
        parity["max_abs_logit_difference"] <= parity["logit_tolerance"] and parity["label_agreement"] >= 0.99
    )


def test_each_device_gets_its_fastest_precision(int8_package):
    from mpcl.backends.onnxruntime_backend import onnx_role

    package = load_model_package(int8_package[0])
    assert onnx_role(package, "cpu") == "onnx_int8" and onnx_role(package, "cuda") == "onnx_fp16"
    assert onnx_role(package, "cpu", "fp32") == "onnx"


def test_segmenter_runs_int8_on_cpu_and_keeps_geometry(int8_package):
    import SimpleITK as sitk

    from tests.segment_helpers import phantom_volume, sitk_image

    out, _ = int8_package
    segmenter = Segmenter.from_pretrained(out, device="cpu")
    assert segmenter.backend.name == auto_cpu_backend() and segmenter.backend.precision == "int8"
    assert "int8" in segmenter.backend.describe()
    fp32 = Segmenter.from_pretrained(out, device="cpu", precision="fp32")
    assert fp32.backend.precision == "fp32"
    image = sitk_image(phantom_volume())
    result = segmenter(image)
    written = result.to_sitk()
    assert written.GetSize() == image.GetSize() and written.GetSpacing() == image.GetSpacing()
    assert written.GetOrigin() == image.GetOrigin() and written.GetDirection() == image.GetDirection()
    reference = fp32(image).label_map
    assert (result.label_map == reference).mean() > 0.9
    torch_result = Segmenter.from_pretrained(out, backend="torch", device="cpu")(image)
    np.testing.assert_array_equal(torch_result.label_map, reference)  # folded model.pt == fp32 ONNX
    assert sitk.GetArrayFromImage(written).shape == result.label_map.shape


def test_segment_cli_precision_flag_picks_the_onnx_file(int8_package, tmp_path, caplog):
    import logging

    import SimpleITK as sitk

    from mpcl.cli_segment import segment_main
    from tests.segment_helpers import phantom_volume, sitk_image

    out, _ = int8_package
    source = tmp_path / "case.nii.gz"
    sitk.WriteImage(sitk_image(phantom_volume()), str(source))
    for precision in ("int8", "fp32"):
        caplog.clear()
        target = tmp_path / f"seg_{precision}.nii.gz"
        with caplog.at_level(logging.INFO, logger="mpcl"):
            args = [str(source), "-o", str(target), "--model", str(out), "--precision", precision]
            assert segment_main([*args, "--device", "cpu", "--backend", "onnxruntime"]) == 0
        assert f"CPUExecutionProvider, {precision})" in caplog.text
        assert target.is_file()


def test_degraded_int8_artefact_is_refused_and_left_out(checkpoint, tmp_path, monkeypatch):
    """An int8 file whose weights were wiped must fail the Dice gate; the package is fp32 only, exit 1."""
    import onnx
    from onnx import numpy_helper

    from mpcl.export import quantize

    real = quantize.quantize_int8

    def degraded(fp32_path, int8_path, calibration, method="minmax", batch_size=8):
        real(fp32_path, int8_path, calibration, method, batch_size)
        model = onnx.load(str(int8_path))
        for initializer in model.graph.initializer:
            if initializer.data_type == onnx.TensorProto.INT8:  # quantised conv weights -> 0
                zeros = np.zeros_like(numpy_helper.to_array(initializer))
                initializer.CopyFrom(numpy_helper.from_array(zeros, initializer.name))
        onnx.save(model, str(int8_path))

    monkeypatch.setattr(quantize, "quantize_int8", degraded)
    out = tmp_path / "model"
    result = _export(checkpoint, "-o", out, "--int8", "--no-progress")
    assert result.exit_code == 1, result.output
    assert "onnx int8 refused and not written: it loses" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx", "model.pt"]
    assert "onnx_int8" not in load_model_package(out).files
    assert Segmenter.from_pretrained(out, device="cpu").backend.precision == "fp32"
    assert not _leftovers(tmp_path)


def test_onnx_parity_failure_writes_nothing(checkpoint, tmp_path, monkeypatch):
    import onnx
    from onnx import numpy_helper

    from mpcl.export import pipeline

    real = pipeline.optimize_onnx

    def drifted(source, target):
        real(source, target)
        model = onnx.load(str(target))
        weights = model.graph.initializer[0]
        weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights) * 1.01, weights.name))
        onnx.save(model, str(target))

    monkeypatch.setattr(pipeline, "optimize_onnx", drifted)
    result = _export(checkpoint, "-o", tmp_path / "model", "--onnx", "--int8", "--no-progress")
    assert result.exit_code == 2
    assert "the ONNX graph does not match torch" in result.output and "nothing was written" in result.output
    assert not (tmp_path / "model").exists() and not _leftovers(tmp_path)


def test_trt_without_tensorrt_is_one_sentence_and_exit_2(checkpoint, tmp_path):
    from mpcl.backends import module_available

    if module_available("tensorrt"):
        pytest.skip("TensorRT is installed here")
    result = _export(checkpoint, "-o", tmp_path / "model", "--trt")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [lines[0]] and "--trt needs TensorRT, which is not installed here" in lines[0]
    assert not (tmp_path / "model").exists()


def test_existing_package_needs_overwrite_and_a_package_can_be_the_source(int8_package, tmp_path):
    out, _ = int8_package
    before = (out / MODEL_JSON).read_text()
    result = _export(out / "model.pt", "-o", out)  # any source: the output check comes first
    assert result.exit_code == 2 and "already exists" in result.output
    assert (out / MODEL_JSON).read_text() == before
    again = _export(out, "-o", tmp_path / "again", "--onnx", "--no-progress")  # package folder as source
    assert again.exit_code == 0, again.output
    assert "batch-norm folding: max |logit diff| 0 " in again.output  # already folded: a no-op
    assert (
        load_model_package(tmp_path / "again").network["channels"]
        == load_model_package(out).network["channels"]
    )


def test_distillation_trains_a_compact_student_and_reports_retention(checkpoint, tmp_path):
    config = tmp_path / "distill.yaml"
    config.write_text(
        "model: {channels: [2, 4, 4, 8, 8]}\n"
        "train: {iterations: 4, labeled_batch: 2, unlabeled_batch: 2, val_every: 2, device: cpu}\n"
    )
    out = tmp_path / "student"
    result = _export(
        checkpoint, "-o", out, "--onnx", "--distill", config, "--max-dice-drop", 100, "--no-progress"
    )
    assert result.exit_code == 0, result.output
    assert "distilled student [2, 4, 4, 8, 8]" in result.output and "Dice retention" in result.output
    # without a progress bar, each validation still reports a line
    assert "distill iteration 2/4: loss" in result.output and "distill iteration 4/4" in result.output
    package = load_model_package(out)
    assert package.network["channels"] == [2, 4, 4, 8, 8] and package.has("onnx")
    distillation = json.loads((out / MODEL_JSON).read_text())["export"]["distillation"]
    assert distillation["dice_retention"] == pytest.approx(
        distillation["validation_dice"] / distillation["source_validation_dice"]
    )
    assert distillation["torch_eager_speedup"] > 0 and distillation["best_iteration"] in (2, 4)
    assert (tmp_path / "student.student.pt").is_file()
    run = tmp_path / "student.distill"  # the Trainer's run: logs, curves, checkpoints
    assert {"train_log.csv", "val_log.csv", "best.pt", "latest.pt"} <= {p.name for p in run.iterdir()}
    assert distillation["training_run"] == run.name
    assert Segmenter.from_pretrained(out, device="cpu").backend.name == auto_cpu_backend()


def test_refused_student_writes_no_package_but_keeps_its_checkpoint(checkpoint, tmp_path):
    config = tmp_path / "distill.yaml"
    config.write_text(
        "model: {channels: [2, 2, 2, 2, 2]}\n"
        "train: {iterations: 1, labeled_batch: 1, unlabeled_batch: 0, val_every: 1}\n"
    )
    out = tmp_path / "student"
    result = _export(checkpoint, "-o", out, "--distill", config, "--max-dice-drop", 0, "--no-progress")
    assert result.exit_code == 2
    assert "the distilled student loses" in result.output and "nothing was written" in result.output
    assert not out.exists() and (tmp_path / "student.student.pt").is_file()


def test_postprocessing_options_reach_model_json_and_a_source_package_keeps_its_own(checkpoint, tmp_path):
    out = tmp_path / "post"
    args = ["--largest-component", "all", "--fill-holes", "LV", "--fill-holes", "RV", "--no-progress"]
    result = _export(checkpoint, "-o", out, *args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / MODEL_JSON).read_text())
    assert data["postprocessing"] == {"largest_component": True, "fill_holes": ["LV", "RV"]}
    settings = load_model_package(out).postprocessing
    assert settings.largest_component == (1, 2, 3) and settings.fill_holes == (1, 3)
    assert _export(out, "-o", tmp_path / "kept", "--no-progress").exit_code == 0  # package source: kept
    assert load_model_package(tmp_path / "kept").postprocessing == settings
    cleared = _export(out, "-o", tmp_path / "cleared", "--largest-component", "none", "--no-progress")
    assert cleared.exit_code == 0, cleared.output
    assert not load_model_package(tmp_path / "cleared").postprocessing.enabled


def test_postprocessing_option_mistakes_are_one_sentence_and_write_nothing(checkpoint, tmp_path):
    typo = _export(checkpoint, "-o", tmp_path / "typo", "--fill-holes", "LVV", "--no-progress")
    assert typo.exit_code == 2 and "['LVV'] not among the model's foreground classes" in typo.output
    mixed = _export(
        checkpoint, "-o", tmp_path / "mixed", "--largest-component", "all", "--largest-component", "LV"
    )
    assert mixed.exit_code == 2 and "cannot be combined with other classes" in mixed.output
    assert not (tmp_path / "typo").exists() and not (tmp_path / "mixed").exists()
