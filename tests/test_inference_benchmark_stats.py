"""The paired Dice-change statistics that benchmarks/inference.py reports against torch eager."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.benchmark_helpers import load_benchmark


def _inference_benchmark():
    return load_benchmark("inference")


def test_paired_change_is_the_mean_per_volume_difference_with_its_standard_error():
    paired = _inference_benchmark().paired_change_points
    baseline = [0.60, 0.70, 0.80, 0.50]
    row = [0.58, 0.71, 0.77, 0.49]  # changes -2, +1, -3, -1 points
    mean, error = paired(row, baseline)
    assert mean == pytest.approx(-1.25)
    assert error == pytest.approx(np.std([-2, 1, -3, -1], ddof=1) / 2)


def test_a_constant_shift_has_no_paired_error_and_undefined_volumes_are_left_out():
    paired = _inference_benchmark().paired_change_points
    mean, error = paired([0.5, 0.6, float("nan"), 0.7], [0.4, 0.5, 0.9, 0.6])
    assert mean == pytest.approx(10.0) and error == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(paired([0.5], [0.4])[1])


def test_rows_that_cannot_run_say_why(package_dir, tmp_path, monkeypatch):
    """A bf16 row needs export's kept bf16 check; a row needs its files and its runtime."""
    import json
    import shutil

    import mpcl.backends.openvino_backend as openvino_backend

    skip_reason = _inference_benchmark().skip_reason
    package = shutil.copytree(package_dir, tmp_path / "model")
    missing = skip_reason(package, "onnxruntime", ("onnx", "onnx_int8"), "auto")
    assert missing == "the package has no onnx_int8"
    installed = openvino_backend.module_available("openvino")
    fp32 = skip_reason(package, "openvino", ("onnx", "torch"), "fp32")
    bf16 = skip_reason(package, "openvino", ("onnx", "torch"), "bf16")
    if installed:
        assert fp32 is None and "did not check" in bf16
    else:
        assert "not installed" in fp32 and "not installed" in bf16
    data = json.loads((package / "model.json").read_text())
    data["files"]["onnx"][openvino_backend.BF16_RECORD] = {"kept": True}
    (package / "model.json").write_text(json.dumps(data))
    monkeypatch.setattr(openvino_backend, "bf16_unavailable", lambda: None)
    reason = skip_reason(package, "openvino", ("onnx", "torch"), "bf16")
    assert reason is None if installed else "openvino is not installed" in reason


def test_repeated_runs_are_appended_to_the_one_file_of_their_setting(tmp_path):
    """Repeats go into one results file (numbered runs), not a file per repeat; the write is atomic."""
    import json

    append_run = load_benchmark("machine").append_run
    output = tmp_path / "results" / "inference_cpu_example.json"
    append_run({"results": {"torch/acdc": {"median_s": 0.1}}}, output, "inference")
    append_run({"results": {"torch/acdc": {"median_s": 0.2}}}, output, "inference", tag="after the change")
    assert [path.name for path in output.parent.iterdir()] == [output.name]  # no temporary left behind
    data = json.loads(output.read_text())
    assert data["benchmark"] == "inference" and data["setting"] == "inference_cpu_example"
    assert [run["repeat"] for run in data["runs"]] == [1, 2]
    assert [run["results"]["torch/acdc"]["median_s"] for run in data["runs"]] == [0.1, 0.2]
    assert "tag" not in data["runs"][0] and data["runs"][1]["tag"] == "after the change"


def test_a_single_report_from_before_becomes_the_first_run(tmp_path):
    import json

    append_run = load_benchmark("machine").append_run
    output = tmp_path / "ort_profile_cpu.json"
    output.write_text(json.dumps({"latency_s": {"median": 0.282}}))
    append_run({"latency_s": {"median": 0.273}}, output, "ort_profile")
    runs = json.loads(output.read_text())["runs"]
    assert runs == [
        {"repeat": 1, "latency_s": {"median": 0.282}},
        {"repeat": 2, "latency_s": {"median": 0.273}},
    ]
