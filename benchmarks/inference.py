"""Inference latency, peak memory and test Dice of deployment variants, one Segmenter per row.

Rows (``--rows``): ``torch`` (eager, model.pt), ``ort_fp32`` and ``ort_int8`` (ONNX Runtime on the
package's fp32 / int8 graph), ``ov_fp32``, ``ov_int8`` and ``ov_bf16`` (OpenVINO on the fp32 graph in
f32, on the int8 graph, on the fp32 graph in bf16) and, given ``--student-package`` (from ``mpcl-export
--distill``), the same as ``student_fp32``, ``student_int8``, ``student_ov_fp32``, ``student_ov_int8`` and
``student_ov_bf16``. Each row sees a view of its package holding
only the files it may use, so ``Segmenter``'s own backend choice is what is measured; the OpenVINO rows
name their precision, and a bf16 row runs only where ``mpcl-export --bf16`` kept bf16 for that package
(a row that cannot run is listed as skipped, with the reason). Cases: ACDC test volumes (h5 converted to
NIfTI; ~10 slices of 256x216) and a synthetic CT-sized volume (512x512x100, int16). Each (row, case set)
runs in its own child process, so its peak RSS is its own. Latency is end to end from the file on disk
to the label array (read, normalise, resize to the patch, network, softmax, resize back, argmax),
median over repeats after one warm-up; writing the .nii.gz is timed separately. The "network floor" is
the backend alone on the already-resized slices. With labels available, each row also segments the first
``--dice-cases`` ACDC test volumes (all 40 by default) and reports mean foreground Dice (training's
metric code). The table gives every row's speed-up over torch eager and Dice change against it (the
mean per-volume change, with its paired standard error: how much of a change 40 volumes can resolve);
the goal is a row at least 4x faster with at most 1 Dice point lost. Usage:

    mpcl-export runs/x/best.pt -o runs/x/model_int8 --onnx --int8 --bf16
    mpcl-export runs/x/best.pt -o runs/x/student --onnx --int8 --bf16 --distill configs/distill/small.yaml
    python benchmarks/inference.py --package runs/x/model_int8 --student-package runs/x/student
    python benchmarks/inference.py --quick --package runs/x/model_int8   # a smoke run in a minute

Each run is appended to ``--output`` (default benchmarks/results/inference_cpu.json) with its repeat number:
name the file after the setting and run it again to repeat it (``--tag`` labels a run).

Without --package/--checkpoint a randomly initialised SSL4MIS U-Net (4 classes, 256x256 patch, fp32
and torch rows only) is used: latency does not depend on the weights, Dice is then meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import append_run, machine_record  # noqa: E402  (benchmarks/ is not a package)

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

    from mpcl.export.pipeline import write_model_package
    from mpcl.nn.checkpoint import build_metadata, save_checkpoint
    from mpcl.nn.unet import UNet

    config = {"data": {"patch_size": [256, 256]}, "model": {"channels": [16, 32, 64, 128, 256]}}
    metadata = build_metadata(config, ["background", "RV", "myocardium", "LV"], {"scheme": "minmax"}, "none")
    torch.manual_seed(0)
    state = {"iteration": 0, "student": UNet(1, 4).state_dict(), "metadata": metadata, "config": config}
    checkpoint = save_checkpoint(folder / "random.pt", state)
    write_model_package(checkpoint, folder / "model", overwrite=True)
    return folder / "model"


# row -> (which package, backend, package file roles the row may use, precision); "auto" rows measure
# Segmenter's own choice among the files of their view
ROWS = {
    "torch": ("main", "torch", ("torch",), "auto"),
    "ort_fp32": ("main", "onnxruntime", ("onnx", "torch"), "auto"),
    "ort_int8": ("main", "onnxruntime", ("onnx", "onnx_int8", "torch"), "auto"),
    "ov_fp32": ("main", "openvino", ("onnx", "torch"), "fp32"),
    "ov_int8": ("main", "openvino", ("onnx", "onnx_int8", "torch"), "int8"),
    "ov_bf16": ("main", "openvino", ("onnx", "torch"), "bf16"),
    "student_fp32": ("student", "onnxruntime", ("onnx", "torch"), "auto"),
    "student_int8": ("student", "onnxruntime", ("onnx", "onnx_int8", "torch"), "auto"),
    "student_ov_fp32": ("student", "openvino", ("onnx", "torch"), "fp32"),
    "student_ov_int8": ("student", "openvino", ("onnx", "onnx_int8", "torch"), "int8"),
    "student_ov_bf16": ("student", "openvino", ("onnx", "torch"), "bf16"),
}

GOAL_SPEEDUP, GOAL_MAX_DICE_DROP_POINTS = 4.0, 1.0


def skip_reason(package: Path, backend: str, roles: tuple[str, ...], precision: str) -> str | None:
    """Why a row cannot run on ``package`` (a file missing, its runtime absent, bf16 not checked), or None."""
    from mpcl.backends import module_available

    data = json.loads((package / "model.json").read_text())
    if not set(roles) <= set(data["files"]):
        return f"the package has no {', '.join(sorted(set(roles) - set(data['files'])))}"
    if backend == "openvino" and not module_available("openvino"):
        from mpcl.backends.openvino_backend import NOT_INSTALLED

        return NOT_INSTALLED
    if precision == "bf16":
        from mpcl.backends.openvino_backend import bf16_checked, bf16_unavailable
        from mpcl.model_package import load_model_package

        if not bf16_checked(load_model_package(package)):
            return "mpcl-export --bf16 did not check (or refused) bf16 for this package"
        return bf16_unavailable()
    return None


def package_view(package: Path, roles: tuple[str, ...], folder: Path) -> Path:
    """A package folder listing only ``roles`` (files linked, not copied)."""
    data = json.loads((package / "model.json").read_text())
    folder.mkdir(parents=True)
    data["files"] = {role: data["files"][role] for role in roles}
    for entry in data["files"].values():
        (folder / entry["path"]).symlink_to((package / entry["path"]).resolve())
    (folder / "model.json").write_text(json.dumps(data, indent=2))
    return folder


def make_cases(
    folder: Path, data_root: Path, acdc_cases: int, ct_slices: int, ct_size: int, dice_cases: int = 0
) -> tuple[dict, list[tuple[str, str]]]:
    """Latency cases per kind, and (image, label) NIfTI pairs of the first ``dice_cases`` test volumes."""
    from mpcl.io import ImageGeometry, write_image

    cases: dict[str, list[str]] = {"acdc": [], "ct": []}
    labelled: list[tuple[str, str]] = []
    test_list = data_root / "test.list"
    if test_list.is_file() and max(acdc_cases, dice_cases) > 0:
        import h5py

        for index, name in enumerate(test_list.read_text().split()[: max(acdc_cases, dice_cases)]):
            with h5py.File(data_root / "data" / f"{name}.h5", "r") as handle:
                image = np.asarray(handle["image"][()], np.float32)
                label = np.asarray(handle["label"][()], np.uint8)
            image_path = str(write_image(image, ImageGeometry(), folder / f"{name}.nii.gz"))
            if index < acdc_cases:
                cases["acdc"].append(image_path)
            if index < dice_cases:
                label_path = write_image(label, ImageGeometry(), folder / f"{name}_label.nii.gz")
                labelled.append((image_path, str(label_path)))
    if ct_slices > 0:
        rng = np.random.default_rng(0)
        _, y, x = np.ogrid[:1, :ct_size, :ct_size]
        body = ((y - ct_size / 2) ** 2 + (x - ct_size / 2) ** 2) < (0.4 * ct_size) ** 2
        ct = np.where(body, 40, -1000) + rng.normal(0, 20, (ct_slices, ct_size, ct_size))
        geometry = ImageGeometry(spacing=(0.7, 0.7, 2.5))
        cases["ct"].append(str(write_image(ct.astype(np.int16), geometry, folder / "ct_512.nii.gz")))
    return cases, labelled


def test_dice(segmenter, labelled: list[tuple[str, str]]) -> dict:
    """Mean foreground Dice of ``segmenter`` over (image, label) files, per the training evaluation."""
    from mpcl.inputs import load_input
    from mpcl.training.metrics import multiclass_metrics, summarize

    per_case = []
    for image_path, label_path in labelled:
        label = load_input(label_path).array.astype(np.uint8)
        prediction = segmenter(image_path).label_map
        per_case.append(multiclass_metrics(prediction, label, segmenter.package.num_classes))
    summary = summarize(per_case, segmenter.package.class_names)
    per_volume = [float(np.nanmean([case[c]["dice"] for c in case])) for case in per_case]
    return {
        "volumes": len(per_case),
        "mean_dice": summary["mean"]["dice"]["mean"],
        "per_volume_dice": per_volume,  # foreground mean per volume, for paired comparisons between rows
        "summary": summary,
    }


def paired_change_points(row: list[float], baseline: list[float]) -> tuple[float, float]:
    """Mean and standard error (points) of the per-volume Dice change ``row - baseline``: the same
    volumes go through both, so the paired standard error says how much of a change is noise."""
    change = 100 * (np.asarray(row, dtype=np.float64) - np.asarray(baseline, dtype=np.float64))
    change = change[~np.isnan(change)]  # a volume with no defined class in either row says nothing
    error = float(change.std(ddof=1) / np.sqrt(len(change))) if len(change) > 1 else float("nan")
    return float(change.mean()), error


def worker(spec: dict) -> dict:
    """Runs in a child process: one backend, one set of cases."""
    from mpcl import Segmenter
    from mpcl.inputs import load_input
    from mpcl.preprocessing import normalize_intensity, resize_2d, through_plane_axis

    started = time.perf_counter()
    segmenter = Segmenter.from_pretrained(
        spec["package"],
        spec["backend"],
        "cpu",
        threads=spec["threads"],
        batch_size=spec["batch_size"],
        precision=spec.get("precision", "auto"),
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
    peak = _rss_mib()  # before the Dice pass, which holds more volumes than a latency run
    dice = test_dice(segmenter, spec["labelled"]) if spec.get("labelled") else None
    return {
        "row": spec.get("row", spec["backend"]),
        "backend": segmenter.backend.name,
        "describe": segmenter.backend.describe(),
        "dice_test": dice,
        "model_load_s": load_seconds,
        "rss_after_model_load_mib": rss_after_load,
        "peak_rss_mib": peak,
        "cases": rows,
    }


def _run_worker(spec: dict) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, cwd=REPO
    )
    if result.returncode != 0:
        raise RuntimeError(f"worker {spec.get('row', spec['backend'])} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _summary(rows: list[dict]) -> dict:
    keys = ("median_s", "network_floor_median_s", "write_nii_gz_median_s")
    summary = {key: statistics.median(row[key] for row in rows) for key in keys}
    summary["stages_median_s"] = {
        stage: statistics.median(row["stages_median_s"][stage] for row in rows) for stage in STAGES
    }
    return summary


def _package_for_rows(args, scratch: Path) -> Path:
    if args.package:
        return args.package
    if args.checkpoint:  # the deployment package as mpcl-export writes it, with its checks
        from mpcl.export.pipeline import ExportOptions, export_package

        options = ExportOptions(onnx=True, int8=True, threads=args.threads, progress=False)
        report = export_package(
            args.checkpoint, scratch / "model", options, data_root=str(args.data_root), echo=print
        )
        return report.package.root
    return make_default_package(scratch)


def _table(report_rows: dict) -> list[str]:
    """One line per (row, cases): latency, speed-up and Dice change against torch eager, the goal."""
    lines = [
        f"{'row/cases':20} {'median s':>9} {'floor s':>8} {'speed-up':>8} {'peak MiB':>9} "
        f"{'test Dice':>9} {'dDice pts':>9} {'± s.e.':>6}  "
        f"goal (>= {GOAL_SPEEDUP:g}x, <= {GOAL_MAX_DICE_DROP_POINTS:g} pt)"
    ]
    dice = {key.split("/")[0]: v["dice_test"] for key, v in report_rows.items() if v["dice_test"]}
    for key, outcome in report_rows.items():
        row, kind = key.split("/")
        summary = outcome["summary"]
        baseline = report_rows.get(f"torch/{kind}")
        speedup = baseline["summary"]["median_s"] / summary["median_s"] if baseline else float("nan")
        row_dice = dice[row]["mean_dice"] if row in dice else float("nan")
        change, error = float("nan"), float("nan")
        if row in dice and "torch" in dice:
            change, error = paired_change_points(
                dice[row]["per_volume_dice"], dice["torch"]["per_volume_dice"]
            )
        goal = "yes" if speedup >= GOAL_SPEEDUP and -change <= GOAL_MAX_DICE_DROP_POINTS else "no"
        outcome["speedup_vs_torch"], outcome["dice_change_points_vs_torch"] = speedup, change
        outcome["dice_change_standard_error_points"] = error
        lines.append(
            f"{key:20} {summary['median_s']:9.3f} {summary['network_floor_median_s']:8.3f} {speedup:7.2f}x "
            f"{outcome['peak_rss_mib']:9.0f} {row_dice:9.4f} {change:+9.2f} {error:6.2f}  {goal}"
        )
    return lines


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--package", type=Path, help="a model package (mpcl-export --onnx --int8)")
    parser.add_argument("--checkpoint", type=Path, help="a training checkpoint to export (int8) first")
    parser.add_argument("--student-package", type=Path, help="a package from mpcl-export --distill")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "acdc")
    parser.add_argument("--acdc-cases", type=int, default=4, help="first N volumes of test.list (latency)")
    parser.add_argument("--dice-cases", type=int, default=40, help="first N test volumes for Dice (0: none)")
    parser.add_argument("--ct-slices", type=int, default=100)
    parser.add_argument("--ct-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    parser.add_argument("--quick", action="store_true", help="2 ACDC volumes, 1 repeat, no CT: a smoke run")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS / "inference_cpu.json",
        help="the setting's results file; each run is appended to it",
    )
    parser.add_argument(
        "--tag", default="", help="a label for this run, stored with it (e.g. 'after the resize change')"
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.acdc_cases, args.dice_cases, args.repeats, args.ct_slices = 2, 2, 1, 0
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        parser.error(f"unknown row(s) {sorted(unknown)}; choose from {list(ROWS)}")

    with tempfile.TemporaryDirectory(prefix="mpcl-inference-") as scratch:
        scratch = Path(scratch)
        packages = {"main": _package_for_rows(args, scratch), "student": args.student_package}
        cases, labelled = make_cases(
            scratch, args.data_root, args.acdc_cases, args.ct_slices, args.ct_size, args.dice_cases
        )
        report_rows, skipped = {}, {}
        for row in args.rows.split(","):
            which, backend, roles, precision = ROWS[row]
            if packages[which] is None:
                skipped[row] = f"no {which} package"
                continue
            reason = skip_reason(packages[which], backend, roles, precision)
            if reason is not None:
                skipped[row] = reason
                continue
            view = package_view(packages[which], roles, scratch / "views" / row)
            for kind, paths in cases.items():
                if not paths:
                    continue
                spec = {
                    "row": row,
                    "package": str(view),
                    "backend": backend,
                    "precision": precision,
                    "cases": paths,
                    "labelled": labelled if kind == "acdc" else [],
                    "repeats": args.repeats,
                    "threads": args.threads,
                    "batch_size": args.batch_size,
                }
                outcome = _run_worker(spec)
                outcome["summary"] = _summary(outcome["cases"])
                report_rows[f"{row}/{kind}"] = outcome
                print(f"done {row}/{kind} ({outcome['describe']})", file=sys.stderr, flush=True)

    for line in _table(report_rows):
        print(line)
    for row, reason in skipped.items():
        print(f"skipped {row}: {reason}")
    report = {
        "machine": machine_record(args.threads, args.note, with_torch=True),
        "settings": {
            "repeats": args.repeats,
            "batch_size": args.batch_size,
            "model": "package " + str(args.package)
            if args.package
            else str(args.checkpoint or "random U-Net"),
            "student_package": str(args.student_package) if args.student_package else None,
            "acdc_cases": args.acdc_cases,
            "dice_cases": len(labelled),
            "ct_shape_zyx": [args.ct_slices, args.ct_size, args.ct_size],
            "goal": {"speedup_vs_torch": GOAL_SPEEDUP, "max_dice_drop_points": GOAL_MAX_DICE_DROP_POINTS},
        },
        "results": report_rows,
        "skipped": skipped,
    }
    append_run(report, args.output, "inference", args.tag)


if __name__ == "__main__":
    main()
