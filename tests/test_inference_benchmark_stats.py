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
