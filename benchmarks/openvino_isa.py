"""The OpenVINO backend's fp32 latency with its oneDNN kernels held to one instruction set (issue 5).

The issue's compute floor is stated for two AVX2 cores; the VMs these benchmarks run on may have
AVX-512. oneDNN reads ``ONEDNN_MAX_CPU_ISA`` once, when it is first loaded, so this runs in a process
of its own: it sets the variable before importing openvino, times the backend exactly as the Segmenter
builds it, and reports the kernels the convolutions really ran (so a limit the runtime ignored shows).
``ort_profile.py`` runs it for AVX2 and sets the latency against the AVX2 FMA floor of the same run.

    python benchmarks/openvino_isa.py --package DIR --batch BATCH.npy --isa AVX2 --threads 2

Prints one JSON object: median_s, min_s, isa, conv_kernels (OpenVINO's exec types of the convolutions).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--package", type=Path, required=True, help="a model package with an fp32 ONNX file")
    parser.add_argument("--batch", type=Path, required=True, help="a .npy batch (b, 1, h, w) at patch size")
    parser.add_argument("--isa", default="AVX2", help="oneDNN's ISA name: AVX2, AVX512_CORE, ...")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    os.environ["ONEDNN_MAX_CPU_ISA"] = args.isa  # before openvino (and its oneDNN) is loaded
    import numpy as np

    sys.path.insert(0, str(REPO))
    from ort_profile import openvino_profile, time_call  # benchmarks/ is this script's folder

    from mpcl.backends.openvino_backend import OpenVinoBackend
    from mpcl.model_package import load_model_package

    package = load_model_package(args.package)
    batch = np.load(args.batch)
    run = functools.partial(OpenVinoBackend(package, "cpu", args.threads, "fp32").run, batch)
    run()
    latencies = [time_call(run) for _ in range(args.repeats)]
    # one profiled run, only to read which kernels the convolutions ran with
    _, node_seconds = openvino_profile(package, batch, args.threads, 1)
    kernels = sorted({kernel for (_, op, kernel) in node_seconds if op.startswith("Convolution")})
    print(
        json.dumps(
            {
                "isa": args.isa,
                "median_s": statistics.median(latencies),
                "min_s": min(latencies),
                "conv_kernels": kernels,
            }
        )
    )


if __name__ == "__main__":
    main()
