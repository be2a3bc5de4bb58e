"""The training-speed benchmark and the GPU check, run at tiny sizes on the CPU (their numbers are not
looked at: only that the scripts run and write the JSON they promise)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.benchmark_helpers import load_benchmark

METHOD_ROWS = {"supervised", "mean_teacher", "bcp", "mpcl_bcp", "pccs", "barl"}


@pytest.mark.slow
def test_train_speed_smoke_appends_runs_to_one_file_per_setting(tmp_path):
    train_speed = load_benchmark("train_speed")
    assert train_speed.main(["--smoke", "--output-dir", str(tmp_path)]) == 0
    assert (
        train_speed.main(
            ["--smoke", "--output-dir", str(tmp_path), "--methods", "supervised", "--tag", "again"]
            + ["--precisions", "fp32", "--layouts", "nchw", "--compile", "on"]
        )
        == 0
    )
    assert [path.name for path in tmp_path.iterdir()] == ["train_speed_smoke_cpu_32.json"]
    record = json.loads((tmp_path / "train_speed_smoke_cpu_32.json").read_text())
    assert record["benchmark"] == "train_speed" and [run["repeat"] for run in record["runs"]] == [1, 2]
    first, second = record["runs"]
    assert second["tag"] == "again" and [row["method"] for row in second["rows"]] == ["supervised"]
    assert second["rows"][0]["compiled"] is True and second["rows"][0]["first_steps_s"] > 0
    machine = first["machine"]
    assert machine["processor"] and machine["device"] == "cpu" and "native_bf16" in machine
    assert set(machine["cpu_flags"]) >= {"avx512_bf16", "amx_bf16", "amx_tile"}
    rows = first["rows"]
    combinations = {(row["method"], row["precision"], row["layout"]) for row in rows}
    assert combinations == {
        (method, precision, layout)
        for method in METHOD_ROWS
        for precision in ("fp32", "bf16")
        for layout in ("nchw", "channels_last")
    }
    for row in rows:
        assert row["patch_size"] == [32, 32] and row["losses_finite"], row
        assert row["median_s_per_iteration"] > 0 and row["speedup_vs_fp32_nchw"] > 0
        assert row["iterations_timed"][0] > row["iterations_in_config"] // 2  # past pre-training and warm-ups
        assert row["projected_hours_for_budget"] > 0
    assert first["settings"]["smoke"] is True and first["settings"]["layouts"] == ["nchw", "channels_last"]
    assert first["settings"]["compile"] == ["off"] and not any(row["compiled"] for row in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the GPU check does without a GPU")
def test_gpu_check_without_a_gpu_skips_every_part_with_a_reason(tmp_path):
    gpu_check = load_benchmark("gpu_check")
    output = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--budget-s", "5", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["ok"] is True and report["rehearsal"] is False
    assert set(report["parts"]) == set(gpu_check.PARTS)
    for name, part in report["parts"].items():
        assert part["status"] == "skipped" and "no CUDA GPU" in part["reason"], name
    assert report["machine"]["processor"] and report["machine"]["torch"] == torch.__version__
    assert [path.name for path in tmp_path.iterdir()] == [
        "gpu_check.json"
    ]  # written atomically, no leftovers


@pytest.mark.slow
def test_gpu_check_rehearsal_runs_the_training_parts_on_the_cpu(tmp_path):
    gpu_check = load_benchmark("gpu_check")
    output = tmp_path / "rehearsal.json"
    arguments = ["--rehearse", "--parts", "resume", "paper_recipe", "triton_kernels", "--output", str(output)]
    assert gpu_check.main(arguments) == 0
    report = json.loads(output.read_text())
    parts = report["parts"]
    assert report["rehearsal"] is True and report["ok"] is True
    assert parts["training"] == {"status": "skipped", "reason": "not asked for (--parts)"}
    assert parts["triton_kernels"]["status"] == "skipped" and "CUDA" in parts["triton_kernels"]["reason"]
    resumed = parts["resume"]["rows"]
    assert {(row["method"], row["precision"]) for row in resumed} == {
        (method, precision) for method in ("bcp", "mpcl_bcp") for precision in ("fp32", "bf16")
    }
    assert all(row["bit_identical"] for row in resumed)
    paper = parts["paper_recipe"]["rows"]
    assert {row["method"] for row in paper} == METHOD_ROWS
    assert all(row["losses_finite"] and row["projected_hours_for_40000_steps"] > 0 for row in paper)
    compiled = [(row["method"], row["precision"]) for row in paper if row["compiled"]]
    assert compiled == [("bcp", "bf16"), ("mpcl_bcp", "bf16")]
    channels_last = [(row["method"], row["precision"]) for row in paper if row["layout"] == "channels_last"]
    assert channels_last == [("bcp", "bf16"), ("mpcl_bcp", "bf16")]
