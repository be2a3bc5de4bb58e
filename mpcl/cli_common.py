"""What the command-line entry points share: click settings, options that mean the same thing in every
command, and one mapping of errors and interruptions to exit codes.

Exit codes, for every command: 0 done; 1 done in part (a case failed, an artefact was refused, a
dataset has defects); 2 nothing done, with one sentence (``Error: …``) naming the file or key; 130
interrupted by Ctrl-C and 143 by SIGTERM (handled like Ctrl-C, so nothing half-written is left behind).
A traceback means a bug.

Part of the runtime (click is a runtime dependency): ``mpcl-segment`` uses it without torch, and the
training and export commands import it rather than each other.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

import mpcl
from mpcl.errors import MPCLError
from mpcl.io import write_failure_reason

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}
PRECISION_CHOICES = ("auto", "fp32", "fp16", "int8", "bf16")
EXIT_OK, EXIT_PARTIAL, EXIT_NOTHING_DONE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143

F = TypeVar("F", bound=Callable[..., Any])


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is (see :func:`sigterm_as_interrupt`), so that what is being
    written is cleaned up exactly as for Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main thread; the
    previous handler is put back afterwards. Outside the main thread nothing changes (Python only
    delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_exit_code(stop: KeyboardInterrupt) -> int:
    """143 for SIGTERM (:class:`Terminated`), 130 for Ctrl-C."""
    return EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED


def friendly_errors(function: F) -> F:
    """Decorate a click command's function so that errors the user can fix end it with one sentence.

    An :class:`~mpcl.errors.MPCLError`, or an OSError from writing a file (disk full, read-only, no
    permission), prints ``Error: <sentence>`` to stderr and exits with 2; any other exception is a bug
    and keeps its traceback. Ctrl-C exits with 130 and SIGTERM (turned into :class:`Terminated` while
    the command runs) with 143, after ``Interrupted.`` on stderr.
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with sigterm_as_interrupt():
                return function(*args, **kwargs)
        except MPCLError as error:
            click.echo(f"Error: {error}", err=True)
            sys.exit(EXIT_NOTHING_DONE)
        except OSError as error:
            reason = write_failure_reason(error)
            if reason is None or error.filename is None:
                raise  # not the disk or permissions: a bug, keep the traceback
            click.echo(f"Error: {error.filename}: cannot be written ({reason})", err=True)
            sys.exit(EXIT_NOTHING_DONE)
        except KeyboardInterrupt as stop:
            click.echo("Interrupted.", err=True)
            sys.exit(interrupt_exit_code(stop))

    return wrapper  # type: ignore[return-value]


class PositiveInt(click.ParamType):
    """A whole number >= 1 (threads, batch sizes); anything else is refused with one sentence."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(str(value).strip())
            except ValueError:
                self.fail(f"expected a positive whole number, got {value!r}", param, ctx)
        if number < 1:
            self.fail(f"expected a positive whole number, got {number}", param, ctx)
        return number


POSITIVE_INT = PositiveInt()


def version_option() -> Callable[[F], F]:
    """``--version``: prints ``mpcl <version>`` and exits."""
    return click.version_option(
        mpcl.__version__, "--version", prog_name="mpcl", message="%(prog)s %(version)s"
    )


def threads_option(help_text: str) -> Callable[[F], F]:
    """``--threads N``: CPU threads, a positive whole number (default: the library's, usually all cores)."""
    return click.option("--threads", type=POSITIVE_INT, help=help_text)


def no_progress_option(help_text: str = "Hide progress bars.") -> Callable[[F], F]:
    """``--no-progress``: no progress bars (log lines and results are still printed)."""
    return click.option("--no-progress", is_flag=True, help=help_text)
