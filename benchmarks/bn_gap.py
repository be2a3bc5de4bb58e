"""How much of a checkpoint's validation Dice depends on its batch-norm statistics: a diagnostic table.

A network evaluated in eval mode normalises with the running statistics gathered during training. If
those statistics do not describe the images it segments, Dice drops although the weights are fine. Three
rows per checkpoint, on the same volumes with training's evaluation code:

* ``running``: eval mode, as validation, ``mpcl-eval`` and the model package do;
* ``recalibrated``: running statistics recomputed (cumulative average) from clean, un-augmented training
  slices resized to the patch — "precise BN"; it shows whether the running statistics were merely stale
  or skewed by the augmented views in the training batches;
* ``volume_batch``: each volume's slices normalised with their own batch statistics (AdaBN-style,
  transductive, dropout still off). Not a legitimate result, a probe: a large gain over both rows above
  means the weights rely on per-batch statistics that no fixed statistics reproduce.

Two more probes say *why* running and recalibrated statistics differ, changing one thing each:

* ``recalibrated_dropout``: recalibrated on the same clean slices but with dropout active, as in
  training. If this falls back to ``running``, the gap is dropout's variance shift (batch norm after a
  dropout layer learns the variance of dropped-out activations, which eval mode never produces);
* ``recalibrated_weak``: recalibrated with dropout off on the trainer's weak views of those slices
  (rotation, flips, scaling, with its zero-filled corners). If this falls back, the gap comes from the
  augmented inputs.

Per batch-norm layer, the report also gives the median over channels of each statistics' running
variance divided by the recalibrated one (``variance_ratio``): where the running statistics are off and
by how much, e.g. whether only the layers behind a dropout are. ``--modes`` picks the Dice rows (the
ratios are always computed; ``--modes running`` makes a cheap layer-only run).

Usage (appends a run to ``benchmarks/results/bn_gap_<name>.json``, the one file of that setting: run it
again with the same ``--name`` to repeat it, ``--tag`` labels a run):

    python benchmarks/bn_gap.py --data-root ../shared/data/acdc --name cpu_quick \\
        runs/benchmark/cpu_quick/barl_l3_s1/latest.pt runs/benchmark/cpu_quick/supervised_l3_s1/latest.pt
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mpcl.nn.checkpoint import load_checkpoint
from mpcl.training.batchnorm import batch_norm_layers, recalibrate_batch_norm, sample_slices
from mpcl.training.config import AugmentConfig
from mpcl.training.data.augment import weak_view
from mpcl.training.data.loading import load_data
from mpcl.training.evaluate import evaluate_volumes
from mpcl.training.trainer import inference_model_from_checkpoint, stored_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import append_run  # noqa: E402  (benchmarks/ is not a package)

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("running", "recalibrated", "volume_batch", "recalibrated_dropout", "recalibrated_weak")


class VolumeBatchStatistics(nn.Module):
    """Wraps a network so that, in eval mode, its batch-norm layers use the statistics of the batch they
    see (the slices of one volume) and leave the running statistics untouched."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        for norm in batch_norm_layers(self.model):
            norm.momentum = 0.0  # train-mode forward then keeps running_mean/var as they are

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm in batch_norm_layers(self.model):
            norm.train()
        return self.model(x)


def recalibrated(
    model: nn.Module, images: list[np.ndarray], patch: tuple[int, int], batch: int, dropout: bool = False
) -> nn.Module:
    """A copy of ``model`` whose running statistics come from ``images`` (clean slices: the trainer's
    option ``train.bn_recalibration_slices``)."""
    model = copy.deepcopy(model)
    recalibrate_batch_norm(model, images, patch, batch, dropout=dropout)
    return model.eval()


def weak_views(images: list[np.ndarray], patch: tuple[int, int], augment: AugmentConfig, seed: int) -> list:
    """The trainer's weak (geometric) view of each slice, on the patch grid."""
    rng = np.random.default_rng(seed)
    return [weak_view(rng, image, None, patch, augment)[0] for image in images]


def variance_ratios(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    """Per batch-norm layer name: median over channels of ``model``'s running variance over
    ``reference``'s (> 1: ``model`` divides by a wider spread, so its eval-mode activations shrink)."""
    reference_layers = dict(reference.named_modules())
    return {
        name: float(torch.median(layer.running_var / reference_layers[name].running_var.clamp_min(1e-12)))
        for name, layer in model.named_modules()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm)
    }


def diagnose(
    checkpoint: Path,
    data_root: str | None,
    volumes: int,
    slices: int,
    batch: int,
    seed: int,
    modes: tuple[str, ...] = MODES,
) -> dict:
    state = load_checkpoint(checkpoint)
    config = stored_config(state, checkpoint, data_root)
    data = load_data(config.data)
    model = inference_model_from_checkpoint(state, config, data.num_classes).eval()
    patch = tuple(config.data.patch_size)
    pool = sample_slices([s.image for s in (*data.labeled, *data.unlabeled)], slices, seed)
    variants = {
        "running": model,
        "recalibrated": recalibrated(model, pool, patch, batch),
        "volume_batch": VolumeBatchStatistics(model).eval(),
        "recalibrated_dropout": recalibrated(model, pool, patch, batch, dropout=True),
        "recalibrated_weak": recalibrated(model, weak_views(pool, patch, config.augment, seed), patch, batch),
    }
    chosen = [data.val_volumes[i] for i in range(min(volumes, len(data.val_volumes)))]
    device = torch.device("cpu")
    rows = {}
    for mode, network in variants.items():
        if mode not in modes:
            continue
        summary = evaluate_volumes(network, chosen, data.class_names, patch, device)["summary"]
        rows[mode] = {
            "mean_dice": summary["mean"]["dice"]["mean"],
            "dice_per_class": {name: summary[name]["dice"]["mean"] for name in data.class_names[1:]},
        }
    return {
        "checkpoint": str(checkpoint),
        "method": config.method.name,
        "iteration": state["iteration"],
        "validation_volumes": len(chosen),
        "recalibration_slices": len(pool),
        "rows": rows,
        "variance_ratio": {
            f"{mode}/recalibrated": variance_ratios(variants[mode], variants["recalibrated"])
            for mode in ("running", "recalibrated_dropout", "recalibrated_weak")
        },
    }


def print_variance_ratios(ratios: dict[str, dict[str, float]]) -> None:
    """One line per batch-norm layer: its running-variance ratio under each statistics."""
    columns = list(ratios)
    print(f"    {'batch-norm layer':40s} " + " ".join(f"{c:>34s}" for c in columns))
    for layer in ratios[columns[0]]:
        print(f"    {layer:40s} " + " ".join(f"{ratios[c][layer]:34.3f}" for c in columns))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data-root", help="override the data root stored in the checkpoints")
    parser.add_argument("--volumes", type=int, default=20, help="first N validation volumes")
    parser.add_argument("--slices", type=int, default=512, help="clean training slices for recalibration")
    parser.add_argument("--batch", type=int, default=16, help="slices per recalibration batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="Dice rows to compute (after the checkpoints)",
    )
    parser.add_argument("--name", default="diagnosis", help="results file: bn_gap_<name>.json (appended to)")
    parser.add_argument("--tag", default="", help="a label for this run, stored with it")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reports = []
    modes = tuple(args.modes)
    print(f"{'checkpoint':60s} " + " ".join(f"{m:>20s}" for m in modes) + "   (validation mean Dice)")
    for checkpoint in args.checkpoints:
        report = diagnose(checkpoint, args.data_root, args.volumes, args.slices, args.batch, args.seed, modes)
        reports.append(report)
        values = " ".join(f"{report['rows'][m]['mean_dice']:20.4f}" for m in modes)
        print(f"{str(checkpoint)[-60:]:60s} {values}", flush=True)
        print_variance_ratios(report["variance_ratio"])
    target = RESULTS / f"bn_gap_{args.name}.json"
    settings = {**vars(args), "checkpoints": [str(c) for c in args.checkpoints]}
    payload = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "settings": settings,
        "results": reports,
    }
    append_run(payload, target, "bn_gap", args.tag)


if __name__ == "__main__":
    main()
