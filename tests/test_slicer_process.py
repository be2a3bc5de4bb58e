"""The Slicer module's child-process side: command line, output parser, blocking run and cancel.

No slicer-core needed: the command is checked against the real ``mpcl-segment`` argument parser, and
the parser against the real CLI's output, so a change of the CLI's flags or line format fails here.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import SimpleITK as sitk

from mpcl import cli_segment
from tests.segment_helpers import auto_cpu_backend

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "slicer" / "MPCLSegmentation"
if str(PLUGIN) not in sys.path:
    sys.path.insert(0, str(PLUGIN))

from MPCLSegmentationLib import testdata  # noqa: E402
from MPCLSegmentationLib.geometry import lps_from_ijk_to_ras  # noqa: E402
from MPCLSegmentationLib.process import (  # noqa: E402
    OutputMonitor,
    SegmentOptions,
    child_environment,
    find_python_slicer,
    run_blocking,
    segment_command,
)


@pytest.fixture(scope="module")
def sample_file(tmp_path_factory) -> Path:
    array, ijk_to_ras, _ = testdata.sample_volume()
    spacing, origin, direction = lps_from_ijk_to_ras(ijk_to_ras)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    path = tmp_path_factory.mktemp("sample") / "sample.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def test_command_is_accepted_by_the_real_cli():
    options = SegmentOptions(device="cuda:1", backend="onnxruntime", tta=True, uncertainty=True)
    command = segment_command("/opt/Slicer/bin/PythonSlicer", "in.nrrd", "out.nrrd", "/models/heart", options)
    assert command[:3] == ["/opt/Slicer/bin/PythonSlicer", "-m", "mpcl.cli_segment"]
    args = cli_segment._parser().parse_args(command[3:])
    assert (args.inputs, args.output, args.model) == (["in.nrrd"], "out.nrrd", "/models/heart")
    assert (args.device, args.backend, args.tta, args.uncertainty, args.overwrite) == (
        "cuda:1",
        "onnxruntime",
        True,
        True,
        True,
    )
    plain = cli_segment._parser().parse_args(segment_command("py", "a", "b", "m", SegmentOptions())[3:])
    assert (plain.device, plain.backend, plain.tta, plain.uncertainty) == ("auto", "auto", False, False)


@pytest.mark.parametrize("options", [{"device": "gpu"}, {"device": "cuda:x"}, {"backend": "coreml"}])
def test_options_are_validated(options):
    with pytest.raises(ValueError, match="device|backend"):
        SegmentOptions(**options)


def test_blocking_run_parses_the_real_cli_output(sample_file, tmp_path):
    output = tmp_path / "labels.nrrd"
    options = SegmentOptions(device="cpu", uncertainty=True)
    command = segment_command(sys.executable, sample_file, output, testdata.default_test_model(), options)
    progress = []
    outcome = run_blocking(command, OutputMonitor(), progress.append)
    assert outcome.ok, outcome.log
    assert (outcome.backend, outcome.device, outcome.exit_code) == (auto_cpu_backend(), "cpu", 0)
    assert outcome.seconds is not None and f"{auto_cpu_backend()} on cpu" in outcome.message
    fractions = [step.fraction for step in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) == 3
    assert output.is_file() and (tmp_path / "labels_uncertainty.nrrd").is_file()
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    assert (labels == testdata.sample_labels()).all()


def test_refused_run_reports_the_cli_error(sample_file, tmp_path):
    command = segment_command(sys.executable, sample_file, tmp_path / "x.nrrd", tmp_path, SegmentOptions())
    outcome = run_blocking(command, OutputMonitor())
    assert not outcome.ok and outcome.exit_code == 2
    assert outcome.message.startswith("mpcl-segment refused to run") and "model.json" in outcome.message
    assert not (tmp_path / "x.nrrd").exists()


def test_cancel_stops_the_child():
    script = (
        "import time; print('INFO mpcl.segment: backend: onnxruntime on cpu (test)', flush=True); "
        "time.sleep(60); print('[1/1] done x -> y (60.00 s, onnxruntime)')"
    )
    cancel = threading.Event()

    def cancel_once_loaded(progress):
        if progress.fraction >= 0.2:
            cancel.set()

    outcome = run_blocking([sys.executable, "-c", script], OutputMonitor(), cancel_once_loaded, cancel)
    assert outcome.cancelled and not outcome.ok
    assert outcome.exit_code is not None and outcome.exit_code != 0  # terminated, not finished
    assert "cancelled" in outcome.message


def _finish(lines, exit_code, crashed=False):
    monitor = OutputMonitor()
    for line in lines:
        monitor.feed(line)
    return monitor.finish(exit_code, crashed=crashed)


def test_failure_messages_name_the_cause():
    failed = _finish(["[1/1] failed scan.nrrd: scan.nrrd: cannot be read as an image (bad)"], 1)
    assert failed.message == "Segmentation failed: scan.nrrd: cannot be read as an image (bad)"
    missing = _finish(
        ["Traceback (most recent call last):", "ModuleNotFoundError: No module named 'mpcl'"],
        1,
    )
    assert "mpcl runtime is not installed" in missing.message
    loaded = "INFO mpcl.segment: backend: torch on cuda (torch 2.3)"
    crashed = _finish([loaded, "Segmentation fault"], -11, crashed=True)
    assert "stopped unexpectedly" in crashed.message and "Segmentation fault" in crashed.message
    assert (crashed.backend, crashed.device) == ("torch", "cuda")
    silent = _finish([], 0)
    assert not silent.ok and "without reporting" in silent.message
    interrupted = _finish(["[1/1] interrupted scan.nrrd; nothing was written for it"], 130)
    assert "interrupted" in interrupted.message


def test_skipped_backends_are_not_taken_for_the_chosen_one():
    monitor = OutputMonitor()
    monitor.feed("INFO mpcl.segment: backend: skipped tensorrt on cuda: no engine; torch on cuda: no CUDA")
    assert monitor.backend == ""
    monitor.feed("INFO mpcl.segment: backend: onnxruntime on cpu (onnxruntime 1.20, CPUExecutionProvider)")
    assert (monitor.backend, monitor.device) == ("onnxruntime", "cpu")


def test_python_slicer_is_preferred(tmp_path):
    assert find_python_slicer("/usr/bin/python3", lambda name: "/slicer/bin/PythonSlicer") == (
        "/slicer/bin/PythonSlicer"
    )
    sibling = tmp_path / "PythonSlicer.exe"
    sibling.write_text("")
    found = find_python_slicer(str(tmp_path / "python.exe"), lambda name: None, is_windows=True)
    assert found == str(sibling)
    assert find_python_slicer("/usr/bin/python3", lambda name: None, is_windows=False) == "/usr/bin/python3"


def test_child_environment_is_unbuffered_utf8():
    environment = child_environment({"PATH": "/bin"})
    assert environment == {"PATH": "/bin", "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}


def test_runtime_source_and_python_checks(tmp_path):
    from MPCLSegmentationLib import runtime

    repository = Path(__file__).resolve().parents[1]
    assert runtime.default_requirement(PLUGIN) == str(repository)  # loaded from a checkout: install it
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\n')
    assert runtime.default_requirement(tmp_path / "a" / "b" / "c") == "mpcl"
    assert runtime.default_requirement("/") == "mpcl"
    assert runtime.python_supported((3, 12)) and not runtime.python_supported((3, 9))
    message = runtime.unsupported_python_message((3, 9))
    assert "Python 3.10" in message and "3.9" in message and "5.10" in message
    assert runtime.runtime_version() is not None  # mpcl is installed in the test environment
