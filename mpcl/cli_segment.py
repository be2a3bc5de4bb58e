"""``mpcl-segment``: segment scans from the command line with a model package.

    mpcl-segment scan.nii.gz -o scan_seg.nii.gz --model runs/quickstart/model
    mpcl-segment cases/*.nii.gz dicom_folder/ -o out/ --model runs/quickstart/model --tta --uncertainty

One line per case goes to stdout (``[i/n] done NAME -> PATH (s)`` or ``[i/n] failed NAME: reason``),
so a parent process such as the 3D Slicer module can follow a batch; logs go to stderr. A case that fails
leaves nothing on disk and the others still run. Exit codes: 0 all written, 1 some case failed,
2 nothing was run (bad model package, arguments, or outputs that already exist without --overwrite),
130 interrupted (Ctrl-C), 143 terminated (SIGTERM, handled like Ctrl-C: the case being written leaves
nothing behind). A click command like the other entry points (:mod:`mpcl.cli_common`); it imports
the runtime only, so it runs without torch.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from mpcl.backends import BACKEND_NAMES
from mpcl.cli_common import (
    CONTEXT_SETTINGS,
    EXIT_INTERRUPTED,
    EXIT_NOTHING_DONE,
    EXIT_OK,
    EXIT_PARTIAL,
    POSITIVE_INT,
    PRECISION_CHOICES,
    Terminated,
    interrupt_exit_code,
    sigterm_as_interrupt,
    threads_option,
    version_option,
)
from mpcl.errors import MPCLError

FORMATS = ("nii.gz", "nii", "nrrd", "mha", "seg.nrrd")

__all__ = ["FORMATS", "SegmentArgs", "Terminated", "parse_args", "segment_command", "segment_main"]


@dataclass
class SegmentArgs:
    """The parsed command line (:func:`parse_args`)."""

    inputs: list[str]
    output: str
    model: str
    backend: str
    device: str
    precision: str
    tta: bool
    probabilities: bool
    uncertainty: bool
    fmt: str
    overwrite: bool
    series: str | None
    allow_slice_gaps: bool
    batch_size: int
    threads: int | None
    no_postprocess: bool
    quiet: bool
    progress_lines: bool


@click.command(
    "mpcl-segment",
    context_settings=CONTEXT_SETTINGS,
    help="Segment scans (NIfTI/NRRD/MHA files or DICOM folders) with an MPCL model package.",
)
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option(
    "-o",
    "--output",
    required=True,
    help="Output file (one input, with an image suffix) or folder (outputs named <case>.<format>).",
)
@click.option("--model", required=True, help="Model package folder (holding model.json).")
@click.option("--backend", type=click.Choice(("auto", *BACKEND_NAMES)), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--precision",
    type=click.Choice(PRECISION_CHOICES),
    default="auto",
    show_default=True,
    help="auto = the fastest checked variant the package has for the device (OpenVINO: bf16, then "
    "int8; ONNX Runtime: int8 on CPU, fp16 on CUDA), else fp32; bf16 runs on OpenVINO only.",
)
@click.option("--tta", is_flag=True, help="Average over flipped copies (4 network passes).")
@click.option("--probabilities", is_flag=True, help="Also write <case>_probabilities.")
@click.option("--uncertainty", is_flag=True, help="Also write <case>_uncertainty (entropy).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="nii.gz",
    show_default=True,
    help="Output format in folder mode.",
)
@click.option("--overwrite", is_flag=True, help="Replace outputs that already exist.")
@click.option("--series", help="DICOM series instance UID, for folders holding several series.")
@click.option(
    "--allow-slice-gaps",
    is_flag=True,
    help="Accept a DICOM series whose slices are unevenly spaced (a missing file): its slices are "
    "then stacked at one spacing, as ITK reads them.",
)
@click.option(
    "--batch-size", type=POSITIVE_INT, default=8, show_default=True, help="Slices per network call."
)
@threads_option("CPU threads for the backend (default: all cores).")
@click.option("--no-postprocess", is_flag=True, help="Skip the package's post-processing.")
@click.option("-q", "--quiet", is_flag=True, help="Only the per-case lines and errors.")
@click.option(
    "--progress-lines",
    is_flag=True,
    help="Also print '@mpcl progress FRACTION MESSAGE' lines as each case advances (slice batches), "
    "for a parent process such as the 3D Slicer module; FRACTION covers the batch from 0.2 to 1.",
)
@version_option()
@click.pass_obj
def segment_command(outcome: list[int] | None, **options) -> int:
    """The command; :func:`segment_main` runs it and turns its result into the exit code."""
    args = SegmentArgs(**{**options, "inputs": list(options["inputs"])})
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        with sigterm_as_interrupt():
            code = _run(args)
    except KeyboardInterrupt as stop:  # before or between cases: nothing is half-written
        print("Interrupted.", file=sys.stderr, flush=True)
        code = interrupt_exit_code(stop)
    if outcome is not None:
        outcome.append(code)
    return code


def parse_args(argv: Sequence[str]) -> SegmentArgs:
    """The command line ``argv`` as :func:`segment_main` would read it, without running anything (for
    callers that build mpcl-segment command lines, such as the Slicer module); bad arguments raise
    click's UsageError/BadParameter."""
    with segment_command.make_context("mpcl-segment", [str(arg) for arg in argv]) as ctx:
        options = dict(ctx.params)
    return SegmentArgs(**{**options, "inputs": list(options["inputs"])})


def segment_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mpcl-segment``: the exit code, returned when ``argv`` is given and passed to
    ``sys.exit`` when it is None (the console script). Bad arguments, ``--help`` and ``--version``
    exit (SystemExit, code 2 or 0) before anything runs, whichever way it is called."""
    outcome: list[int] = []
    args = None if argv is None else [str(arg) for arg in argv]
    try:
        segment_command.main(args, prog_name="mpcl-segment", standalone_mode=False, obj=outcome)
    except click.ClickException as error:  # bad arguments: the usage and one sentence, nothing run
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Abort:  # Ctrl-C while the arguments were read
        print("Interrupted.", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    if not outcome:  # --help or --version: printed, nothing to run
        sys.exit(EXIT_OK)
    code = outcome[0]
    if argv is None:
        sys.exit(code)
    return code


def _targets(inputs: Sequence[str], output: str, fmt: str) -> list[Path]:
    from mpcl.inputs import case_name
    from mpcl.segmenter import OUTPUT_SUFFIXES

    out = Path(output)
    if len(inputs) == 1 and str(out).lower().endswith(OUTPUT_SUFFIXES) and not out.is_dir():
        return [out]
    names_a_file = out.suffix[1:].isalnum() and not output.endswith(("/", os.sep)) and not out.is_dir()
    if names_a_file:
        raise MPCLError(
            f"{out}: is not an output format mpcl-segment writes ({', '.join(OUTPUT_SUFFIXES)}); "
            "to write into a folder of that name, end it with '/'"
        )
    if out.exists() and not out.is_dir():
        raise MPCLError(f"{out}: is a file; with several inputs give an output folder")
    targets = [out / f"{case_name(source)}.{fmt}" for source in inputs]
    names = [target.name for target in targets]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise MPCLError(f"several inputs would write the same output(s) {duplicates}; rename them")
    return targets


def _emit(line: str) -> None:
    print(line, flush=True)


PROGRESS_START = 0.2  # the parent's bar before the first case: runtime and model loaded


def _progress_printer(index: int, total: int):
    """A Segmenter progress callback printing the line protocol's ``@mpcl progress`` lines: case
    ``index`` of ``total`` spans its share of [PROGRESS_START, 1]."""
    share = (1.0 - PROGRESS_START) / total

    def report(fraction: float, message: str) -> None:
        overall = PROGRESS_START + share * (index - 1 + min(max(fraction, 0.0), 1.0))
        _emit(f"@mpcl progress {overall:.4f} [{index}/{total}] {message}")

    return report


def _run(args: SegmentArgs) -> int:
    from mpcl.inputs import case_name, dicom_series_image
    from mpcl.segmenter import Segmenter, output_paths, refuse_existing, refuse_input_as_output

    try:
        targets = _targets(args.inputs, args.output, args.fmt)
        for source, target in zip(args.inputs, targets, strict=True):
            paths = output_paths(target, args.probabilities, args.uncertainty).values()
            refuse_input_as_output(source, paths)
            refuse_existing(paths, args.overwrite)
        segmenter = Segmenter.from_pretrained(
            args.model,
            args.backend,
            args.device,
            batch_size=args.batch_size,
            tta=args.tta,
            postprocess=not args.no_postprocess,
            threads=args.threads,
            precision=args.precision,
        )
    except MPCLError as error:
        print(f"Error: {error}", file=sys.stderr, flush=True)
        return EXIT_NOTHING_DONE
    total, failures = len(targets), 0
    for index, (source, target) in enumerate(zip(args.inputs, targets, strict=True), 1):
        started = time.perf_counter()
        try:
            image = source
            if args.allow_slice_gaps and Path(source).is_dir():
                image = dicom_series_image(Path(source), args.series, allow_slice_gaps=True)[0]
            result, written = segmenter.segment_to_files(
                image,
                target,
                probabilities=args.probabilities,
                uncertainty=args.uncertainty,
                overwrite=args.overwrite,
                dicom_series=args.series,
                progress_callback=_progress_printer(index, total) if args.progress_lines else None,
            )
        except MPCLError as error:
            failures += 1
            _emit(f"[{index}/{total}] failed {source}: {error}")
            print(f"Error: {error}", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt as stop:
            _emit(f"[{index}/{total}] interrupted {source}; nothing was written for it")
            return interrupt_exit_code(stop)
        extras = "".join(f", {key} {path}" for key, path in written.items() if key != "segmentation")
        _emit(
            f"[{index}/{total}] done {result.name if image is source else case_name(source)} -> "
            f"{written['segmentation']}{extras} "
            f"({time.perf_counter() - started:.2f} s, {segmenter.backend.name})"
        )
    return EXIT_PARTIAL if failures else EXIT_OK


if __name__ == "__main__":
    segment_main()
