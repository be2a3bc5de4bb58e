"""Seconds per training iteration of shipped configs on this machine (real data), as a table and JSON.

Each config is run for a few steps after warm-up with the trainer's own step (batch building, forward,
backward, SGD, EMA); validation is not included. Usage:

    python benchmarks/train_speed.py --data-root ../shared/data/acdc --steps 8 \
        configs/acdc_supervised_3labeled.yaml configs/acdc_mean_teacher_3labeled.yaml
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mpcl.training.config import load_config
from mpcl.training.data.loading import load_data
from mpcl.training.trainer import Trainer

RESULTS = Path(__file__).resolve().parent / "results"


def time_steps(
    config_path: Path, data_root: str | None, steps: int, warmup: int, patch: int | None, start: int = 0
) -> dict:
    overrides = {"data.root": data_root} if data_root else {}
    if patch:
        overrides["data.patch_size"] = [patch, patch]
    config = load_config(config_path, overrides)
    config.output_dir = tempfile.mkdtemp(prefix="mpcl-speed-")
    trainer = Trainer(config, load_data(config.data))
    durations = []
    for iteration in range(start, start + warmup + steps):
        started = time.perf_counter()
        trainer.train_step(iteration, trainer.batches(iteration))
        if iteration >= start + warmup:
            durations.append(time.perf_counter() - started)
    return {
        "config": config_path.name,
        "method": config.method.name,
        "patch_size": list(config.data.patch_size),
        "batch": [config.train.labeled_batch, trainer.batches.sampler.unlabeled_batch],
        "steps_timed": steps,
        # with the default start 0, BCP is in its labelled-only pre-training stage and MPCL in its
        # warm-up; --start-iteration times a later stage (schedules depend on the iteration only)
        "iterations_timed": [start + warmup, start + warmup + steps],
        "median_s_per_iteration": statistics.median(durations),
        "min_s_per_iteration": min(durations),
        "projected_hours_for_budget": statistics.median(durations) * config.train.iterations / 3600,
        "iterations_in_config": config.train.iterations,
    }


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--data-root")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--start-iteration", type=int, default=0, help="time steps from this iteration on")
    parser.add_argument("--patch", type=int, help="override the patch size (e.g. 128 for the cpu budget)")
    parser.add_argument("--output", type=Path, default=RESULTS / "train_speed_cpu.json")
    args = parser.parse_args()
    rows = [
        time_steps(path, args.data_root, args.steps, args.warmup, args.patch, args.start_iteration)
        for path in args.configs
    ]
    print(f"{'config':42} {'patch':>9} {'batch':>7} {'median s/it':>12} {'budget h':>9}")
    for row in rows:
        patch, batch = "x".join(map(str, row["patch_size"])), "+".join(map(str, row["batch"]))
        print(
            f"{row['config']:42} {patch:>9} {batch:>7} "
            f"{row['median_s_per_iteration']:12.3f} {row['projected_hours_for_budget']:9.1f}"
        )
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
