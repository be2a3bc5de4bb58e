"""Running ``mpcl-segment`` in a child process, following what it prints, and stopping its whole tree.

Inference runs outside Slicer's process (a crash or a runaway GPU allocation cannot take Slicer down,
and the GUI never waits on it). The command line, the output parser and the process-tree handling here
are shared by the two ways of running the child: :func:`run_blocking` (subprocess; tests and the module
self-test) and the module widget's non-blocking ``qt.QProcess``. Nothing here imports slicer, vtk or Qt.

**How the child is started.** In Slicer the program started is the ``PythonSlicer`` launcher, which
starts the real Python as *its* child; killing the launcher leaves that Python running. So the command
is ``PYTHON -c BOOTSTRAP mpcl.cli_segment ARGS...``: the bootstrap (:data:`BOOTSTRAP`) makes the Python
process the leader of a new process group (POSIX), prints its PID, then runs the module as
``__main__``. Cancel (:func:`terminate_tree`) signals that group (the child and anything it started)
and every process below the launcher: SIGTERM (``mpcl-segment`` then stops cleanly, writing nothing),
SIGKILL after a grace period, and waits until none of them is left. On Windows, ``taskkill /T /F``
stops the launcher's and the child's trees.

**Line protocol** (child -> module; stdout and stderr merged, one line each):

* ``@mpcl pid PID``: the bootstrap, before anything else: the PID of the Python child, leader of its
  process group;
* ``@mpcl progress FRACTION MESSAGE``: a step forward, ``FRACTION`` in [0, 1] (the bootstrap prints
  one while the runtime loads; ``mpcl-segment --progress-lines`` prints one per batch of slices);
* ``INFO mpcl.segment: backend: NAME on DEVICE (DETAIL)`` once the network is loaded, after
  ``... backend: skipped NAME on DEVICE: REASON; ...`` when faster choices could not be used;
* ``[i/n] done NAME -> PATH (S s, BACKEND)``, ``[i/n] failed SOURCE: REASON`` or
  ``[i/n] interrupted SOURCE; ...`` per case (stdout);
* ``Error: MESSAGE`` for refused runs;

and the exit code: 0 (written), 1 (case failed), 2 (nothing run: bad model package or arguments),
130 (interrupted) or 143 (terminated). Lines starting with ``@mpcl`` are protocol, every other line is
shown to the user as the log.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEGMENT_MODULE = "mpcl.cli_segment"
BACKENDS = ("auto", "onnxruntime", "openvino", "torch", "tensorrt")
DEVICES = ("auto", "cpu", "cuda")
EXIT_OK, EXIT_CASE_FAILED, EXIT_NOT_RUN, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
TERMINATE_GRACE_SECONDS = 3.0  # SIGTERM first, so mpcl-segment removes what it was writing
KILL_WAIT_SECONDS = 5.0  # after SIGKILL, how long to wait for the processes to disappear
PROTOCOL_PREFIX = "@mpcl "

# Run by the child's Python as ``python -c BOOTSTRAP MODULE ARGS...``: a process group of its own (unless
# it leads one already), its PID announced, then MODULE as __main__ with ARGS as its command line. One
# line without double quotes, so it passes unchanged through QProcess, the PythonSlicer launcher and
# Windows command-line quoting; Python 3.9-compatible.
BOOTSTRAP = (
    "import os, runpy, sys; "
    "hasattr(os, 'setpgid') and os.getpid() != os.getpgrp() and os.setpgid(0, 0); "
    "print('@mpcl pid %d' % os.getpid(), flush=True); "
    "print('@mpcl progress 0.05 Loading the mpcl runtime and the model...', flush=True); "
    "sys.argv = sys.argv[1:]; "
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)

_CASE_LINE = re.compile(r"^\[(?P<index>\d+)/(?P<total>\d+)\] (?P<state>done|failed|interrupted) (?P<rest>.*)")
_DONE_TAIL = re.compile(r"\((?P<seconds>[0-9.]+) s, (?P<backend>[^)]+)\)$")
_BACKEND_LINE = re.compile(r"backend: (?P<backend>\S+) on (?P<device>\S+)(?: \((?P<detail>.*)\))?$")
_ERROR_LINE = re.compile(r"^Error: (?P<message>.*)$")
_MISSING_RUNTIME = re.compile(r"No module named '?mpcl")
_SKIPPED_LINE = re.compile(r"backend: skipped (?P<reasons>.*)$")
_PID_LINE = re.compile(r"^@mpcl pid (?P<pid>\d+)$")
_PROGRESS_LINE = re.compile(r"^@mpcl progress (?P<fraction>[0-9]*\.?[0-9]+) (?P<message>.*)$")


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
    """The ``mpcl-segment`` command line for one volume (``mpcl.cli_segment`` run by :data:`BOOTSTRAP`)."""
    arguments = [
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
        "--progress-lines",
    ]
    if options.tta:
        arguments.append("--tta")
    if options.uncertainty:
        arguments.append("--uncertainty")
    return child_command(python, SEGMENT_MODULE, arguments)


def child_command(python: str, module: str, arguments: Sequence[str]) -> list[str]:
    """``python -c BOOTSTRAP module arguments...``: ``module`` run as __main__ in its own process group."""
    return [str(python), "-c", BOOTSTRAP, module, *(str(argument) for argument in arguments)]


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
    """Follows the child's merged stdout/stderr, line by line, and turns its ending into a RunOutcome.

    ``requested_device``: what the user asked for; when it is ``auto`` and the run ends on the CPU, the
    outcome says so (and why the GPU was not used, when the child said), never silently.
    """

    def __init__(self, log_lines: int = 30, requested_device: str = "auto") -> None:
        self.requested_device = requested_device
        self.backend = ""
        self.device = ""
        self.detail = ""
        self.skipped = ""
        self.seconds: float | None = None
        self.done = False
        self.failure = ""
        self.errors: list[str] = []
        self.interrupted = False
        self.child_pid: int | None = None
        self.tail: deque[str] = deque(maxlen=log_lines)

    def started(self) -> Progress:
        return Progress(0.02, "Starting the mpcl runtime...")

    @staticmethod
    def is_protocol(line: str) -> bool:
        """Lines for the module, not for the user's log (``@mpcl pid``, ``@mpcl progress``)."""
        return line.startswith(PROTOCOL_PREFIX)

    def feed(self, line: str) -> Progress | None:
        """Read one output line; return a Progress when it moves the run forward."""
        line = line.rstrip("\r\n")
        if not line.strip():
            return None
        if self.is_protocol(line):
            return self._protocol_line(line)
        self.tail.append(line)
        case = _CASE_LINE.match(line)
        if case:
            return self._case_line(case)
        error = _ERROR_LINE.match(line)
        if error:
            self.errors.append(error.group("message"))
            return None
        skipped = _SKIPPED_LINE.search(line)
        if skipped and "mpcl" in line:
            self.skipped = skipped.group("reasons")
            return None
        backend = _BACKEND_LINE.search(line)
        if backend and "mpcl" in line:
            self.backend, self.device = backend.group("backend"), backend.group("device")
            self.detail = backend.group("detail") or ""
            return Progress(0.2, f"Segmenting with {self.backend} on {self.device}...")
        return None

    def _protocol_line(self, line: str) -> Progress | None:
        pid = _PID_LINE.match(line)
        if pid:
            self.child_pid = int(pid.group("pid"))
            return None
        progress = _PROGRESS_LINE.match(line)
        if progress:
            fraction = min(max(float(progress.group("fraction")), 0.0), 1.0)
            return Progress(fraction, progress.group("message"))
        return None

    def _case_line(self, case: re.Match) -> Progress | None:
        state, rest = case.group("state"), case.group("rest")
        index, total = int(case.group("index")), max(int(case.group("total")), 1)
        if state == "done":
            self.done = True
            tail = _DONE_TAIL.search(rest)
            if tail:
                self.seconds = float(tail.group("seconds"))
                self.backend = self.backend or tail.group("backend")
            if index >= total:
                return Progress(1.0, "Segmentation computed; loading it into the scene...")
            return Progress(0.2 + 0.8 * index / total, f"Segmented case {index} of {total}...")
        if state == "failed":
            self.failure = rest.split(": ", 1)[1] if ": " in rest else rest
            return None
        self.interrupted = True
        return None

    def device_note(self) -> str:
        """One sentence on where the run went when the user let ``auto`` choose, or "" otherwise."""
        if not self.device:
            return "The segmentation process did not report which device it used."
        if self.requested_device == "auto" and self.device == "cpu":
            why = f" ({self.skipped})" if self.skipped else ""
            return f"Device auto: no usable GPU was found, so the CPU was used{why}."
        return ""

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
            message = f"Segmented with {self.backend or 'mpcl'}{where}{took}."
            note = self.device_note()
            return RunOutcome(True, f"{message} {note}" if note else message, **common)
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
        stopped = exit_code in (EXIT_INTERRUPTED, EXIT_TERMINATED)
        if self.interrupted or (not crashed and stopped):
            return "Segmentation was interrupted before it finished; nothing was added to the scene."
        if not crashed and exit_code == EXIT_OK:
            return "mpcl-segment finished without reporting a segmentation; see the log for details."
        last = self.tail[-1] if self.tail else "no output"
        code = "no exit code" if exit_code is None else f"exit code {exit_code}"
        return f"The segmentation process stopped unexpectedly ({code}): {last}"


# -- the child's process tree -----------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessInfo:
    """One row of the process table: PID, parent PID, process group and state (``Z``: a zombie)."""

    pid: int
    ppid: int
    pgid: int
    state: str


def _proc_table(proc: Path) -> list[ProcessInfo]:
    rows = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text(encoding="utf-8", errors="replace")
        except OSError:  # exited meanwhile
            continue
        fields = text[text.rfind(")") + 2 :].split()  # after "pid (command name)"
        if len(fields) >= 3:
            rows.append(ProcessInfo(int(entry.name), int(fields[1]), int(fields[2]), fields[0]))
    return rows


def _ps_table() -> list[ProcessInfo]:
    output = subprocess.run(
        ["ps", "-A", "-o", "pid=", "-o", "ppid=", "-o", "pgid=", "-o", "stat="],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = []
    for line in output.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0].isdigit():
            rows.append(ProcessInfo(int(fields[0]), int(fields[1]), int(fields[2]), fields[3][:1]))
    return rows


def process_table() -> list[ProcessInfo]:
    """Every process of this machine: from /proc on Linux, from ``ps`` on macOS; empty on Windows,
    where :func:`terminate_tree` uses ``taskkill /T``, which returns once the tree is stopped."""
    if os.name == "nt":
        return []
    proc = Path("/proc")
    if (proc / "self" / "stat").is_file():
        return _proc_table(proc)
    return _ps_table()


def descendants(pid: int, table: Iterable[ProcessInfo]) -> set[int]:
    """The PIDs of every process below ``pid`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for row in table:
        children.setdefault(row.ppid, []).append(row.pid)
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def running(pids: Iterable[int], groups: Iterable[int], table: Iterable[ProcessInfo]) -> set[int]:
    """Which of ``pids``, and of the members of process groups ``groups``, still run (zombies do not:
    they have exited and only wait for their parent to collect the exit status)."""
    pids, groups = set(pids), set(groups)
    return {row.pid for row in table if row.state != "Z" and (row.pid in pids or row.pgid in groups)}


def _send(pids: Iterable[int], groups: Iterable[int], signum: int) -> None:
    for group in groups:
        try:
            os.killpg(group, signum)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def wait_until_gone(
    pids: Iterable[int],
    groups: Iterable[int],
    timeout: float,
    table: Callable[[], list[ProcessInfo]] = process_table,
    poll_seconds: float = 0.05,
) -> bool:
    """Wait until none of ``pids`` and no member of ``groups`` runs; False if some still do at ``timeout``."""
    pids, groups = set(pids), set(groups)
    deadline = time.monotonic() + timeout
    while True:
        if not running(pids, groups, table()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_seconds)


def _taskkill(pids: Iterable[int | None], run: Callable[..., Any]) -> bool:
    for pid in pids:
        if pid:
            run(
                ["taskkill", "/PID", str(pid), "/T", "/F"],
                capture_output=True,
                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
                check=False,
            )
    return True


def terminate_tree(
    root_pid: int | None,
    child_pid: int | None,
    grace: float = TERMINATE_GRACE_SECONDS,
    is_windows: bool = os.name == "nt",
    run: Callable[..., Any] = subprocess.run,
    table: Callable[[], list[ProcessInfo]] = process_table,
) -> bool:
    """Stop everything a run started and wait until it is gone; True once nothing of it runs.

    ``root_pid``: the program started (the PythonSlicer launcher, or Python itself); ``child_pid``: the
    Python child from the ``@mpcl pid`` line, leader of its own process group (None if not yet known).
    POSIX: SIGTERM to the child's group, to every process below the launcher and to the launcher (the
    runtime then stops cleanly); SIGKILL to what is left after ``grace`` seconds. Windows (no process
    groups): ``taskkill /T /F`` on the launcher's and the child's trees.
    """
    if is_windows:
        return _taskkill((child_pid, root_pid), run)
    groups = {child_pid} if child_pid else set()
    pids: set[int] = set()
    if root_pid:
        pids = descendants(root_pid, table()) | {root_pid}
    if child_pid:
        pids |= descendants(child_pid, table())
    _send(pids, groups, signal.SIGTERM)
    if wait_until_gone(pids, groups, grace, table):
        return True
    # Whatever started meanwhile below them is taken too.
    current = table()
    for pid in list(pids):
        pids |= descendants(pid, current)
    _send(pids, groups, signal.SIGKILL)
    return wait_until_gone(pids, groups, KILL_WAIT_SECONDS, table)


def run_blocking(
    command: Sequence[str],
    monitor: OutputMonitor,
    on_progress: Callable[[Progress], None] | None = None,
    cancel_event: threading.Event | None = None,
    env: dict[str, str] | None = None,
    poll_seconds: float = 0.1,
    on_line: Callable[[str], None] | None = None,
) -> RunOutcome:
    """Run the child to its end, feeding its output to ``monitor``; setting ``cancel_event`` stops it.

    A reader thread moves lines into a queue so that cancellation is noticed even while the child is
    silent. Cancelling stops the whole process tree (:func:`terminate_tree`) and returns only once it is
    gone, so the caller may delete the work folder. ``on_line`` receives every line meant for the user
    (not the ``@mpcl`` protocol lines).
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
    stopped_pid = None
    while True:
        if cancel_event is not None and cancel_event.is_set() and not cancelled:
            cancelled = True
            stopped_pid = monitor.child_pid
            terminate_tree(process.pid, monitor.child_pid)
        try:
            line = lines.get(timeout=poll_seconds)
        except queue.Empty:
            continue
        if line is None:
            break
        progress = monitor.feed(line)
        if cancelled and monitor.child_pid != stopped_pid:  # announced after the cancel: stop it too
            stopped_pid = monitor.child_pid
            terminate_tree(None, monitor.child_pid)
        if on_line is not None and not monitor.is_protocol(line):
            on_line(line.rstrip("\r\n"))
        if progress is not None:
            report(progress)
    exit_code = process.wait()
    reader.join()
    if monitor.child_pid:  # the launcher may exit before its child: return once the child is gone too
        wait_until_gone((), (monitor.child_pid,), KILL_WAIT_SECONDS)
    return monitor.finish(exit_code, crashed=exit_code < 0, cancelled=cancelled)
