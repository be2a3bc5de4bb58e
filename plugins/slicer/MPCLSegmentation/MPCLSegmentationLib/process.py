"""Running ``mpcl-segment`` in a child process and following what it prints.

Inference runs outside Slicer's process (a crash or a runaway GPU allocation cannot take Slicer down,
and the GUI never waits on it). The command line and the output parser here are shared by the two ways
of running the child: :func:`run_blocking` (subprocess; tests and the module self-test) and the
module widget's non-blocking ``qt.QProcess``. Nothing here imports slicer, vtk or Qt.

``mpcl-segment`` (``mpcl/cli_segment.py``) prints one line per case on stdout,
``[i/n] done NAME -> PATH (S s, BACKEND)`` or ``[i/n] failed SOURCE: REASON``, logs
``INFO mpcl.segment: backend: NAME on DEVICE (DETAIL)`` on stderr once the network is loaded, prints
``Error: ...`` on stderr for refused runs, and exits 0 (written), 1 (case failed), 2 (nothing run:
bad model package or arguments) or 130 (interrupted).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

SEGMENT_MODULE = "mpcl.cli_segment"
BACKENDS = ("auto", "onnxruntime", "openvino", "torch", "tensorrt")
DEVICES = ("auto", "cpu", "cuda")
EXIT_OK, EXIT_CASE_FAILED, EXIT_NOT_RUN, EXIT_INTERRUPTED = 0, 1, 2, 130
TERMINATE_GRACE_SECONDS = 3.0

_CASE_LINE = re.compile(r"^\[(?P<index>\d+)/(?P<total>\d+)\] (?P<state>done|failed|interrupted) (?P<rest>.*)")
_DONE_TAIL = re.compile(r"\((?P<seconds>[0-9.]+) s, (?P<backend>[^)]+)\)$")
_BACKEND_LINE = re.compile(r"backend: (?P<backend>\S+) on (?P<device>\S+)(?: \((?P<detail>.*)\))?$")
_ERROR_LINE = re.compile(r"^Error: (?P<message>.*)$")
_MISSING_RUNTIME = re.compile(r"No module named '?mpcl")


@dataclass(frozen=True)
class SegmentOptions:
    """What the user chose besides the volume and the model: where to run and what to compute."""

    device: str = "auto"
    backend: str = "auto"
    tta: bool = False
    uncertainty: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        device_ok = self.device in DEVICES or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        if not device_ok:
            raise ValueError(f"device {self.device!r} is not auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class Progress:
    """One step forward: a fraction in [0, 1] for the progress bar and a line for the status label."""

    fraction: float
    message: str


@dataclass(frozen=True)
class RunOutcome:
    """How the child ended. ``message`` is a sentence for the user; ``log`` the child's last lines."""

    ok: bool
    message: str
    cancelled: bool = False
    backend: str = ""
    device: str = ""
    seconds: float | None = None
    exit_code: int | None = None
    log: tuple[str, ...] = ()


def segment_command(
    python: str,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    model: str | os.PathLike,
    options: SegmentOptions,
) -> list[str]:
    """The ``mpcl-segment`` command line for one volume (run as ``python -m mpcl.cli_segment``)."""
    command = [
        str(python),
        "-m",
        SEGMENT_MODULE,
        str(input_path),
        "-o",
        str(output_path),
        "--model",
        str(model),
        "--backend",
        options.backend,
        "--device",
        options.device,
        "--overwrite",
    ]
    if options.tta:
        command.append("--tta")
    if options.uncertainty:
        command.append("--uncertainty")
    return command


def find_python_slicer(
    executable: str = sys.executable,
    which: Callable[[str], str | None] = shutil.which,
    is_windows: bool = os.name == "nt",
) -> str:
    """The interpreter to run the child with: Slicer's ``PythonSlicer`` launcher when there is one.

    Inside Slicer, ``PythonSlicer`` is on PATH and sets up Slicer's Python environment (where the
    module installed mpcl); it can also sit next to the running interpreter. Outside Slicer (tests,
    plain Python) the running interpreter is used.
    """
    name = "PythonSlicer.exe" if is_windows else "PythonSlicer"
    found = which("PythonSlicer")
    if found:
        return found
    sibling = Path(executable).with_name(name)
    if sibling.is_file():
        return str(sibling)
    return executable


def child_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: the parent's, with unbuffered UTF-8 output so lines arrive as printed."""
    environment = dict(os.environ if base is None else base)
    environment["PYTHONUNBUFFERED"] = "1"
    environment["PYTHONIOENCODING"] = "utf-8"
    return environment


class OutputMonitor:
    """Follows the child's merged stdout/stderr, line by line, and turns its ending into a RunOutcome."""

    def __init__(self, log_lines: int = 30) -> None:
        self.backend = ""
        self.device = ""
        self.detail = ""
        self.seconds: float | None = None
        self.done = False
        self.failure = ""
        self.errors: list[str] = []
        self.interrupted = False
        self.tail: deque[str] = deque(maxlen=log_lines)

    def started(self) -> Progress:
        return Progress(0.02, "Starting the mpcl runtime...")

    def feed(self, line: str) -> Progress | None:
        """Read one output line; return a Progress when it moves the run forward."""
        line = line.rstrip("\r\n")
        if not line.strip():
            return None
        self.tail.append(line)
        case = _CASE_LINE.match(line)
        if case:
            return self._case_line(case.group("state"), case.group("rest"))
        error = _ERROR_LINE.match(line)
        if error:
            self.errors.append(error.group("message"))
            return None
        backend = _BACKEND_LINE.search(line)
        if backend and "mpcl" in line:
            self.backend, self.device = backend.group("backend"), backend.group("device")
            self.detail = backend.group("detail") or ""
            return Progress(0.2, f"Segmenting with {self.backend} on {self.device}...")
        return None

    def _case_line(self, state: str, rest: str) -> Progress | None:
        if state == "done":
            self.done = True
            tail = _DONE_TAIL.search(rest)
            if tail:
                self.seconds = float(tail.group("seconds"))
                self.backend = self.backend or tail.group("backend")
            return Progress(1.0, "Segmentation computed; loading it into the scene...")
        if state == "failed":
            self.failure = rest.split(": ", 1)[1] if ": " in rest else rest
            return None
        self.interrupted = True
        return None

    def finish(self, exit_code: int | None, crashed: bool = False, cancelled: bool = False) -> RunOutcome:
        """The outcome once the child has exited (``exit_code`` None or ``crashed``: it did not exit
        normally, e.g. killed or segfaulted)."""
        common = {
            "backend": self.backend,
            "device": self.device,
            "seconds": self.seconds,
            "exit_code": exit_code,
            "log": tuple(self.tail),
        }
        if cancelled:
            message = "Segmentation cancelled; nothing was added to the scene."
            return RunOutcome(False, message, cancelled=True, **common)
        if not crashed and exit_code == EXIT_OK and self.done:
            where = f" on {self.device}" if self.device else ""
            took = f" in {self.seconds:.1f} s" if self.seconds is not None else ""
            return RunOutcome(True, f"Segmented with {self.backend or 'mpcl'}{where}{took}.", **common)
        return RunOutcome(False, self._failure_message(exit_code, crashed), **common)

    def _failure_message(self, exit_code: int | None, crashed: bool) -> str:
        text = "\n".join(self.tail)
        if _MISSING_RUNTIME.search(text):
            return (
                "The mpcl runtime is not installed in Slicer's Python environment; "
                "use 'Install mpcl runtime' in the module, then try again."
            )
        reason = self.failure or (self.errors[-1] if self.errors else "")
        if not crashed and exit_code == EXIT_CASE_FAILED:
            return f"Segmentation failed: {reason or 'see the log for details'}"
        if not crashed and exit_code == EXIT_NOT_RUN:
            return f"mpcl-segment refused to run: {reason or 'invalid arguments'}"
        if self.interrupted or (not crashed and exit_code == EXIT_INTERRUPTED):
            return "Segmentation was interrupted before it finished; nothing was added to the scene."
        if not crashed and exit_code == EXIT_OK:
            return "mpcl-segment finished without reporting a segmentation; see the log for details."
        last = self.tail[-1] if self.tail else "no output"
        code = "no exit code" if exit_code is None else f"exit code {exit_code}"
        return f"The segmentation process stopped unexpectedly ({code}): {last}"


def run_blocking(
    command: Sequence[str],
    monitor: OutputMonitor,
    on_progress: Callable[[Progress], None] | None = None,
    cancel_event: threading.Event | None = None,
    env: dict[str, str] | None = None,
    poll_seconds: float = 0.1,
) -> RunOutcome:
    """Run the child to its end, feeding its output to ``monitor``; setting ``cancel_event`` stops it.

    A reader thread moves lines into a queue so that cancellation is noticed even while the child is
    silent. A cancelled child is terminated, then killed if it has not exited within a few seconds.
    """
    report = on_progress or (lambda progress: None)
    report(monitor.started())
    try:
        process = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=child_environment(env),
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
        )
    except OSError as error:
        return RunOutcome(False, f"Could not start {command[0]}: {error.strerror or error}")
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, name="mpcl-segment-output", daemon=True)
    reader.start()
    cancelled = False
    while True:
        if cancel_event is not None and cancel_event.is_set() and not cancelled:
            cancelled = True
            stop_process(process)
        try:
            line = lines.get(timeout=poll_seconds)
        except queue.Empty:
            continue
        if line is None:
            break
        progress = monitor.feed(line)
        if progress is not None:
            report(progress)
    exit_code = process.wait()
    reader.join()
    return monitor.finish(exit_code, crashed=exit_code < 0, cancelled=cancelled)


def stop_process(process: subprocess.Popen) -> None:
    """Terminate the child, and kill it if it has not exited after a grace period."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(TERMINATE_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
