"""ONNX Runtime fp32 latency of the distillation students' U-Net widths on this CPU, before training one.

A student's speed does not follow its FLOPs: ONNX Runtime's convolutions run far below peak on few
channels (measured rates: docs/benchmarks.md), so cutting widths buys less time than it cuts work. This
times randomly initialised, batch-norm-folded students (latency does not depend on the weights) exported
the way ``mpcl-export`` exports them, on a batch of slices at the patch size, so a student config can be
chosen for the machine it will run on.

    python benchmarks/student_widths.py                        # the teacher and every configs/distill/*.yaml
    python benchmarks/student_widths.py --widths 8,8,16,32,64 --patch 128 --batch 9

Run it on an otherwise idle machine; it prints a table and appends the run to the setting's JSON
(``--output``, default benchmarks/results/student_widths_cpu.json; ``--tag`` labels a run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import append_run, machine_record  # noqa: E402  (benchmarks/ is not a package)
from ort_profile import conv_flops, time_call  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TEACHER_WIDTHS = [16, 32, 64, 128, 256]


def shipped_widths() -> dict[tuple[int, ...], list[str]]:
    """The teacher's widths and each shipped distillation config's, with the names that use them."""
    from mpcl.export.distill import load_distill_config

    widths: dict[tuple[int, ...], list[str]] = {tuple(TEACHER_WIDTHS): ["teacher"]}
    for path in sorted((REPO / "configs" / "distill").glob("*.yaml")):
        widths.setdefault(tuple(load_distill_config(path).model.channels), []).append(path.name)
    return widths


def time_student(widths: list[int], batch: np.ndarray, threads: int, repeats: int, scratch: Path) -> dict:
    """Median and min latency of one student's fp32 graph on ``batch``, with its convolution FLOPs."""
    import onnxruntime

    from mpcl.backends.onnxruntime_backend import session_options
    from mpcl.export.onnx_export import export_onnx
    from mpcl.nn.folding import fold_batch_norm
    from mpcl.nn.unet import UNet

    network = fold_batch_norm(UNet(1, 4, widths, [0.0] * len(widths)))
    path = scratch / ("student_" + "_".join(map(str, widths)) + ".onnx")
    export_onnx(network, path, 1, batch.shape[2:])
    session = onnxruntime.InferenceSession(
        str(path), session_options(threads), providers=["CPUExecutionProvider"]
    )
    feed = {session.get_inputs()[0].name: batch}
    for _ in range(3):
        session.run(None, feed)
    seconds = [time_call(lambda: session.run(None, feed)) for _ in range(repeats)]
    gflop = sum(conv_flops(path, *batch.shape[:1], *batch.shape[2:]).values()) / 1e9
    median = statistics.median(seconds)
    return {
        "widths": widths,
        "median_ms": 1e3 * median,
        "min_ms": 1e3 * min(seconds),
        "conv_gflop": gflop,
        "gflops_achieved": gflop / median,
        "parameters": sum(p.numel() for p in network.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--widths", action="append", default=[], help="extra widths to time, e.g. 8,8,16,32,64 (repeatable)"
    )
    parser.add_argument("--patch", type=int, default=128, help="slice size fed to the network")
    parser.add_argument("--batch", type=int, default=9, help="slices per run (an ACDC volume has ~10)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS / "student_widths_cpu.json",
        help="the setting's results file; each run is appended to it",
    )
    parser.add_argument(
        "--tag", default="", help="a label for this run, stored with it (e.g. 'after the resize change')"
    )
    args = parser.parse_args()

    candidates = shipped_widths()
    for text in args.widths:
        candidates.setdefault(tuple(int(value) for value in text.split(",")), []).append("--widths")
    batch = np.random.default_rng(0).random((args.batch, 1, args.patch, args.patch), dtype=np.float32)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mpcl-student-widths-") as scratch:
        for widths, names in candidates.items():
            timed = time_student(list(widths), batch, args.threads, args.repeats, Path(scratch))
            rows.append(row := {"used_by": names, **timed})
            print(
                f"{str(list(widths)):24} {row['median_ms']:7.2f} ms  {row['conv_gflop']:6.2f} GFLOP  "
                f"{row['gflops_achieved']:6.1f} GFLOP/s  {', '.join(names)}",
                flush=True,
            )

    report = {
        "machine": machine_record(args.threads, args.note),
        "settings": {"batch": args.batch, "patch": args.patch, "repeats": args.repeats},
        "students": rows,
    }
    append_run(report, args.output, "student_widths", args.tag)


if __name__ == "__main__":
    main()
