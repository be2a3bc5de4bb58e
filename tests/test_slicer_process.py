"""The Slicer module's child-process side: command line, output parser, blocking run and cancel.

No slicer-core needed: the command is checked against the real ``mpcl-segment`` argument parser, and
the parser against the real CLI's output, so a change of the CLI's flags or line format fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
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
    BOOTSTRAP,
    OutputMonitor,
    ProcessInfo,
    SegmentOptions,
    child_command,
    child_environment,
    descendants,
    find_python_slicer,
    process_table,
    run_blocking,
    running,
    segment_command,
    terminate_tree,
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
    assert command[:4] == ["/opt/Slicer/bin/PythonSlicer", "-c", BOOTSTRAP, "mpcl.cli_segment"]
    args = cli_segment.parse_args(command[4:])
    assert (args.inputs, args.output, args.model) == (["in.nrrd"], "out.nrrd", "/models/heart")
    assert (args.device, args.backend, args.tta, args.uncertainty, args.overwrite) == (
        "cuda:1",
        "onnxruntime",
        True,
        True,
        True,
    )
    plain = cli_segment.parse_args(segment_command("py", "a", "b", "m", SegmentOptions())[4:])
    assert (plain.device, plain.backend, plain.tta, plain.uncertainty) == ("auto", "auto", False, False)


@pytest.mark.parametrize("options", [{"device": "gpu"}, {"device": "cuda:x"}, {"backend": "coreml"}])
def test_options_are_validated(options):
    with pytest.raises(ValueError, match="device|backend"):
        SegmentOptions(**options)


def test_blocking_run_parses_the_real_cli_output(sample_file, tmp_path):
    output = tmp_path / "labels.nrrd"
    options = SegmentOptions(device="cpu", uncertainty=True)
    command = segment_command(sys.executable, sample_file, output, testdata.default_test_model(), options)
    progress, lines = [], []
    monitor = OutputMonitor(requested_device="cpu")
    outcome = run_blocking(command, monitor, progress.append, on_line=lines.append)
    assert outcome.ok, outcome.log
    assert monitor.child_pid is not None  # the bootstrap announced the child
    assert any(line.startswith("[1/1] done") for line in lines)
    assert not any(line.startswith("@mpcl") for line in lines)  # protocol lines are not the user's log
    assert outcome.message.endswith(" s.")  # the device was chosen, nothing to explain
    assert (outcome.backend, outcome.device, outcome.exit_code) == (auto_cpu_backend(), "cpu", 0)
    assert outcome.seconds is not None and f"{auto_cpu_backend()} on cpu" in outcome.message
    fractions = [step.fraction for step in progress]
    assert fractions[:3] == [0.02, 0.05, 0.2] and fractions[-1] == 1.0  # start, runtime, backend, done
    assert len(fractions) > 4 and fractions == sorted(fractions)  # and the slices in between, rising
    assert output.is_file() and (tmp_path / "labels_uncertainty.nrrd").is_file()
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))
    assert (labels == testdata.sample_labels()).all()


def test_refused_run_reports_the_cli_error(sample_file, tmp_path):
    command = segment_command(sys.executable, sample_file, tmp_path / "x.nrrd", tmp_path, SegmentOptions())
    outcome = run_blocking(command, OutputMonitor())
    assert not outcome.ok and outcome.exit_code == 2
    assert outcome.message.startswith("mpcl-segment refused to run") and "model.json" in outcome.message
    assert not (tmp_path / "x.nrrd").exists()


LAUNCHER = """
import os, subprocess, sys
# Like PythonSlicer: starts the real Python as its child and waits for it.
open(os.environ["MPCL_TEST_LAUNCHER_PID"], "w").write(str(os.getpid()))
sys.exit(subprocess.call(sys.argv[1:]))
"""
FAKE_SEGMENT = """
import os, subprocess, sys, time
# A child that starts a grandchild deaf to SIGTERM, then works for a long time.
grandchild = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
    "time.sleep(120)"], stdout=subprocess.PIPE)
assert grandchild.stdout.readline().strip() == b"ready"  # it ignores SIGTERM from now on
open(sys.argv[1], "w").write(f"{os.getpid()} {grandchild.pid}")
print("INFO mpcl.segment: backend: onnxruntime on cpu (test)", flush=True)
time.sleep(120)
"""


def _tree(tmp_path):
    """A launcher -> child (bootstrap, own process group) -> grandchild tree, as Slicer starts it."""
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "fake_segment.py").write_text(FAKE_SEGMENT)
    pids = tmp_path / "pids.txt"
    environment = dict(os.environ, PYTHONPATH=str(tmp_path), MPCL_TEST_LAUNCHER_PID=str(tmp_path / "l.txt"))
    child = child_command(sys.executable, "fake_segment", [pids])
    return [sys.executable, str(tmp_path / "launcher.py"), *child], environment, pids


def _wait_for(path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not (path.is_file() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.05)
    return [int(v) for v in path.read_text().split()]


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups; Windows uses taskkill /T")
def test_killing_only_the_launcher_leaves_the_child_running(tmp_path):
    """Why cancel must stop the tree: the launcher's death does not stop the real Python child."""
    command, environment, pids = _tree(tmp_path)
    launcher = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL)
    child, grandchild = _wait_for(pids)
    launcher.kill()
    launcher.wait()
    try:
        time.sleep(0.3)
        assert running((child, grandchild), (), process_table()) == {child, grandchild}
    finally:
        assert terminate_tree(None, child, grace=0.5)
    assert not running((child, grandchild), (child,), process_table())


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups; Windows uses taskkill /T")
def test_cancel_stops_the_whole_process_tree(tmp_path):
    command, environment, pids = _tree(tmp_path)
    cancel = threading.Event()
    lines = []

    def cancel_once_loaded(progress):
        if progress.fraction >= 0.2:
            cancel.set()

    monitor = OutputMonitor()
    started = time.monotonic()
    outcome = run_blocking(
        command, monitor, cancel_once_loaded, cancel, env=environment, on_line=lines.append
    )
    elapsed = time.monotonic() - started
    child, grandchild = _wait_for(pids)
    (launcher,) = _wait_for(tmp_path / "l.txt")
    assert outcome.cancelled and not outcome.ok and "cancelled" in outcome.message
    assert monitor.child_pid == child
    # when run_blocking returns nothing of the tree runs (the grandchild needed SIGKILL after the grace)
    assert not running((launcher, child, grandchild), (child,), process_table())
    assert 2.5 < elapsed < 60  # SIGTERM, the grace period for the deaf grandchild, then SIGKILL
    assert lines == ["INFO mpcl.segment: backend: onnxruntime on cpu (test)"]


def test_windows_stops_trees_with_taskkill():
    calls = []
    assert terminate_tree(10, 20, is_windows=True, run=lambda args, **kwargs: calls.append(args))
    assert calls == [["taskkill", "/PID", "20", "/T", "/F"], ["taskkill", "/PID", "10", "/T", "/F"]]
    calls.clear()
    terminate_tree(10, None, is_windows=True, run=lambda args, **kwargs: calls.append(args))
    assert calls == [["taskkill", "/PID", "10", "/T", "/F"]]


def test_process_tables_and_descendants():
    table = [
        ProcessInfo(1, 0, 1, "S"),
        ProcessInfo(10, 1, 10, "S"),  # launcher
        ProcessInfo(11, 10, 11, "S"),  # child, own group
        ProcessInfo(12, 11, 11, "S"),  # grandchild
        ProcessInfo(13, 12, 11, "Z"),  # a zombie great-grandchild: exited
        ProcessInfo(20, 1, 20, "S"),
    ]
    assert descendants(10, table) == {11, 12, 13}
    assert running((10,), (11,), table) == {10, 11, 12}
    if os.name != "nt":
        me = {row.pid: row for row in process_table()}[os.getpid()]
        assert me.ppid == os.getppid() and me.pgid == os.getpgrp()


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


def test_protocol_and_multi_case_progress():
    monitor = OutputMonitor()
    assert monitor.feed("@mpcl pid 4242") is None and monitor.child_pid == 4242
    step = monitor.feed("@mpcl progress 0.5 Segmenting slice 3 of 6")
    assert (step.fraction, step.message) == (0.5, "Segmenting slice 3 of 6")
    assert monitor.feed("@mpcl progress 7 too far").fraction == 1.0
    assert monitor.feed("@mpcl something new") is None  # unknown protocol lines are ignored
    first = monitor.feed("[1/4] done a -> a.nrrd (1.00 s, onnxruntime)")
    assert first.fraction == pytest.approx(0.4) and "1 of 4" in first.message
    assert monitor.feed("[4/4] done d -> d.nrrd (1.00 s, onnxruntime)").fraction == 1.0
    assert not any(line.startswith("@mpcl") for line in monitor.tail)  # not in the user's log either


def _ran(requested, lines):
    monitor = OutputMonitor(requested_device=requested)
    for line in [*lines, "[1/1] done x -> x.nrrd (1.50 s, onnxruntime)"]:
        monitor.feed(line)
    return monitor.finish(0)


def test_the_device_that_ran_is_always_said():
    skipped = "INFO mpcl.segment: backend: skipped tensorrt on cuda: no engine; onnxruntime on cuda: no CUDA"
    chosen = "INFO mpcl.segment: backend: onnxruntime on cpu (onnxruntime 1.20, CPUExecutionProvider)"
    auto_cpu = _ran("auto", [skipped, chosen])
    assert auto_cpu.ok and auto_cpu.device == "cpu"
    assert auto_cpu.message == (
        "Segmented with onnxruntime on cpu in 1.5 s. Device auto: no usable GPU was found, so the CPU was "
        "used (tensorrt on cuda: no engine; onnxruntime on cuda: no CUDA)."
    )
    assert _ran("auto", [chosen]).message.endswith("so the CPU was used.")
    assert _ran("cpu", [chosen]).message == "Segmented with onnxruntime on cpu in 1.5 s."
    gpu = _ran("auto", ["INFO mpcl.segment: backend: torch on cuda:0 (torch 2.3)"])
    assert gpu.message == "Segmented with torch on cuda:0 in 1.5 s."
    silent = _ran("auto", [])
    assert silent.ok and "did not report which device" in silent.message


def test_cuda_is_offered_only_where_a_runtime_can_use_it():
    from MPCLSegmentationLib.runtime import gpu_support, offered_devices

    def broken():
        raise OSError("libcudart.so.12: cannot open shared object file")

    no_driver = gpu_support({"onnxruntime": lambda: None}, driver_present=lambda: False)
    assert not no_driver.usable and "No NVIDIA GPU driver" in no_driver.detail
    assert offered_devices(no_driver) == ("auto", "cpu")
    cpu_builds = gpu_support(
        {"onnxruntime": lambda: "no CUDAExecutionProvider", "torch": broken}, driver_present=lambda: True
    )
    assert not cpu_builds.usable and offered_devices(cpu_builds) == ("auto", "cpu")
    assert "onnxruntime: no CUDAExecutionProvider" in cpu_builds.detail and "libcudart" in cpu_builds.detail
    torch_gpu = gpu_support(
        {"onnxruntime": lambda: "no CUDAExecutionProvider", "torch": lambda: None},
        driver_present=lambda: True,
    )
    assert torch_gpu.usable and "torch" in torch_gpu.detail
    assert offered_devices(torch_gpu) == ("auto", "cpu", "cuda")
    here = gpu_support()  # the real probes on this machine: must answer, whatever the answer
    assert isinstance(here.usable, bool) and here.detail


def test_bootstrap_is_one_line_that_survives_command_line_quoting():
    assert "\n" not in BOOTSTRAP and '"' not in BOOTSTRAP
    compile(BOOTSTRAP, "<bootstrap>", "exec")  # valid Python
    result = subprocess.run(
        [*child_command(sys.executable, "mpcl.cli_segment", ["--version"])],
        capture_output=True,
        text=True,
        check=False,
        start_new_session=True,  # already a group leader: the bootstrap must not fail on setpgid
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr
    assert lines[0].startswith("@mpcl pid ") and lines[1].startswith("@mpcl progress 0.05 ")
    assert lines[2].startswith("mpcl ")  # --version: the module ran with the arguments given
