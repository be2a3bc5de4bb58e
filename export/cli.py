"""``mpcl-export``: a trained checkpoint (or a model package) in, a checked deployment package out.

Exit codes are those of every command (``mpcl.cli_common``): 0 everything asked for was written; 1 the
package was written but an artefact asked for (int8, fp16, bf16, TensorRT) was refused by its check and
left out; 2 nothing was written (bad input, a missing optional dependency, or the deployment student /
fp32 ONNX graph failed its check), with one sentence saying why; 130/143 interrupted (Ctrl-C/SIGTERM),
nothing written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mpcl.cli_common import (
    CONTEXT_SETTINGS,
    friendly_errors,
    no_progress_option,
    threads_option,
    version_option,
)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Model package folder.")
@click.option("--onnx", is_flag=True, help="fp32 ONNX graph (opset 17), parity-checked against torch.")
@click.option("--int8", is_flag=True, help="Static int8 (QDQ) ONNX for CPUs, Dice-gated (implies --onnx).")
@click.option("--fp16", is_flag=True, help="fp16 ONNX for GPUs, parity- and Dice-gated (implies --onnx).")
@click.option(
    "--bf16",
    is_flag=True,
    help="Check OpenVINO's bf16 run of the fp32 graph on this CPU, Dice-gated; Segmenter's auto then uses it "
    "on CPUs with native bf16 (needs mpcl[openvino]; implies --onnx).",
)
@click.option("--trt", is_flag=True, help="TensorRT engine for this GPU (needs mpcl[trt]; implies --onnx).")
@click.option(
    "--distill",
    "distill_config",
    type=click.Path(path_type=Path),
    help="Train a compact student from this YAML config (configs/distill/small.yaml) and ship it; the "
    "training run (logs, curves, checkpoints) is kept in <OUT>.distill/ and resumed from there if "
    "interrupted.",
)
@click.option(
    "--max-dice-drop",
    type=float,
    default=1.0,
    show_default=True,
    help="Dice points (1 = 0.01 Dice) an artefact may lose on the validation volumes vs the source.",
)
@click.option("--data-root", type=str, help="Override the data root stored in the checkpoint's config.")
@click.option(
    "--calibration-slices",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Training slices that calibrate int8 activation ranges.",
)
@click.option(
    "--calibration-method",
    type=click.Choice(["minmax", "percentile", "entropy"]),
    default="minmax",
    show_default=True,
    help="How int8 activation ranges are chosen from the calibration slices.",
)
@click.option(
    "--parity-slices",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Validation slices the logit parity checks run on.",
)
@click.option(
    "--trt-precision",
    type=click.Choice(["fp16", "fp32"]),
    default="fp16",
    show_default=True,
    help="Engine precision (fp16: built from the fp16 ONNX copy).",
)
@click.option(
    "--trt-max-batch",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Largest batch of slices in the engine's optimisation profile.",
)
@threads_option("CPU threads for the ONNX Runtime and OpenVINO checks (default: all cores).")
@click.option(
    "--largest-component",
    "largest_component",
    multiple=True,
    metavar="CLASS",
    help="Post-processing the package applies: keep only the largest 3D connected component of CLASS "
    "(repeat for several classes; 'all': every foreground class; 'none': no class).",
)
@click.option(
    "--fill-holes",
    "fill_holes",
    multiple=True,
    metavar="CLASS",
    help="Post-processing the package applies: fill enclosed holes of CLASS slice by slice (repeat, "
    "'all' or 'none' as for --largest-component). Without either option a source package keeps its "
    "post-processing and a checkpoint gets none; mpcl-segment --no-postprocess skips it at run time.",
)
@click.option("--name", default="", help="Package name in model.json (default: the folder name).")
@click.option("--overwrite", is_flag=True, help="Replace an existing model package.")
@no_progress_option()
@version_option()
@friendly_errors
def export_main(
    source,
    output,
    onnx,
    int8,
    fp16,
    bf16,
    trt,
    distill_config,
    max_dice_drop,
    data_root,
    calibration_slices,
    calibration_method,
    parity_slices,
    trt_precision,
    trt_max_batch,
    threads,
    largest_component,
    fill_holes,
    name,
    overwrite,
    no_progress,
) -> None:
    """Export SOURCE (a checkpoint such as best.pt, or a model package folder) as a model package.

    Always writes the deployment student (training-only parts stripped, batch-norm folded) as model.pt;
    the options add ONNX artefacts, each checked against the source model before it is kept. Exit code
    0: all written; 1: written, but an artefact asked for was refused by its check; 2: nothing written.
    """
    from mpcl.export.pipeline import ExportOptions, export_package

    options = ExportOptions(
        onnx=onnx,
        int8=int8,
        fp16=fp16,
        bf16=bf16,
        trt=trt,
        distill=distill_config,
        max_dice_drop=max_dice_drop,
        calibration_slices=calibration_slices,
        calibration_method=calibration_method,
        parity_slices=parity_slices,
        trt_precision=trt_precision,
        trt_max_batch=trt_max_batch,
        threads=threads,
        name=name,
        postprocessing=_postprocessing(largest_component, fill_holes),
        progress=not no_progress,
    )
    report = export_package(
        source, output, options, overwrite=overwrite, data_root=data_root, echo=click.echo
    )
    if report.refused:
        sys.exit(1)


def _postprocessing(largest_component: tuple[str, ...], fill_holes: tuple[str, ...]) -> dict | None:
    """model.json's ``postprocessing`` from the options; None when neither was given."""
    if not largest_component and not fill_holes:
        return None
    result = {}
    for key, option, values in (
        ("largest_component", "--largest-component", largest_component),
        ("fill_holes", "--fill-holes", fill_holes),
    ):
        keywords = {value.lower() for value in values} & {"all", "none"}
        if keywords and len(values) > 1:
            raise click.BadParameter(
                f"'{keywords.pop()}' cannot be combined with other classes", param_hint=option
            )
        if keywords:
            result[key] = keywords.pop() == "all"
        else:
            result[key] = list(values)
    return result
