"""``mpcl-segment``: segment scans from the command line with a model package.

    mpcl-segment scan.nii.gz -o scan_seg.nii.gz --model runs/acdc/model
    mpcl-segment cases/*.nii.gz dicom_folder/ -o out/ --model runs/acdc/model --tta --uncertainty

One line per case goes to stdout (``[i/n] done NAME -> PATH (s)`` or ``[i/n] failed NAME: reason``),
so a parent process such as the 3D Slicer module can follow a batch; logs go to stderr. A case that fails
leaves nothing on disk and the others still run. Exit codes: 0 all written, 1 some case failed,
2 nothing was run (bad model package, arguments, or outputs that already exist without --overwrite),
130 interrupted (Ctrl-C), 143 terminated (SIGTERM, handled like Ctrl-C: the case being written leaves
nothing behind). argparse only, so the runtime needs no extra dependency.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import mpcl
from mpcl.backends import BACKEND_NAMES
from mpcl.errors import MPCLError

FORMATS = ("nii.gz", "nii", "nrrd", "mha", "seg.nrrd")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that temporaries are removed as for Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpcl-segment",
        description="Segment scans (NIfTI/NRRD/MHA files or DICOM folders) with an MPCL model package.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or DICOM series folders")
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        help="output file (one input, with an image suffix) or folder (outputs named <case>.<format>)",
    )
    parser.add_argument("--model", required=True, help="model package folder (holding model.json)")
    parser.add_argument("--backend", default="auto", choices=("auto", *BACKEND_NAMES))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "fp16", "int8", "bf16"),
        help="auto = the fastest checked variant the package has for the device (OpenVINO: bf16, then "
        "int8; ONNX Runtime: int8 on CPU, fp16 on CUDA), else fp32; bf16 runs on OpenVINO only",
    )
    parser.add_argument("--tta", action="store_true", help="average over flipped copies (4x slower)")
    parser.add_argument("--probabilities", action="store_true", help="also write <case>_probabilities")
    parser.add_argument("--uncertainty", action="store_true", help="also write <case>_uncertainty (entropy)")
    parser.add_argument("--format", default="nii.gz", choices=FORMATS, help="output format in folder mode")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    parser.add_argument("--series", help="DICOM series instance UID, for folders holding several series")
    parser.add_argument(
        "--allow-slice-gaps",
        action="store_true",
        help="accept a DICOM series whose slices are unevenly spaced (a missing file): its slices are "
        "then stacked at one spacing, as ITK reads them",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=8, help="slices per network call (default 8)"
    )
    parser.add_argument(
        "--threads", type=_positive_int, help="CPU threads for the backend (default: all cores)"
    )
    parser.add_argument("--no-postprocess", action="store_true", help="skip the package's post-processing")
    parser.add_argument("-q", "--quiet", action="store_true", help="only the per-case lines and errors")
    parser.add_argument("--version", action="version", version=f"mpcl {mpcl.__version__}")
    return parser


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


def segment_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mpcl-segment``; returns (and exits with) the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        code = _run(args)
    except KeyboardInterrupt as stop:  # before or between cases: nothing is half-written
        print("Interrupted.", file=sys.stderr, flush=True)
        code = 143 if isinstance(stop, Terminated) else 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    if argv is None:
        sys.exit(code)
    return code


def _run(args: argparse.Namespace) -> int:
    from mpcl.inputs import case_name, dicom_series_image
    from mpcl.segmenter import Segmenter, output_paths, refuse_existing, refuse_input_as_output

    try:
        targets = _targets(args.inputs, args.output, args.format)
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
        return 2
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
            )
        except MPCLError as error:
            failures += 1
            _emit(f"[{index}/{total}] failed {source}: {error}")
            print(f"Error: {error}", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt as stop:
            _emit(f"[{index}/{total}] interrupted {source}; nothing was written for it")
            return 143 if isinstance(stop, Terminated) else 130
        extras = "".join(f", {key} {path}" for key, path in written.items() if key != "segmentation")
        _emit(
            f"[{index}/{total}] done {result.name if image is source else case_name(source)} -> "
            f"{written['segmentation']}{extras} "
            f"({time.perf_counter() - started:.2f} s, {segmenter.backend.name})"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    segment_main()
