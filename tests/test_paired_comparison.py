"""The paired comparison the ACDC table states: mean difference over seeds × volumes, bootstrap CI."""

import numpy as np
import pytest

from tests.benchmark_helpers import load_benchmark

paired = load_benchmark("paired_comparison")


def _run(seed: int, dice_by_volume: dict[str, float]) -> dict:
    cases = [
        {"name": name, "RV": {"dice": d}, "myocardium": {"dice": d}, "LV": {"dice": d}}
        for name, d in dice_by_volume.items()
    ]
    return {"seed": seed, "test_cases": cases}


def _volumes(rng, shift=0.0, n=40):
    return {f"v{i:02d}": float(np.clip(0.6 + 0.1 * rng.standard_normal() + shift, 0, 1)) for i in range(n)}


def test_a_clear_gain_has_an_interval_above_zero_and_equal_runs_give_zero():
    rng = np.random.default_rng(0)
    base = [_run(seed, _volumes(rng)) for seed in (1, 2, 3)]
    better = [
        _run(run["seed"], {c["name"]: c["RV"]["dice"] + 0.05 for c in run["test_cases"]}) for run in base
    ]
    result = paired.paired_difference(better, base, resamples=2000)
    assert result["mean_difference"] == pytest.approx(5.0)
    assert result["ci95"][0] == pytest.approx(5.0) and result["volumes_better"] == 40
    same = paired.paired_difference(base, base, resamples=500)
    assert same["mean_difference"] == 0 and same["ci95"] == [0.0, 0.0] and same["wilcoxon_p"] == 1.0
    assert "better" in paired.describe("a", "b", result)


def test_noise_between_seeds_widens_the_interval_across_zero():
    rng = np.random.default_rng(1)
    base = [_run(seed, _volumes(rng)) for seed in (1, 2, 3)]
    noisy = [_run(seed, _volumes(rng, shift=0.005)) for seed in (1, 2, 3)]  # unpaired noise, tiny shift
    result = paired.paired_difference(noisy, base, resamples=2000)
    low, high = result["ci95"]
    assert low < 0 < high and "not distinguishable" in paired.describe("a", "b", result)
    assert len(result["per_seed_difference"]) == 3 and result["volumes"] == 40


def test_only_common_seeds_and_volumes_are_paired():
    rng = np.random.default_rng(2)
    a = [_run(1, _volumes(rng)), _run(2, _volumes(rng))]
    b = [_run(2, _volumes(rng, n=30)), _run(3, _volumes(rng))]
    result = paired.paired_difference(a, b, resamples=100)
    assert result["seeds"] == [2] and result["volumes"] == 30
    with pytest.raises(ValueError, match="share no seed"):
        paired.paired_difference(a[:1], b[1:], resamples=10)


def test_a_bf16_acdc_table_is_its_own_file_compared_with_fp32_runs_of_the_same_seeds(tmp_path):
    ssl_acdc = load_benchmark("ssl_acdc")
    assert ssl_acdc.setting_name("cpu_quick", "fp32") == "cpu_quick"
    assert ssl_acdc.setting_name("cpu_quick", "bf16") == "cpu_quick_bf16"
    config = ssl_acdc.build_run_config(
        "bcp", "smoke", 3, 1, str(tmp_path), tmp_path / "run", precision="bf16"
    )
    assert config.train.precision == "bf16" and config.train.iterations == 4
    rng = np.random.default_rng(2)
    fp32_runs = [_run(seed, _volumes(rng)) | {"variant": "bcp", "labeled_patients": 3} for seed in (1, 2)]
    bf16_runs = [
        _run(run["seed"], {c["name"]: c["RV"]["dice"] - 0.01 for c in run["test_cases"]}) | {"variant": "bcp"}
        for run in fp32_runs[:1]  # seed 1 only
    ]
    extra = _run(1, _volumes(rng)) | {"variant": "pccs_bcp", "labeled_patients": 3}  # no fp32 run
    report = {"precision": "bf16", "runs": [run | {"labeled_patients": 3} for run in bf16_runs] + [extra]}
    sentences = ssl_acdc.precision_comparisons(report, {"runs": fp32_runs})
    assert len(sentences) == 1 and sentences[0].startswith("- 3 labelled: bcp bf16 − fp32: -1.00")
    assert report["against_fp32"]["bcp@3"]["seeds"] == [1]
