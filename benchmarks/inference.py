"""Inference latency and peak memory of the Segmenter: torch eager vs ONNX Runtime, in one run.

Cases: ACDC test volumes (h5 converted to NIfTI; ~10 slices of 256x216) and a synthetic CT-sized volume
(512x512x100, int16). Each (backend, case set) runs in its own child process, so its peak RSS is its own.
Latency is end to end from the file on disk to the label array (read, normalise, resize to the patch,
network, softmax, resize back, argmax), median over repeats after one warm-up; writing the .nii.gz is
timed separately. The "network floor" is the backend alone on the already-resized slices, i.e. the
compute that no pre/post-processing change can remove. Usage:

    python benchmarks/inference.py --data-root ../shared/data/acdc --repeats 5
    python benchmarks/inference.py --package runs/acdc_mean_teacher_3labeled/model   # a trained model

Without --package/--checkpoint a randomly initialised SSL4MIS U-Net (4 classes, 256x256 patch) is used:
latency does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
STAGES = ("read", "normalize", "resize_to_patch", "network", "softmax", "resize_back", "argmax_entropy")


def _rss_mib() -> float:
    """Peak resident memory of this process image (VmHWM; ru_maxrss would include the parent's at fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_default_package(folder: Path) -> Path:
    """A full-size, randomly initialised U-Net packaged exactly as training packages its models."""
    import torch

    from mpcl.training.checkpoint import build_metadata, save_checkpoint
    from mpcl.training.networks.unet import UNet
    from mpcl.training.package import write_model_package

    config = {"data": {"patch_size": [256, 256]}, "model": {"channels": [16, 32, 64, 128, 256]}}
    metadata = build_metadata(config, ["background", "RV", "myocardium", "LV"], {"scheme": "minmax"}, "none")
    torch.manual_seed(0)
    state = {"iteration": 0, "student": UNet(1, 4).state_dict(), "metadata": metadata, "config": config}
    checkpoint = save_checkpoint(folder / "random.pt", state)
    write_model_package(checkpoint, folder / "model", overwrite=True)
    return folder / "model"


def make_cases(folder: Path, data_root: Path, acdc_cases: int, ct_slices: int, ct_size: int) -> dict:
    from mpcl.io import ImageGeometry, write_image

    cases: dict[str, list[str]] = {"acdc": [], "ct": []}
    test_list = data_root / "test.list"
    if test_list.is_file() and acdc_cases > 0:
        import h5py

        for name in test_list.read_text().split()[:acdc_cases]:
            with h5py.File(data_root / "data" / f"{name}.h5", "r") as handle:
                image = np.asarray(handle["image"][()], np.float32)
            cases["acdc"].append(str(write_image(image, ImageGeometry(), folder / f"{name}.nii.gz")))
    if ct_slices > 0:
        rng = np.random.default_rng(0)
        _, y, x = np.ogrid[:1, :ct_size, :ct_size]
        body = ((y - ct_size / 2) ** 2 + (x - ct_size / 2) ** 2) < (0.4 * ct_size) ** 2
        ct = np.where(body, 40, -1000) + rng.normal(0, 20, (ct_slices, ct_size, ct_size))
        geometry = ImageGeometry(spacing=(0.7, 0.7, 2.5))
        cases["ct"].append(str(write_image(ct.astype(np.int16), geometry, folder / "ct_512.nii.gz")))
    return cases


def worker(spec: dict) -> dict:
    """Runs in a child process: one backend, one set of cases."""
    from mpcl import Segmenter
    from mpcl.inputs import load_input
    from mpcl.preprocessing import normalize_intensity, resize_2d, through_plane_axis

    started = time.perf_counter()
    segmenter = Segmenter.from_pretrained(
        spec["package"], spec["backend"], "cpu", threads=spec["threads"], batch_size=spec["batch_size"]
    )
    load_seconds = time.perf_counter() - started
    rss_after_load = _rss_mib()
    package = segmenter.package
    rows = []
    for path in spec["cases"]:
        segmenter(path)  # warm-up (first-call allocations, ORT arena)
        latencies, stages, writes = [], {stage: [] for stage in STAGES}, []
        for _ in range(spec["repeats"]):
            clock = time.perf_counter()
            result = segmenter(path)
            latencies.append(time.perf_counter() - clock)
            for stage in STAGES:
                stages[stage].append(result.timings.get(stage, 0.0))
            with tempfile.TemporaryDirectory() as out:
                clock = time.perf_counter()
                result.save(Path(out) / "seg.nii.gz")
                writes.append(time.perf_counter() - clock)
        loaded = load_input(path)
        axis = through_plane_axis(loaded.geometry.spacing)
        normalized = normalize_intensity(
            loaded.array, package.normalization_scheme, package.normalization_params
        )
        slices = np.moveaxis(normalized, axis, 0)
        floors = []
        for _ in range(spec["repeats"]):
            batches = [
                np.ascontiguousarray(
                    resize_2d(slices[i : i + spec["batch_size"]], package.patch_size)[:, None]
                )
                for i in range(0, slices.shape[0], spec["batch_size"])
            ]
            clock = time.perf_counter()
            for batch in batches:
                segmenter.backend.run(batch)
            floors.append(time.perf_counter() - clock)
        rows.append(
            {
                "case": Path(path).name,
                "shape_zyx": list(loaded.array.shape),
                "median_s": statistics.median(latencies),
                "min_s": min(latencies),
                "network_floor_median_s": statistics.median(floors),
                "write_nii_gz_median_s": statistics.median(writes),
                "stages_median_s": {stage: statistics.median(values) for stage, values in stages.items()},
            }
        )
    return {
        "backend": segmenter.backend.name,
        "describe": segmenter.backend.describe(),
        "model_load_s": load_seconds,
        "rss_after_model_load_mib": rss_after_load,
        "peak_rss_mib": _rss_mib(),
        "cases": rows,
    }


def _run_worker(spec: dict) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, cwd=REPO
    )
    if result.returncode != 0:
        raise RuntimeError(f"worker {spec['backend']} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _summary(rows: list[dict]) -> dict:
    keys = ("median_s", "network_floor_median_s", "write_nii_gz_median_s")
    summary = {key: statistics.median(row[key] for row in rows) for key in keys}
    summary["stages_median_s"] = {
        stage: statistics.median(row["stages_median_s"][stage] for row in rows) for stage in STAGES
    }
    return summary


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--package", type=Path, help="an existing model package")
    parser.add_argument("--checkpoint", type=Path, help="a training checkpoint to package first")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "acdc")
    parser.add_argument("--acdc-cases", type=int, default=4, help="first N volumes of test.list")
    parser.add_argument("--ct-slices", type=int, default=100)
    parser.add_argument("--ct-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--backends", default="onnxruntime,torch")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    parser.add_argument("--output", type=Path, default=RESULTS / "inference_cpu.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    with tempfile.TemporaryDirectory(prefix="mpcl-inference-") as scratch:
        scratch = Path(scratch)
        if args.package:
            package = args.package
        elif args.checkpoint:
            from mpcl.training.package import write_model_package

            package = write_model_package(args.checkpoint, scratch / "model").root
        else:
            package = make_default_package(scratch)
        cases = make_cases(scratch, args.data_root, args.acdc_cases, args.ct_slices, args.ct_size)
        report_rows = {}
        for backend in args.backends.split(","):
            for kind, paths in cases.items():
                if not paths:
                    continue
                spec = {
                    "package": str(package),
                    "backend": backend,
                    "cases": paths,
                    "repeats": args.repeats,
                    "threads": args.threads,
                    "batch_size": args.batch_size,
                }
                outcome = _run_worker(spec)
                outcome["summary"] = _summary(outcome["cases"])
                report_rows[f"{backend}/{kind}"] = outcome
                print(f"done {backend}/{kind}", file=sys.stderr, flush=True)

    header = f"{'backend/cases':24} {'median s':>9} {'floor s':>8} {'write s':>8} {'peak RSS MiB':>13}"
    print(header + "  stages (median s)")
    for key, outcome in report_rows.items():
        summary = outcome["summary"]
        stages = ", ".join(f"{k} {v:.3f}" for k, v in summary["stages_median_s"].items() if v >= 0.0005)
        print(
            f"{key:24} {summary['median_s']:9.3f} {summary['network_floor_median_s']:8.3f} "
            f"{summary['write_nii_gz_median_s']:8.3f} {outcome['peak_rss_mib']:13.0f}  {stages}"
        )
    import onnxruntime

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "onnxruntime": onnxruntime.__version__,
            "torch": torch_version,
            "note": args.note,
        },
        "settings": {
            "repeats": args.repeats,
            "batch_size": args.batch_size,
            "model": "package " + str(args.package)
            if args.package
            else str(args.checkpoint or "random U-Net"),
            "acdc_cases": args.acdc_cases,
            "ct_shape_zyx": [args.ct_slices, args.ct_size, args.ct_size],
        },
        "results": report_rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.output}")


if __name__ == "__main__":
    main()
