"""Seconds per training step of every method × precision × memory layout × compile (the shipped recipes).

Rows: supervised, Mean Teacher, BCP, MPCL on BCP, PCCS and BARL (their shipped ACDC configs) × precision
(fp32, bf16; fp16 too on CUDA) × layout (NCHW, channels-last), at one patch size per call (128² is the
CPU budget, 256² the published one), and with ``--compile off on`` eager and ``torch.compile``d steps.
Each row builds the trainer with ``train.precision``, ``train.channels_last`` and ``train.compile`` set
and times its own step (batch building, forward, backward, SGD, EMA; no
validation) after a warm-up, from the middle of the recipe (``--start-iteration``, default half the
budget), where every method runs its full step: BCP and the methods on it are past their labelled-only
pre-training, the prototype methods past their warm-ups. Schedules depend on the iteration only, so the
step there costs what it costs in a real run. A compiled row's warm-up steps include its compiling (a
minute or more on a CPU); its untimed compile seconds are recorded as ``first_steps_s``.

One results file per setting (device and patch size),
``benchmarks/results/train_speed_<device>_<patch>.json``: each call appends one run to it
(``benchmarks/machine.py: append_run``, with the CPU model and its bf16 flags: AVX512_BF16 and AMX decide
whether bf16 is fast), repeats included: never a file per repeat.

    python benchmarks/train_speed.py --data-root ../shared/data/acdc --patch 128
    python benchmarks/train_speed.py --data-root ../shared/data/acdc --patch 256 --methods bcp mpcl_bcp
    python benchmarks/train_speed.py --smoke --output-dir /tmp/speed   # tiny phantom sizes: checks the script

Timings need an otherwise idle machine; ``--smoke`` numbers mean nothing.
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CONFIGS = REPO / "configs"
sys.path.insert(0, str(Path(__file__).resolve().parent))

# row name -> shipped config
METHODS = {
    "supervised": "acdc_supervised_3labeled.yaml",
    "mean_teacher": "acdc_mean_teacher_3labeled.yaml",
    "bcp": "acdc_bcp_3labeled.yaml",
    "mpcl_bcp": "acdc_mpcl_3labeled.yaml",
    "pccs": "acdc_pccs_3labeled.yaml",
    "barl": "acdc_barl_3labeled.yaml",
}
LAYOUTS = {"nchw": False, "channels_last": True}
COMPILE = {"off": False, "on": True}
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2")

# --smoke: the recipes' methods on a tiny phantom, so the script runs in seconds anywhere
SMOKE_PATCH = 32
SMOKE_OVERRIDES = {
    "data.kind": "phantom",
    "data.root": None,
    "data.labeled_patients": None,
    "data.phantom": {
        "seed": 3,
        "n_labeled": 2,
        "n_unlabeled": 2,
        "n_val": 1,
        "n_test": 1,
        "size": [48, 48],
        "slices_per_volume": 4,
    },
    "model.channels": [4, 8, 8, 16, 16],
    "train.labeled_batch": 2,
    "train.unlabeled_batch": 2,
}


def cpu_flags() -> dict[str, bool]:
    """The CPU features that decide bf16 speed (native bf16 dot products: AVX512_BF16, AMX)."""
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    return {flag: flag in flags for flag in BF16_FLAGS}


def machine_block(device: torch.device, note: str) -> dict:
    from machine import cpu_description

    record: dict[str, object] = {
        "platform": platform.platform(),
        **cpu_description(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "note": note,
    }
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
        record["cuda"] = torch.version.cuda
    return record


def recipe_config(
    name: str,
    precision: str,
    channels_last: bool,
    *,
    compile: bool = False,
    data_root: str | None = None,
    patch: int | None = None,
    device: str = "auto",
    smoke: bool = False,
    extra: dict | None = None,
):
    """The shipped config of method row ``name`` with the row's precision and layout (and, for
    ``smoke``, tiny phantom sizes); its output goes to a temporary folder."""
    from mpcl.training.config import load_config

    overrides: dict = {
        "train.precision": precision,
        "train.channels_last": channels_last,
        "train.compile": compile,
        "train.device": device,
    }
    if smoke:
        overrides.update(SMOKE_OVERRIDES)
        patch = patch or SMOKE_PATCH
    if data_root:
        overrides["data.root"] = data_root
    if patch:
        overrides["data.patch_size"] = [patch, patch]
    overrides.update(extra or {})
    config = load_config(CONFIGS / METHODS[name], overrides)
    config.output_dir = tempfile.mkdtemp(prefix="mpcl-speed-")
    return config


class DataCache:
    """Each dataset is loaded once for all rows (the rows' data sections are equal per call)."""

    def __init__(self) -> None:
        self._loaded: dict[str, object] = {}

    def __call__(self, data_config):
        from mpcl.training.data.loading import load_data

        key = repr(data_config)
        if key not in self._loaded:
            self._loaded[key] = load_data(data_config)
        return self._loaded[key]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_trainer_steps(
    trainer, start: int, warmup: int, steps: int
) -> tuple[list[float], list[float], float]:
    """Seconds of each timed step (after ``warmup`` untimed ones), every step's loss and the seconds of the
    untimed warm-up steps (compiling included)."""
    durations, losses, warmup_seconds = [], [], 0.0
    for iteration in range(start, start + warmup + steps):
        _synchronize(trainer.device)
        started = time.perf_counter()
        loss, _, _ = trainer.train_step(iteration, trainer.batches(iteration))
        _synchronize(trainer.device)
        if iteration >= start + warmup:
            durations.append(time.perf_counter() - started)
        else:
            warmup_seconds += time.perf_counter() - started
        losses.append(float(loss))
    return durations, losses, warmup_seconds


def time_row(name: str, config, data, start: int | None, warmup: int, steps: int) -> dict:
    from mpcl.training.trainer import Trainer

    trainer = Trainer(config, data)
    begin = config.train.iterations // 2 if start is None else start
    durations, losses, warmup_seconds = time_trainer_steps(trainer, begin, warmup, steps)
    median = statistics.median(durations)
    return {
        "method": name,
        "config": METHODS[name],
        "precision": trainer.precision,
        "layout": "channels_last" if trainer.channels_last else "nchw",
        "compiled": config.train.compile,
        "patch_size": list(config.data.patch_size),
        "batch": [config.train.labeled_batch, trainer.batches.sampler.unlabeled_batch],
        "iterations_timed": [begin + warmup, begin + warmup + steps],
        "steps_timed": steps,
        "s_per_iteration": durations,
        "median_s_per_iteration": median,
        "min_s_per_iteration": min(durations),
        "first_steps_s": warmup_seconds,
        "losses": losses,
        "losses_finite": all(math.isfinite(loss) for loss in losses),
        "iterations_in_config": config.train.iterations,
        "projected_hours_for_budget": median * config.train.iterations / 3600,
    }


def add_speedups(rows: list[dict]) -> None:
    """Each row's speed relative to its method's eager fp32 NCHW row (> 1: faster)."""
    base = {
        row["method"]: row["median_s_per_iteration"]
        for row in rows
        if row["precision"] == "fp32" and row["layout"] == "nchw" and not row["compiled"]
    }
    for row in rows:
        if row["method"] in base:
            row["speedup_vs_fp32_nchw"] = base[row["method"]] / row["median_s_per_iteration"]


def run(args) -> tuple[dict, Path]:
    from mpcl.training.trainer import select_device

    device = select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    precisions = args.precisions or (["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"])
    cache, rows = DataCache(), []
    for name in args.methods:
        for precision in precisions:
            for layout, compile in itertools.product(args.layouts, args.compile):
                config = recipe_config(
                    name,
                    precision,
                    LAYOUTS[layout],
                    compile=COMPILE[compile],
                    data_root=args.data_root,
                    patch=args.patch,
                    device=device.type,
                    smoke=args.smoke,
                )
                row = time_row(
                    name, config, cache(config.data), args.start_iteration, args.warmup, args.steps
                )
                rows.append(row)
                print(
                    f"{name:13} {precision:5} {layout:14} compile {compile:3} "
                    f"{row['median_s_per_iteration']:8.3f} s/it "
                    f"({row['projected_hours_for_budget']:.1f} h for {row['iterations_in_config']})",
                    flush=True,
                )
    add_speedups(rows)
    patch = rows[0]["patch_size"][0]
    report = {
        "machine": machine_block(device, args.note),
        "settings": {
            "smoke": args.smoke,
            "patch": patch,
            "precisions": precisions,
            "layouts": list(args.layouts),
            "compile": list(args.compile),
            "warmup": args.warmup,
            "steps": args.steps,
            "start_iteration": args.start_iteration
            if args.start_iteration is not None
            else "half the budget",
            "data": "phantom (tiny)" if args.smoke else f"acdc ({args.data_root})",
        },
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": rows,
    }
    setting = f"train_speed_{'smoke_' if args.smoke else ''}{device.type}_{patch}"
    return report, Path(args.output_dir) / f"{setting}.json"


def print_table(rows: list[dict]) -> None:
    header = f"{'method':13} {'precision':9} {'layout':14} {'compiled':8} {'median s/it':>12}"
    header += f" {'× eager fp32 NCHW':>18}"
    print(f"\n{header} {'budget h':>9}")
    for row in rows:
        speedup = row.get("speedup_vs_fp32_nchw")
        relative = "" if speedup is None else f"{speedup:.2f}"
        print(
            f"{row['method']:13} {row['precision']:9} {row['layout']:14} {str(row['compiled']):8} "
            f"{row['median_s_per_iteration']:12.3f} {relative:>18} {row['projected_hours_for_budget']:9.1f}"
        )


def parse_args(argv: list[str] | None = None):
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument(
        "--precisions", nargs="+", choices=["fp32", "bf16", "fp16"], help="default: all the device runs"
    )
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument(
        "--compile",
        nargs="+",
        choices=list(COMPILE),
        default=["off"],
        help="train.compile rows (default: off)",
    )
    parser.add_argument("--data-root", help="ACDC root (e.g. ../shared/data/acdc)")
    parser.add_argument(
        "--patch", type=int, help="patch size (default: the configs' 256; 128 is the CPU budget)"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--start-iteration", type=int, help="time steps from here (default: half the budget)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="stored with the run (e.g. 'idle machine')")
    parser.add_argument("--note", default="", help="free text stored in the machine block")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny phantom sizes, 1 + 1 steps: checks the script"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 1)
    return args


def main(argv: list[str] | None = None) -> int:
    from machine import append_run

    args = parse_args(argv)
    report, output = run(args)
    print_table(report["rows"])
    append_run(report, output, "train_speed", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
