"""Semi-supervised ACDC benchmark: train each (variant, labelled patients, seed) under one named budget,
evaluate the best-validation checkpoint on the 40 test volumes, and keep the results in one JSON + table.

Every run starts from a shipped config (``configs/acdc_*``), so the benchmark measures what users run.
A budget overrides patch size, batch and iteration count *for every variant alike* (a config that
trains on labelled slices only, as SSL4MIS's supervised baseline, gets the whole batch labelled);
schedule keys of the method (``consistency_start``, ``pretrain_iterations``, ``warmup_iterations``,
``rampup_iterations``, ``rampup_step``) are scaled by (budget iterations / config iterations), so e.g.
BCP keeps a quarter of its run for pre-training whatever the budget. Schedule keys a config leaves to
its protocol's default (e.g. Mean Teacher's 150-iteration ramp step) are filled in before scaling.

Each run is a child process (its own peak RSS, no state leaking between runs); finished runs are merged
into ``benchmarks/results/ssl_acdc_<budget>.json`` as they complete, so a long list survives an
interruption and re-running the same command skips what is done (``--force`` re-runs).

``--precision bf16`` (or fp16 on a GPU) trains every run with that ``train.precision`` into its own file,
``ssl_acdc_<budget>_<precision>.json``, whose table ends with each variant's paired difference against
the fp32 file's runs of the same seeds: the check that a faster precision does not cost accuracy.

    python benchmarks/ssl_acdc.py --budget cpu_quick --variants supervised mean_teacher bcp \\
        --seeds 1 --data-root ../shared/data/acdc
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_description  # noqa: E402  (benchmarks/ is not a package)
from paired_comparison import describe, paired_difference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# name -> (config, dotted overrides). The ablations switch one MPCL component off on the BCP base.
VARIANTS: dict[str, tuple[str, dict]] = {
    "supervised": ("configs/acdc_supervised_3labeled.yaml", {}),
    "mean_teacher": ("configs/acdc_mean_teacher_3labeled.yaml", {}),
    "bcp": ("configs/acdc_bcp_3labeled.yaml", {}),
    "mpcl_mt": ("configs/acdc_mpcl_mt_3labeled.yaml", {}),
    "mpcl_bcp": ("configs/acdc_mpcl_3labeled.yaml", {}),
    "mpcl_bcp_no_ihpg": ("configs/acdc_mpcl_3labeled.yaml", {"method.params.ihpg": False}),
    "mpcl_bcp_no_pso": ("configs/acdc_mpcl_3labeled.yaml", {"method.params.pso": False}),
    "mpcl_bcp_no_dka": ("configs/acdc_mpcl_3labeled.yaml", {"method.params.dka": False}),
    "barl_bcp": ("configs/acdc_barl_3labeled.yaml", {}),
    "pccs_bcp": (
        "configs/acdc_pccs_3labeled.yaml",
        {"method.params.sdm_levels": "bands"},
    ),  # tiny rings at 128²
}
# (A, B) pairs whose paired difference A − B the report states when both have runs with common seeds
COMPARISONS = [
    ("mpcl_bcp", "bcp"),
    ("bcp", "mean_teacher"),
    ("mean_teacher", "supervised"),
    ("mpcl_bcp_no_ihpg", "mpcl_bcp"),
    ("mpcl_bcp_no_pso", "mpcl_bcp"),
    ("mpcl_bcp_no_dka", "mpcl_bcp"),
    ("pccs_bcp", "bcp"),
    ("barl_bcp", "bcp"),
]

# Budgets: overrides applied to every variant. ``paper`` is the SSL4MIS protocol as configured (GPU).
BUDGETS: dict[str, dict] = {
    # spec a.4: 128², 8+8; 1500 iterations sized from Mean Teacher's 1.2 s/it measured alone on 2 cores,
    # about 30-50 minutes per run with validation (MPCL adds a teacher pass and the prototype terms).
    # NCHW (channels_last false) as the table's first rows ran, before channels-last became the CPU default.
    "cpu": {
        "patch": 128,
        "labeled_batch": 8,
        "unlabeled_batch": 8,
        "iterations": 1500,
        "val_every": 150,
        "channels_last": False,
    },
    # what a single 3-hour session on 2 cores can afford for the whole table (≈10 runs).
    "cpu_quick": {
        "patch": 128,
        "labeled_batch": 8,
        "unlabeled_batch": 8,
        "iterations": 600,
        "val_every": 60,
        "channels_last": False,
    },
    "paper": {},
    # checks the whole pipeline on real data in about a minute; its numbers mean nothing.
    "smoke": {"patch": 64, "labeled_batch": 2, "unlabeled_batch": 2, "iterations": 4, "val_every": 4},
}
SCHEDULE_KEYS = {
    "consistency_start",
    "pretrain_iterations",
    "warmup_iterations",
    "rampup_iterations",
    "rampup_step",
}


def _scale_schedule(params: dict, factor: float) -> dict:
    scaled = {}
    for key, value in params.items():
        if isinstance(value, dict):
            scaled[key] = _scale_schedule(value, factor)
        elif key in SCHEDULE_KEYS and isinstance(value, int):
            scaled[key] = max(1, round(value * factor)) if value > 0 else 0
        else:
            scaled[key] = value
    return scaled


def build_run_config(
    variant: str,
    budget: str,
    labeled: int,
    seed: int,
    data_root: str,
    output_dir: Path,
    threads: int | None = None,
    precision: str = "fp32",
):
    """The validated config of one benchmark run (``threads``: torch threads of the training process)."""
    import yaml

    from mpcl.training.config import config_from_dict
    from mpcl.training.protocol import apply_protocol

    config_path, overrides = VARIANTS[variant]
    data = yaml.safe_load((ROOT / config_path).read_text())
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    apply_protocol(data)  # so defaulted schedule keys are scaled too
    settings = BUDGETS[budget]
    data["experiment"] = f"{variant}_l{labeled}_s{seed}_{budget}"
    data["output_dir"] = str(output_dir)
    data["seed"] = seed
    data["data"].update({"root": data_root, "labeled_patients": labeled})
    if settings:
        factor = settings["iterations"] / data["train"]["iterations"]
        data["data"]["patch_size"] = [settings["patch"], settings["patch"]]
        labelled_only = data["train"].get("unlabeled_batch") == 0  # e.g. SSL4MIS's supervised baseline
        data["train"].update(
            iterations=settings["iterations"],
            labeled_batch=settings["labeled_batch"] + (settings["unlabeled_batch"] if labelled_only else 0),
            unlabeled_batch=0 if labelled_only else settings["unlabeled_batch"],
            val_every=settings["val_every"],
            checkpoint_every=settings["iterations"],
        )
        if "channels_last" in settings:
            data["train"]["channels_last"] = settings["channels_last"]
        data["method"]["params"] = _scale_schedule(data["method"].get("params") or {}, factor)
    if threads:
        data["train"]["num_threads"] = threads
    data["train"]["precision"] = precision
    return config_from_dict(data, f"{config_path} under budget {budget}")


def git_commit() -> str:
    """HEAD of the checkout the benchmark runs from, with ``+dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def config_hash(config: dict) -> str:
    """sha256 of the run's config without the keys that only say where files are (so two machines
    running the same recipe get the same hash); the first 16 hex digits."""
    recipe = json.loads(json.dumps(config))
    for key in ("experiment", "output_dir"):
        recipe.pop(key, None)
    recipe.get("data", {}).pop("root", None)
    recipe.get("train", {}).pop("num_threads", None)
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def provenance(config) -> dict:
    """What ties a result row to the code and recipe that produced it."""
    import torch

    from mpcl.training.protocol import describe_protocol

    plain = config.to_dict()
    return {
        "commit": git_commit(),
        "protocol": describe_protocol(plain),
        "config_hash": config_hash(plain),
        "torch": torch.__version__,
        "cpu": cpu_description(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
    }


def run_one(
    variant: str,
    budget: str,
    labeled: int,
    seed: int,
    data_root: str,
    runs_dir: Path,
    threads: int | None = None,
    precision: str = "fp32",
) -> dict:
    """Train and test one run in this process; returns its result record."""
    import logging

    import torch

    from mpcl.nn.checkpoint import load_checkpoint
    from mpcl.training.data.loading import load_data
    from mpcl.training.evaluate import evaluate_volumes
    from mpcl.training.trainer import Trainer, inference_model_from_checkpoint

    output_dir = runs_dir / setting_name(budget, precision) / f"{variant}_l{labeled}_s{seed}"
    config = build_run_config(variant, budget, labeled, seed, data_root, output_dir, threads, precision)
    output_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[logging.FileHandler(output_dir / "train.log"), logging.StreamHandler()],
        force=True,
    )
    data = load_data(config.data)
    started = time.perf_counter()
    trainer = Trainer(config, data)
    result = trainer.fit(progress=False)
    train_seconds = time.perf_counter() - started
    state = load_checkpoint(result.best_checkpoint)
    model = inference_model_from_checkpoint(state, config, data.num_classes)
    model.to(trainer.device)
    test_started = time.perf_counter()
    evaluation = evaluate_volumes(
        model,
        data.test_volumes,
        data.class_names,
        tuple(config.data.patch_size),
        trainer.device,
        resize=config.evaluation.resize,
        empty_prediction=config.evaluation.empty_prediction,
    )
    return {
        **provenance(config),
        "variant": variant,
        "method": config.method.name,
        "labeled_patients": labeled,
        "seed": seed,
        "precision": trainer.precision,
        "channels_last": trainer.channels_last,
        "iterations": config.train.iterations,
        "patch_size": list(config.data.patch_size),
        "batch": [config.train.labeled_batch, config.train.unlabeled_batch],
        "method_params": config.method.params,
        "best_val_mean_dice": result.best_val_dice,
        "best_iteration": result.best_iteration,
        "seconds_per_iteration": result.seconds_per_iteration,
        "train_wall_seconds": train_seconds,
        "test_seconds": time.perf_counter() - test_started,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": (torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
        "device": str(trainer.device),
        "test_volumes": len(data.test_volumes),
        "test": evaluation["summary"],
        "test_cases": evaluation["cases"],
    }


# -- aggregation and reporting -------------------------------------------------------------------
METRICS = ("dice", "jaccard", "hd95", "asd")


def _mean_sd(values: list[float | None]) -> str:
    values = [value for value in values if value is not None]  # HD95/ASD undefined for empty masks
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def markdown_table(report: dict) -> str:
    """One row per (variant, labelled): mean ± sd over seeds of the test metrics (Dice/Jaccard in %)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for run in report["runs"]:
        groups.setdefault((run["variant"], run["labeled_patients"]), []).append(run)
    class_names = [name for name in report["runs"][0]["test"] if name not in ("mean", "background")]
    header = ["variant", "labelled", "seeds", "mean Dice %", "Jaccard %", "HD95", "ASD", "empty"]
    header += [f"Dice {name} %" for name in class_names] + ["s/it", "train min"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = {name: index for index, name in enumerate(VARIANTS)}  # variants of older code sort last
    for (variant, labeled), runs in sorted(
        groups.items(), key=lambda item: (item[0][1], order.get(item[0][0], len(order)), item[0][0])
    ):
        scale = {"dice": 100, "jaccard": 100, "hd95": 1, "asd": 1}
        cells = [variant, str(labeled), ",".join(str(run["seed"]) for run in runs)]
        cells += [
            _mean_sd([_scaled(run["test"]["mean"][m]["mean"], scale[m]) for run in runs]) for m in METRICS
        ]
        cells.append(_mean_sd([_empty_predictions(run, class_names) for run in runs]))
        cells += [_mean_sd([run["test"][name]["dice"]["mean"] * 100 for run in runs]) for name in class_names]
        cells += [
            f"{statistics.median(run['seconds_per_iteration'] for run in runs):.2f}",
            f"{statistics.median(run['train_wall_seconds'] for run in runs) / 60:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _empty_predictions(run: dict, class_names: list[str]) -> float | None:
    """(volume, class) cases whose prediction was empty while the ground truth was not."""
    counts = [run["test"][name].get("n_empty_prediction") for name in class_names]
    return None if any(count is None for count in counts) else float(sum(counts))


def comparisons(report: dict) -> list[str]:
    """The paired differences of :data:`COMPARISONS` that the report's runs support, as sentences."""
    sentences = []
    for labeled in sorted({run["labeled_patients"] for run in report["runs"]}):
        runs = [run for run in report["runs"] if run["labeled_patients"] == labeled]
        for name_a, name_b in COMPARISONS:
            runs_a = [run for run in runs if run["variant"] == name_a]
            runs_b = [run for run in runs if run["variant"] == name_b]
            if not {run["seed"] for run in runs_a} & {run["seed"] for run in runs_b}:
                continue
            result = paired_difference(runs_a, runs_b)
            report.setdefault("comparisons", {})[f"{name_a}-{name_b}@{labeled}"] = result
            sentences.append(f"- {labeled} labelled: " + describe(name_a, name_b, result))
    return sentences


def setting_name(budget: str, precision: str) -> str:
    """The budget and, when not fp32, the precision: names the results file and the runs folder."""
    return budget if precision == "fp32" else f"{budget}_{precision}"


def results_path(results_dir: Path, budget: str, precision: str = "fp32") -> Path:
    """The one results file of a budget and precision."""
    return results_dir / f"ssl_acdc_{setting_name(budget, precision)}.json"


def precision_comparisons(report: dict, fp32_report: dict) -> list[str]:
    """Each variant of a low-precision report against the fp32 report's runs of the same seeds."""
    sentences = []
    precision = report["precision"]
    groups = sorted({(run["labeled_patients"], run["variant"]) for run in report["runs"]})
    for labeled, variant in groups:
        low, full = (
            [r for r in source["runs"] if (r["labeled_patients"], r["variant"]) == (labeled, variant)]
            for source in (report, fp32_report)
        )
        if not {run["seed"] for run in low} & {run["seed"] for run in full}:
            continue
        result = paired_difference(low, full)
        report.setdefault("against_fp32", {})[f"{variant}@{labeled}"] = result
        sentences.append(f"- {labeled} labelled: " + describe(f"{variant} {precision}", "fp32", result))
    return sentences


def _load_report(path: Path, budget: str, precision: str = "fp32") -> dict:
    if path.exists():
        return json.loads(path.read_text())
    report = {"budget": budget, "budget_settings": BUDGETS[budget], "runs": []}
    if precision != "fp32":
        report["precision"] = precision
    return report


def _write_report(report: dict, json_path: Path) -> None:
    """Write the JSON (atomically) and the Markdown table; each run carries its own machine."""
    order = {name: index for index, name in enumerate(VARIANTS)}
    report["runs"].sort(
        key=lambda run: (
            run["labeled_patients"],
            order.get(run["variant"], len(order)),
            run["variant"],
            run["seed"],
        )
    )
    sentences = comparisons(report)
    fp32_path = results_path(json_path.parent, report["budget"])
    precision_sentences = []
    if report.get("precision", "fp32") != "fp32" and fp32_path.exists():
        precision_sentences = precision_comparisons(report, json.loads(fp32_path.read_text()))
    temporary = json_path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(report, indent=1))
    temporary.replace(json_path)
    runs = report["runs"]
    commits = sorted({run.get("commit", "not recorded") for run in runs})
    protocols = sorted({json.dumps(run.get("protocol", "not recorded"), sort_keys=True) for run in runs})
    json_path.with_suffix(".md").write_text(
        f"# ACDC semi-supervised benchmark, budget `{report['budget']}`"
        + (f", precision {report['precision']}" if report.get("precision", "fp32") != "fp32" else "")
        + "\n\n"
        f"Budget settings: `{json.dumps(report['budget_settings'])}`. Test set: 40 volumes; metrics of "
        "the best-validation checkpoint; mean ± sd over seeds where several. HD95 and ASD are in voxels "
        "(the ACDC h5 files store no spacing). `empty`: (volume, class) cases predicted empty although "
        "the class is present; under `evaluation.empty_prediction: zero` (BCP's test script) each scores "
        "Dice, HD95 and ASD 0 and counts in the means. Commits: "
        + ", ".join(f"`{commit}`" for commit in commits)
        + "; protocols: "
        + ", ".join(f"`{protocol}`" for protocol in protocols)
        + ".\n\n"
        + markdown_table(report)
        + ("\n## Paired differences\n\n" + "\n".join(sentences) + "\n" if sentences else "")
        + (
            f"\n## Against fp32 (same seeds, `{fp32_path.name}`)\n\n" + "\n".join(precision_sentences) + "\n"
            if precision_sentences
            else ""
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["supervised"])
    parser.add_argument("--labeled", nargs="+", type=int, default=[3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "acdc"))
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "benchmark")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--force", action="store_true", help="re-run runs already in the results file")
    parser.add_argument("--table", action="store_true", help="only rewrite the table from the results file")
    parser.add_argument(
        "--threads", type=int, help="torch threads per training process (1 to run two benchmarks at once)"
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="train.precision of every run; not fp32: its own results file, compared with the fp32 one",
    )
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child-process mode
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        record = run_one(
            args.variants[0],
            args.budget,
            args.labeled[0],
            args.seeds[0],
            args.data_root,
            args.runs_dir,
            args.threads,
            args.precision,
        )
        args.result_file.write_text(json.dumps(record))
        return

    setting = setting_name(args.budget, args.precision)
    json_path = results_path(args.results_dir, args.budget, args.precision)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    report = _load_report(json_path, args.budget, args.precision)
    if args.table:
        _write_report(report, json_path)
        print(markdown_table(report))
        return
    for labeled in args.labeled:
        for variant in args.variants:
            for seed in args.seeds:
                key = (variant, labeled, seed)
                done = [r for r in report["runs"] if (r["variant"], r["labeled_patients"], r["seed"]) == key]
                if done and not args.force:
                    print(f"skip {key}: already in {json_path.name}", flush=True)
                    continue
                result_file = args.runs_dir / setting / f"{variant}_l{labeled}_s{seed}.result.json"
                result_file.parent.mkdir(parents=True, exist_ok=True)
                command = [
                    sys.executable, __file__, "--one", "--budget", args.budget, "--variants", variant,
                    "--labeled", str(labeled), "--seeds", str(seed), "--data-root", args.data_root,
                    "--runs-dir", str(args.runs_dir), "--result-file", str(result_file),
                    "--precision", args.precision,
                ] + (["--threads", str(args.threads)] if args.threads else [])  # fmt: skip
                print(f"run {key} under budget {args.budget} ...", flush=True)
                started = time.perf_counter()
                subprocess.run(command, check=True)
                record = json.loads(result_file.read_text())
                # another invocation may have added runs
                report = _load_report(json_path, args.budget, args.precision)
                report["runs"] = [
                    r for r in report["runs"] if (r["variant"], r["labeled_patients"], r["seed"]) != key
                ] + [record]
                _write_report(report, json_path)
                mean = record["test"]["mean"]
                print(
                    f"done {key} in {(time.perf_counter() - started) / 60:.1f} min: test mean Dice "
                    f"{_mean_sd([_scaled(mean['dice']['mean'], 100)])} %, "
                    f"HD95 {_mean_sd([mean['hd95']['mean']])} voxels",
                    flush=True,
                )
    if report["runs"]:
        print(markdown_table(report))
        print(f"written {json_path} and {json_path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
