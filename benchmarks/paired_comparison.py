"""A method's gain over another on the same protocol, with its uncertainty over seeds and test volumes.

Both variants are trained with the same seeds and tested on the same volumes, so the comparison is
paired: D[s, v] = (per-volume mean Dice of A) − (that of B) for seed s and volume v. The estimate is the
mean of D; its 95 % interval is a two-level (hierarchical) bootstrap that resamples seeds and, within
them, volumes with replacement, so both sources of spread (training randomness and which scans are in
the test set) widen it. The Wilcoxon signed-rank test on the per-volume differences averaged over seeds
is reported beside it (volumes as the paired units, the SSL4MIS evaluation's unit).
"""

from __future__ import annotations

from typing import Any

import numpy as np

METRIC_SCALE = {"dice": 100.0, "jaccard": 100.0}


def per_volume(run: dict, metric: str = "dice") -> dict[str, float]:
    """Volume name -> the metric averaged over foreground classes, in points, from a result record."""
    scale = METRIC_SCALE.get(metric, 1.0)
    values = {}
    for case in run["test_cases"]:
        classes = [value for key, value in case.items() if key != "name" and isinstance(value, dict)]
        scores = [entry[metric] for entry in classes if entry.get(metric) is not None]
        values[case["name"]] = scale * float(np.mean(scores)) if scores else float("nan")
    return values


def paired_difference(
    runs_a: list[dict], runs_b: list[dict], metric: str = "dice", resamples: int = 10_000, seed: int = 0
) -> dict[str, Any]:
    """Mean paired difference A − B (points) over the seeds and volumes both have, with a 95 % interval."""
    by_seed_a = {run["seed"]: per_volume(run, metric) for run in runs_a}
    by_seed_b = {run["seed"]: per_volume(run, metric) for run in runs_b}
    seeds = sorted(set(by_seed_a) & set(by_seed_b))
    if not seeds:
        raise ValueError("the two variants share no seed")
    volumes = sorted(set.intersection(*(set(by_seed_a[s]) & set(by_seed_b[s]) for s in seeds)))
    differences = np.array([[by_seed_a[s][v] - by_seed_b[s][v] for v in volumes] for s in seeds])
    if np.isnan(differences).any():
        raise ValueError(f"{metric} is undefined for some volume; compare a metric defined everywhere")
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, len(seeds), (resamples, len(seeds)))
    volume_draws = rng.integers(0, len(volumes), (resamples, len(volumes)))
    boot = differences[seed_draws[:, :, None], volume_draws[:, None, :]].mean(axis=(1, 2))
    low, high = np.percentile(boot, [2.5, 97.5])
    per_volume_mean = differences.mean(axis=0)
    from scipy.stats import wilcoxon

    wilcoxon_p = float(wilcoxon(per_volume_mean).pvalue) if np.any(per_volume_mean != 0) else 1.0
    return {
        "metric": metric,
        "seeds": seeds,
        "volumes": len(volumes),
        "mean_difference": float(differences.mean()),
        "ci95": [float(low), float(high)],
        "per_seed_difference": [float(row.mean()) for row in differences],
        "volumes_better": int((per_volume_mean > 0).sum()),
        "wilcoxon_p": wilcoxon_p,
        "resamples": resamples,
    }


def describe(name_a: str, name_b: str, result: dict[str, Any]) -> str:
    """One sentence a reader can quote."""
    low, high = result["ci95"]
    verdict = "better" if low > 0 else "worse" if high < 0 else "not distinguishable"
    seeds = ", ".join(f"{value:+.2f}" for value in result["per_seed_difference"])
    return (
        f"{name_a} − {name_b}: {result['mean_difference']:+.2f} {result['metric']} points "
        f"(95 % CI {low:+.2f} to {high:+.2f}, hierarchical bootstrap over {len(result['seeds'])} seeds × "
        f"{result['volumes']} test volumes; per seed {seeds}; {name_a} better on {result['volumes_better']}"
        f"/{result['volumes']} volumes, Wilcoxon p = {result['wilcoxon_p']:.3g}): {verdict}."
    )
