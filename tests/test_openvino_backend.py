"""The OpenVINO backend: precision choice, parity with ONNX Runtime, and the export's bf16 check."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from mpcl import Segmenter
from mpcl.backends import openvino_backend
from mpcl.backends.openvino_backend import BF16_RECORD, openvino_precision
from mpcl.errors import InputError, ModelPackageError
from mpcl.model_package import MODEL_JSON, load_model_package, sha256_of


def _with_onnx_info(folder, **info):
    data = json.loads((folder / MODEL_JSON).read_text())
    data["files"]["onnx"].update(info)
    (folder / MODEL_JSON).write_text(json.dumps(data))
    return load_model_package(folder)


@pytest.fixture
def package_copy(package_dir, tmp_path):
    return shutil.copytree(package_dir, tmp_path / "model")


@pytest.mark.slow
def test_auto_precision_needs_a_passed_bf16_check_and_a_bf16_cpu(package_copy):
    plain = load_model_package(package_copy)
    assert openvino_precision(plain, "auto", bf16_native=True) == "fp32"  # never checked
    refused = _with_onnx_info(package_copy, **{BF16_RECORD: {"kept": False, "why": "it loses 3 points"}})
    assert openvino_precision(refused, "auto", bf16_native=True) == "fp32"
    checked = _with_onnx_info(package_copy, **{BF16_RECORD: {"kept": True}})
    assert openvino_precision(checked, "auto", bf16_native=True) == "bf16"
    assert openvino_precision(checked, "auto", bf16_native=False) == "fp32"
    assert openvino_precision(checked, "fp32", bf16_native=True) == "fp32"


def test_explicit_precisions_are_refused_with_the_reason(package_copy):
    package = load_model_package(package_copy)
    with pytest.raises(ModelPackageError, match="native bf16"):
        openvino_precision(package, "bf16", bf16_native=False)
    with pytest.raises(ModelPackageError, match="no onnx_int8 file for int8"):
        openvino_precision(package, "int8", bf16_native=True)
    with pytest.raises(ModelPackageError, match="unknown OpenVINO precision 'fp64'"):
        openvino_precision(package, "fp64", bf16_native=True)
    with pytest.raises(ModelPackageError, match="OpenVINO backend only"):
        Segmenter.from_pretrained(package_copy, backend="onnxruntime", precision="bf16")


def test_openvino_is_cpu_only_and_optional(package_dir, monkeypatch):
    package = load_model_package(package_dir)
    assert "CPU only" in openvino_backend.unavailable_reason(package, "cuda")
    monkeypatch.setattr(openvino_backend, "module_available", lambda name: False)
    assert "pip install 'mpcl[openvino]'" in openvino_backend.unavailable_reason(package, "cpu")
    assert "not installed" in openvino_backend.bf16_unavailable()


def test_fp32_logits_match_onnxruntime(package_dir):
    pytest.importorskip("openvino", reason="the optional extra mpcl[openvino] is not installed")
    batch = np.random.default_rng(0).normal(size=(5, 1, 32, 32)).astype(np.float32)
    openvino = Segmenter.from_pretrained(package_dir, backend="openvino", device="cpu", precision="fp32")
    onnxruntime = Segmenter.from_pretrained(package_dir, "onnxruntime", "cpu", precision="fp32")
    assert openvino.backend.describe().endswith("CPU, fp32")
    expected = onnxruntime.backend.run(batch)
    np.testing.assert_allclose(openvino.backend.run(batch), expected, atol=1e-4 * np.abs(expected).max())
    odd = openvino.backend.run(batch[:3])  # a second batch size on the same compiled model
    np.testing.assert_allclose(odd, expected[:3], atol=1e-4 * np.abs(expected).max())


def test_a_corrupt_onnx_file_gets_one_sentence_naming_it(package_copy, capfd):
    """A hand-made package whose ONNX file (checksum recorded) is not ONNX: the error names the file and
    says it cannot be parsed, and no other framework's parser prints to the terminal on the way."""
    pytest.importorskip("openvino", reason="the optional extra mpcl[openvino] is not installed")
    onnx_path = load_model_package(package_copy).path_of("onnx")
    onnx_path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    data = json.loads((package_copy / MODEL_JSON).read_text())
    data["files"]["onnx"]["sha256"] = sha256_of(onnx_path)
    (package_copy / MODEL_JSON).write_text(json.dumps(data))
    package = load_model_package(package_copy)
    capfd.readouterr()
    with pytest.raises(ModelPackageError) as info:
        openvino_backend.OpenVinoBackend(package, "cpu", 1, "fp32")
    message = str(info.value)
    assert str(onnx_path) in message and "pars" in message.lower(), message  # "Model can't be parsed"
    assert "\n" not in message and "Exception from" not in message, message
    assert "tensorflow" not in capfd.readouterr().err.lower()


def test_bf16_run_stays_close_to_fp32(package_dir):
    pytest.importorskip("openvino", reason="the optional extra mpcl[openvino] is not installed")
    if not openvino_backend.cpu_has_bf16():
        pytest.skip("this CPU has no native bf16 arithmetic, so OpenVINO cannot run bf16 here")
    batch = np.random.default_rng(1).normal(size=(4, 1, 32, 32)).astype(np.float32)
    package = load_model_package(package_dir)
    fp32 = openvino_backend.OpenVinoBackend(package, precision="fp32").run(batch)
    bf16 = openvino_backend.OpenVinoBackend(package, precision="bf16").run(batch)
    scale = np.abs(fp32).max()
    assert 0 < np.abs(bf16 - fp32).max() <= 5e-2 * scale  # really bf16 (not equal), and close
    assert (bf16.argmax(1) == fp32.argmax(1)).mean() >= 0.98


# -- mpcl-export --bf16 ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.export_helpers import train_tiny_checkpoint

    return train_tiny_checkpoint(tmp_path_factory.mktemp("trained"))


def _export(*args):
    from mpcl.export.cli import export_main

    return CliRunner().invoke(export_main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow
def test_export_bf16_records_its_check_and_auto_then_runs_bf16(checkpoint, tmp_path):
    pytest.importorskip("openvino", reason="the optional extra mpcl[openvino] is not installed")
    if not openvino_backend.cpu_has_bf16():
        pytest.skip("this CPU has no native bf16 arithmetic, so the bf16 check cannot run here")
    out = tmp_path / "model"
    result = _export(checkpoint, "-o", out, "--bf16", "--max-dice-drop", 25, "--threads", 1, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "openvino bf16: validation Dice" in result.output and "openvino bf16: kept" in result.output
    data = json.loads((out / MODEL_JSON).read_text())
    verdict = data["files"]["onnx"][BF16_RECORD]
    assert verdict["kept"] is True and verdict["dice"]["dice_drop_points"] <= 25
    assert verdict["parity"]["label_agreement"] >= 0.99 and verdict["cpu"] and verdict["openvino"]
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx", "model.pt"]  # no new file
    segmenter = Segmenter.from_pretrained(out, backend="openvino", device="cpu")
    assert segmenter.backend.precision == "bf16"


@pytest.mark.slow
def test_export_bf16_that_fails_its_check_is_recorded_as_not_kept(checkpoint, tmp_path, monkeypatch):
    """A bf16 run whose logits are wrong: the package is written, the verdict says why, exit code 1."""

    class WrongLogits:
        name, device = "openvino", "cpu"

        def __init__(self, package, *args, **kwargs):
            self.num_classes = package.num_classes

        def run(self, batch):
            return np.zeros((batch.shape[0], self.num_classes, *batch.shape[2:]), np.float32)

        def describe(self):
            return "fake"

    monkeypatch.setattr(openvino_backend, "bf16_unavailable", lambda: None)
    monkeypatch.setattr(openvino_backend, "OpenVinoBackend", WrongLogits)
    out = tmp_path / "model"
    result = _export(checkpoint, "-o", out, "--bf16", "--threads", 1, "--no-progress")
    assert result.exit_code == 1, result.output
    assert "openvino bf16 refused: its logits differ from torch" in result.output
    verdict = json.loads((out / MODEL_JSON).read_text())["files"]["onnx"][BF16_RECORD]
    assert verdict["kept"] is False and "logits differ" in verdict["why"]
    assert openvino_precision(load_model_package(out), "auto", bf16_native=True) == "fp32"


@pytest.mark.slow
def test_export_bf16_without_openvino_stops_before_writing(checkpoint, tmp_path, monkeypatch):
    from mpcl.export.pipeline import ExportOptions, export_package

    monkeypatch.setattr(openvino_backend, "bf16_unavailable", lambda: "openvino is not installed (test)")
    with pytest.raises(InputError, match="--bf16: openvino is not installed"):
        export_package(checkpoint, tmp_path / "model", ExportOptions(bf16=True, progress=False))
    assert not (tmp_path / "model").exists()


# -- mpcl-segment ------------------------------------------------------------------------------------------
def test_cli_runs_openvino_and_refuses_bf16_elsewhere(package_dir, tmp_path, capsys):
    from mpcl.cli_segment import segment_main
    from mpcl.io import write_image
    from tests.segment_helpers import GEOMETRY, phantom_volume

    pytest.importorskip("openvino", reason="the optional extra mpcl[openvino] is not installed")
    scan = write_image(phantom_volume(), GEOMETRY, tmp_path / "scan.nii.gz")
    out = tmp_path / "seg.nii.gz"
    args = [str(scan), "-o", str(out), "--model", str(package_dir), "--device", "cpu"]
    assert segment_main([*args, "--backend", "openvino", "--precision", "fp32"]) == 0
    assert capsys.readouterr().out.strip().endswith("s, openvino)")
    expected = Segmenter.from_pretrained(package_dir, "onnxruntime", "cpu", precision="fp32")(scan).label_map
    written = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), expected)
    assert written.GetSpacing() == sitk.ReadImage(str(scan)).GetSpacing()
    refused = tmp_path / "refused.nii.gz"
    args[2] = str(refused)
    assert segment_main([*args, "--backend", "onnxruntime", "--precision", "bf16"]) == 2
    assert "bf16 runs on the OpenVINO backend only" in capsys.readouterr().err
    assert not refused.exists()
