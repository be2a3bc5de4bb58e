"""A ready GPU check: everything GPU-dependent in one call of at most 8 minutes, into one JSON.

Run it whenever a CUDA GPU is lent (and commit its JSON); on a machine without one every part is
skipped with its reason in the JSON and the script still exits 0. Parts, in order:

* ``training``: 3 CUDA training steps of every method (supervised, Mean Teacher, BCP, MPCL on BCP,
  PCCS, BARL; their shipped configs on a small phantom, from the middle of the recipe) in fp32 and bf16:
  losses finite, parameters and EMA teacher still float32, seconds per step, peak memory; and fp16 (the
  gradient scaler's path) for BCP and MPCL on BCP.
* ``resume``: BCP and MPCL-on-BCP, fp32 and bf16: 4 steps straight vs 2 + checkpoint + resume + 2
  (deterministic cuDNN/torch algorithms on): bit-identical weights expected.
* ``triton_kernels``: the compiled fused kernels (``mpcl.kernels``) against their numpy references
  (preprocessing; the head with 1 and 4 test-time flips, fp32/fp16/bf16 logits).
* ``segmenter``: the torch-CUDA Segmenter on a synthetic ACDC-like volume with fused kernels off and on:
  labels agree, ms per volume.
* ``onnxruntime_cuda``: the same package through ONNX Runtime's CUDA provider where the installed
  onnxruntime has it (this machine cannot install one: it has no network).
* ``paper_recipe``: seconds per step of the ``paper`` recipes (the shipped configs as they are: 256²,
  12 + 12 per step, phantom data) in fp32 and bf16, projected to 40 000 steps; BCP and MPCL-on-BCP
  first, the other methods while the budget lasts; then BCP and MPCL-on-BCP in the faster precision
  channels-last, and with ``train.compile`` (compiling seconds recorded apart), while the budget allows.

Each part records ``status`` (ok, failed, skipped) and, when skipped, ``reason``; a part that raises is
``failed`` with the error and the next part still runs. No new work starts once ``--budget-s`` is
spent (default 420 s: start-up and the JSON fit in the 8 minutes). Exit code 1 if a part failed.
``--rehearse`` runs the training, resume and paper parts on the CPU at tiny sizes, to check this script
where there is no GPU (its numbers mean nothing).

    python benchmarks/gpu_check.py                 # benchmarks/results/gpu_check_<gpu>.json
    python benchmarks/gpu_check.py --budget-s 300 --output /tmp/gpu_check.json
    python benchmarks/gpu_check.py --rehearse --output /tmp/rehearsal.json   # no GPU needed
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# deterministic cuBLAS for the resume part; read when CUDA initialises, so set before torch is imported
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

PARTS = ("training", "resume", "triton_kernels", "segmenter", "onnxruntime_cuda", "paper_recipe")
PROJECTED_STEPS = 40_000
TTA_FLIPS = ((), (-1,), (-2,), (-2, -1))
# the training and resume parts: the recipes' methods and networks on a small phantom, 4 + 4 per step
CHECK_OVERRIDES = {
    "data.kind": "phantom",
    "data.root": None,
    "data.labeled_patients": None,
    "data.patch_size": [64, 64],
    "data.phantom": {
        "seed": 3,
        "n_labeled": 2,
        "n_unlabeled": 4,
        "n_val": 1,
        "n_test": 1,
        "size": [80, 80],
        "slices_per_volume": 8,
    },
    "train.labeled_batch": 4,
    "train.unlabeled_batch": 4,
}
# the paper part: the recipes as shipped (patch, batch, network), phantom data at the recipe's size
PAPER_OVERRIDES = {
    "data.kind": "phantom",
    "data.root": None,
    "data.labeled_patients": None,
    "data.phantom": {
        "seed": 3,
        "n_labeled": 4,
        "n_unlabeled": 8,
        "n_val": 1,
        "n_test": 1,
        "size": [256, 256],
        "slices_per_volume": 8,
    },
}
PAPER_ORDER = ("bcp", "mpcl_bcp", "supervised", "mean_teacher", "pccs", "barl")
COMPILE_SECONDS = 120.0  # what torch.compile may add to a row's first steps


class Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def allows(self, needed: float) -> bool:
        return self.left() >= needed


class Context:
    """Where the parts run: ``cuda``, or ``cpu`` for ``--rehearse`` (the training parts on tiny sizes, to
    check this script itself without a GPU; its numbers mean nothing). (A plain class: the tests load this
    script as a module that is not in sys.modules, which dataclasses need.)"""

    def __init__(
        self,
        device: str,
        budget: Budget,
        data: Callable,
        packages: Callable,
        check_overrides: dict,
        paper_overrides: dict,
    ) -> None:
        self.device, self.budget, self.data, self.packages = device, budget, data, packages
        self.check_overrides, self.paper_overrides = check_overrides, paper_overrides

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def synchronize(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def reset_memory(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    @property
    def precisions(self) -> tuple[str, ...]:
        import torch

        return ("fp32", "bf16") if not self.cuda or torch.cuda.is_bf16_supported() else ("fp32",)

    def peak_memory_mib(self) -> float | None:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None


def skipped(reason: str, **details) -> dict:
    return {"status": "skipped", "reason": reason, **details}


def cuda_problem() -> str | None:
    """Why there is no CUDA GPU to check, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return (
            f"no CUDA GPU: torch {torch.__version__} sees none "
            f"(built with CUDA {torch.version.cuda or 'none: a CPU-only build'})"
        )
    return None


def _finite(values) -> bool:
    return all(math.isfinite(value) for value in values)


def _all_float32(*modules) -> bool:
    import torch

    return all(
        parameter.dtype == torch.float32
        for module in modules
        if module is not None
        for parameter in module.parameters()
    )


def _config(
    context: Context,
    name: str,
    precision: str,
    extra: dict,
    compile: bool = False,
    channels_last: bool = False,
):
    from train_speed import recipe_config

    return recipe_config(name, precision, channels_last, compile=compile, device=context.device, extra=extra)


# -- parts -------------------------------------------------------------------------------------------
def part_training(context: Context) -> dict:
    from train_speed import METHODS, time_trainer_steps

    from mpcl.training.trainer import Trainer

    rows = []
    fp16 = [(name, "fp16") for name in ("bcp", "mpcl_bcp")] if context.cuda else []  # the gradient scaler
    for name, precision in [(name, p) for name in METHODS for p in context.precisions] + fp16:
        if not context.budget.allows(20):
            rows.append({"method": name, "precision": precision, **skipped("budget spent")})
            continue
        config = _config(context, name, precision, context.check_overrides)
        context.reset_memory()
        trainer = Trainer(config, context.data(config.data))
        start = config.train.iterations // 2
        durations, losses, _ = time_trainer_steps(trainer, start, 1, 2)
        models = trainer.models
        rows.append(
            {
                "method": name,
                "precision": trainer.precision,
                "iterations": [start, start + 3],
                "losses": losses,
                "losses_finite": _finite(losses),
                "weights_float32": _all_float32(models.student, models.extra),
                "teacher_float32": _all_float32(models.teacher, models.teacher_extra),
                "median_s_per_step": statistics.median(durations),
                "peak_memory_mib": context.peak_memory_mib(),
                "grad_scale": trainer.scaler.get_scale() if trainer.scaler is not None else None,
            }
        )
        del trainer
    done = [row for row in rows if "losses" in row]
    good = all(row["losses_finite"] and row["weights_float32"] and row["teacher_float32"] for row in done)
    return {"status": "ok" if good else "failed", "rows": rows}


def _states(trainer) -> dict:
    models = trainer.models
    states = {"student": models.student.state_dict()}
    for name in ("teacher", "extra", "teacher_extra"):
        module = getattr(models, name)
        if module is not None:
            states[name] = module.state_dict()
    return states


def _max_difference(a: dict, b: dict) -> tuple[bool, float]:
    identical, largest = True, 0.0
    for part in a:
        for key, value in a[part].items():
            other = b[part][key]
            if not value.is_floating_point():
                identical &= bool((value == other).all())
                continue
            if not value.eq(other).all():
                identical = False
                largest = max(largest, float((value.float() - other.float()).abs().max()))
    return identical, largest


def part_resume(context: Context) -> dict:
    import torch

    from mpcl.training.trainer import Trainer

    rows = []
    deterministic = torch.are_deterministic_algorithms_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        for name in ("bcp", "mpcl_bcp"):
            for precision in context.precisions:
                if not context.budget.allows(30):
                    rows.append({"method": name, "precision": precision, **skipped("budget spent")})
                    continue
                configs = [_config(context, name, precision, context.check_overrides) for _ in range(2)]
                start = configs[0].train.iterations // 2
                context.reset_memory()
                straight = Trainer(configs[0], context.data(configs[0].data))
                for iteration in range(start, start + 4):
                    straight.train_step(iteration, straight.batches(iteration))
                interrupted = Trainer(configs[1], context.data(configs[1].data))
                for iteration in range(start, start + 2):
                    interrupted.train_step(iteration, interrupted.batches(iteration))
                checkpoint = interrupted.save("latest.pt", start + 2)
                resumed = Trainer(configs[1], context.data(configs[1].data))
                resumed.resume_from(checkpoint)
                for iteration in range(start + 2, start + 4):
                    resumed.train_step(iteration, resumed.batches(iteration))
                identical, largest = _max_difference(_states(straight), _states(resumed))
                rows.append(
                    {
                        "method": name,
                        "precision": precision,
                        "bit_identical": identical,
                        "max_abs_difference": largest,
                    }
                )
                del straight, interrupted, resumed
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    good = all(row.get("bit_identical", True) for row in rows)
    return {"status": "ok" if good else "failed", "deterministic_algorithms": True, "rows": rows}


def part_triton_kernels(context: Context) -> dict:
    try:
        import triton
    except ImportError:
        return skipped("triton is not installed (pip install 'mpcl[gpu]')")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return skipped("TRITON_INTERPRET=1 is set: the kernels would be interpreted, not compiled")
    import torch

    from mpcl.kernels.reference import head_reference, normalization_affine, preprocess_reference
    from mpcl.kernels.triton_head import flip_codes_tensor, fused_head
    from mpcl.kernels.triton_preprocess import affine_tensor, fused_preprocess

    rng = np.random.default_rng(0)
    raw = rng.normal(300.0, 80.0, (3, 50, 61)).astype(np.float32)
    affine = normalization_affine(raw, "minmax")
    patch = (32, 40)
    expected = preprocess_reference(raw, affine, patch)
    got = fused_preprocess(torch.from_numpy(raw).cuda(), affine_tensor(affine, "cuda"), patch)
    preprocess_diff = float(np.abs(got.cpu().numpy() - expected).max())
    heads = []
    for flips in (((),), TTA_FLIPS):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            logits = torch.from_numpy(rng.normal(0.0, 3.0, (2 * len(flips), 4, 24, 28)).astype(np.float32))
            logits = logits.to(dtype).cuda().contiguous()
            out_hw = (50, 61)
            reference = head_reference(logits.float().cpu().numpy(), flips, out_hw, True, True)
            labels, probabilities, entropy = fused_head(
                logits, flip_codes_tensor(flips, "cuda"), out_hw, probabilities=True, uncertainty=True
            )
            top2 = np.sort(reference.probabilities, axis=1)[:, -2:]
            clear = (top2[:, 1] - top2[:, 0]) > 1e-5
            heads.append(
                {
                    "flips": len(flips),
                    "logits": str(dtype).replace("torch.", ""),
                    "probabilities_max_abs_diff": float(
                        np.abs(probabilities.cpu().numpy() - reference.probabilities).max()
                    ),
                    "entropy_max_abs_diff": float(
                        np.abs(entropy.cpu().numpy() - reference.uncertainty).max()
                    ),
                    "labels_equal_where_clear": float(
                        (labels.cpu().numpy()[clear] == reference.labels[clear]).mean()
                    ),
                }
            )
    good = preprocess_diff < 1e-4 and all(
        row["probabilities_max_abs_diff"] < 1e-4
        and row["entropy_max_abs_diff"] < 1e-4
        and row["labels_equal_where_clear"] == 1.0
        for row in heads
    )
    return {
        "status": "ok" if good else "failed",
        "triton": triton.__version__,
        "tolerance": 1e-4,
        "preprocess_max_abs_diff": preprocess_diff,
        "head": heads,
    }


class PackageCache:
    """One randomly initialised full-size package for the Segmenter and ONNX Runtime parts."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.path = folder, None

    def __call__(self) -> Path:
        if self.path is None:
            from inference import make_default_package

            self.path = make_default_package(self.folder)
        return self.path


def _synthetic_volume() -> tuple[np.ndarray, tuple[float, float, float]]:
    rng = np.random.default_rng(0)
    _, y, x = np.ogrid[:1, :216, :256]
    body = ((y - 108) ** 2 + (x - 128) ** 2) < 75**2
    volume = np.where(body, 400.0, 50.0) + rng.normal(0, 20, (10, 216, 256))
    return volume.astype(np.float32), (1.0, 1.0, 10.0)


def _time_segmenter(segmenter, image, repeats: int = 3) -> tuple[float, np.ndarray]:
    import torch

    result = segmenter(image)  # warm-up (kernel compilation, cuDNN plans)
    seconds = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = segmenter(image)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), np.asarray(result.label_map)


def part_segmenter(context: Context) -> dict:
    from mpcl import Segmenter
    from mpcl.errors import ConfigError

    image = _synthetic_volume()
    rows: dict[str, dict] = {}
    labels = {}
    for mode in ("off", "on"):
        try:
            segmenter = Segmenter.from_pretrained(
                context.packages(), backend="torch", device="cuda", fused_kernels=mode
            )
        except ConfigError as error:
            rows[f"fused_{mode}"] = skipped(str(error))
            continue
        seconds, labels[mode] = _time_segmenter(segmenter, image)
        rows[f"fused_{mode}"] = {
            "status": "ok",
            "median_ms_per_volume": 1000 * seconds,
            "fused": segmenter.fused,
        }
    if len(labels) == 2:
        rows["fused_on"]["labels_equal_to_off"] = float((labels["on"] == labels["off"]).mean())
    good = (
        rows["fused_off"].get("status") == "ok"
        and rows.get("fused_on", {}).get("labels_equal_to_off", 1) > 0.999
    )
    return {"status": "ok" if good else "failed", "volume": list(image[0].shape), "rows": rows}


def part_onnxruntime_cuda(context: Context) -> dict:
    try:
        import onnxruntime
    except ImportError:
        return skipped("onnxruntime is not installed")
    providers = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return skipped(
            f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (providers: {providers}); "
            "onnxruntime-gpu would have it, and this machine cannot install packages",
        )
    from mpcl import Segmenter

    image = _synthetic_volume()
    torch_cuda = Segmenter.from_pretrained(
        context.packages(), backend="torch", device="cuda", fused_kernels="off"
    )
    ort_cuda = Segmenter.from_pretrained(context.packages(), backend="onnxruntime", device="cuda")
    torch_seconds, torch_labels = _time_segmenter(torch_cuda, image)
    ort_seconds, ort_labels = _time_segmenter(ort_cuda, image)
    agreement = float((torch_labels == ort_labels).mean())
    return {
        "status": "ok" if agreement > 0.999 else "failed",
        "onnxruntime": onnxruntime.__version__,
        "backend": f"{ort_cuda.backend.name} on {ort_cuda.backend.device}",
        "median_ms_per_volume": 1000 * ort_seconds,
        "torch_cuda_median_ms_per_volume": 1000 * torch_seconds,
        "labels_equal_to_torch_cuda": agreement,
    }


def part_paper_recipe(context: Context) -> dict:
    from train_speed import METHODS, time_trainer_steps

    from mpcl.training.trainer import Trainer

    rows, estimate = [], 60.0  # seconds a row may take before one has been measured
    eager = [(name, precision, False, False) for name in PAPER_ORDER for precision in context.precisions]
    # then, for the two recipes that matter most in the fastest precision, channels-last (whether
    # train.channels_last: auto should turn it on for GPUs too) and train.compile (compiling first)
    fastest = context.precisions[-1]
    variants = [(name, fastest, False, True) for name in PAPER_ORDER[:2]]
    variants += [(name, fastest, True, False) for name in PAPER_ORDER[:2]]
    for name, precision, compile, channels_last in eager + variants:
        needed = estimate + (COMPILE_SECONDS if compile else 0)
        if not context.budget.allows(needed):
            rows.append(
                {
                    "method": name,
                    "precision": precision,
                    "compiled": compile,
                    "layout": "channels_last" if channels_last else "nchw",
                    **skipped("budget spent"),
                }
            )
            continue
        started = time.monotonic()
        config = _config(context, name, precision, context.paper_overrides, compile, channels_last)
        context.reset_memory()
        trainer = Trainer(config, context.data(config.data))
        start = config.train.iterations // 2
        durations, losses, first_steps = time_trainer_steps(trainer, start, 2, 5)
        median = statistics.median(durations)
        rows.append(
            {
                "method": name,
                "config": METHODS[name],
                "precision": trainer.precision,
                "compiled": compile,
                "layout": "channels_last" if trainer.channels_last else "nchw",
                "first_steps_s": first_steps,
                "patch_size": list(config.data.patch_size),
                "batch": [config.train.labeled_batch, trainer.batches.sampler.unlabeled_batch],
                "iterations_timed": [start + 2, start + 7],
                "median_s_per_step": median,
                "min_s_per_step": min(durations),
                "losses_finite": _finite(losses),
                f"projected_hours_for_{PROJECTED_STEPS}_steps": median * PROJECTED_STEPS / 3600,
                "iterations_in_config": config.train.iterations,
            }
        )
        del trainer
        estimate = 1.5 * (time.monotonic() - started)
    return {"status": "ok", "data": "phantom at the recipe's size (timing only)", "rows": rows}


# -- driver ------------------------------------------------------------------------------------------
def run_part(name: str, function: Callable[[], dict], budget: Budget) -> dict:
    if budget.left() <= 0:
        return skipped("budget spent before this part")
    started = time.monotonic()
    try:
        result = function()
    except Exception as error:  # one part failing must not lose the others
        result = {
            "status": "failed",
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc().splitlines()[-8:],
        }
    result["seconds"] = round(time.monotonic() - started, 2)
    print(
        f"{name}: {result['status']}{' (' + result['reason'] + ')' if 'reason' in result else ''}", flush=True
    )
    return result


def machine() -> dict:
    from machine import cpu_description

    record: dict[str, object] = {"platform": platform.platform(), "python": platform.python_version()}
    record.update(cpu_description())
    try:
        import torch

        record["torch"] = torch.__version__
        record["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(0)
            record["gpu"] = properties.name
            record["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
            record["bf16_supported"] = torch.cuda.is_bf16_supported()
    except ImportError:
        record["torch"] = None
    return record


REHEARSAL_SKIPS = {  # what --rehearse cannot run on a CPU
    "triton_kernels": "rehearsal on the CPU: the compiled kernels need CUDA (tests/test_kernels.py runs "
    "them under Triton's interpreter)",
    "segmenter": "rehearsal on the CPU: the torch-CUDA Segmenter needs CUDA",
    "onnxruntime_cuda": "rehearsal on the CPU: the CUDA provider needs CUDA",
}


def check(parts: tuple[str, ...], budget_s: float, note: str = "", rehearse: bool = False) -> dict:
    """Run the asked ``parts`` within ``budget_s`` seconds; a report with one entry per part."""
    from train_speed import SMOKE_OVERRIDES, SMOKE_PATCH, DataCache

    budget = Budget(budget_s)
    problem = None if rehearse else cuda_problem()
    tiny = {**SMOKE_OVERRIDES, "data.patch_size": [SMOKE_PATCH, SMOKE_PATCH]}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mpcl-gpu-check-") as folder:
        context = Context(
            "cpu" if rehearse else "cuda",
            budget,
            DataCache(),
            PackageCache(Path(folder)),
            tiny if rehearse else CHECK_OVERRIDES,
            tiny if rehearse else PAPER_OVERRIDES,
        )
        functions = {
            "training": part_training,
            "resume": part_resume,
            "triton_kernels": part_triton_kernels,
            "segmenter": part_segmenter,
            "onnxruntime_cuda": part_onnxruntime_cuda,
            "paper_recipe": part_paper_recipe,
        }
        for name in PARTS:
            reason = REHEARSAL_SKIPS.get(name) if rehearse else problem
            if name not in parts:
                results[name] = skipped("not asked for (--parts)")
            elif reason is not None:
                results[name] = skipped(reason)
                print(f"{name}: skipped ({reason})")
            else:
                results[name] = run_part(name, lambda function=functions[name]: function(context), budget)
    statuses = [result["status"] for result in results.values()]
    return {
        "machine": machine(),
        "rehearsal": rehearse,
        "budget_s": budget_s,
        "elapsed_s": round(time.monotonic() - budget.started, 2),
        "note": note,
        "ok": "failed" not in statuses,
        "parts": results,
    }


def default_output(report: dict) -> Path:
    gpu = report["machine"].get("gpu")
    slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_") if gpu else "no_gpu"
    return RESULTS / f"gpu_check_{'rehearsal_' if report['rehearsal'] else ''}{slug}.json"


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new work after this")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--output", type=Path, help="default: benchmarks/results/gpu_check_<gpu>.json")
    parser.add_argument("--note", default="", help="free text stored in the JSON")
    parser.add_argument(
        "--rehearse",
        action="store_true",
        help="run the training parts on the CPU at tiny sizes (checks this script; numbers mean nothing)",
    )
    args = parser.parse_args(argv)
    report = check(tuple(args.parts), args.budget_s, args.note, args.rehearse)
    output = args.output or default_output(report)
    from mpcl.io import write_atomically

    output.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2) + "\n"
    write_atomically(output, lambda temporary: temporary.write_text(text))
    print(f"written {output}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
