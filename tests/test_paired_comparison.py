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
