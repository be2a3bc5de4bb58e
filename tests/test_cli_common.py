"""The five commands share one framework (click), the options that mean the same thing, and exit codes."""

from __future__ import annotations

import signal
import sys

import click
import pytest
from click.testing import CliRunner

import mpcl
from mpcl.cli_common import Terminated, friendly_errors
from mpcl.cli_segment import segment_command, segment_main
from mpcl.errors import InputError


def _commands() -> dict[str, click.Command]:
    pytest.importorskip("torch")
    from mpcl.export.cli import export_main
    from mpcl.training.cli import eval_main, train_main
    from mpcl.training.plan_cli import plan_main

    return {
        "mpcl-train": train_main,
        "mpcl-eval": eval_main,
        "mpcl-export": export_main,
        "mpcl-plan": plan_main,
        "mpcl-segment": segment_command,
    }


def _options(command: click.Command) -> dict[str, click.Option]:
    return {name: param for param in command.params if isinstance(param, click.Option) for name in param.opts}


def test_every_command_is_click_with_help_and_version():
    for name, command in _commands().items():
        assert isinstance(command, click.Command), name
        result = CliRunner().invoke(command, ["--version"])
        assert result.exit_code == 0 and result.output.strip() == f"mpcl {mpcl.__version__}", name
        assert CliRunner().invoke(command, ["-h"]).exit_code == 0, name


def test_shared_options_have_one_name_and_one_type():
    commands = _commands()
    threads = [name for name, command in commands.items() if "--threads" in _options(command)]
    assert threads == ["mpcl-train", "mpcl-eval", "mpcl-export", "mpcl-segment"]
    progress = [name for name, command in commands.items() if "--no-progress" in _options(command)]
    assert progress == ["mpcl-train", "mpcl-eval", "mpcl-export", "mpcl-plan"]
    for name in ("mpcl-train", "mpcl-eval", "mpcl-export", "mpcl-segment"):
        assert (
            _options(commands[name])["--threads"].type is _options(commands["mpcl-segment"])["--threads"].type
        )
        assert "-o" in _options(commands[name]), name
    for option in ("--backend", "--precision", "--device", "--model"):
        eval_choices = getattr(_options(commands["mpcl-eval"])[option].type, "choices", None)
        segment_choices = getattr(_options(commands["mpcl-segment"])[option].type, "choices", None)
        if option in ("--backend", "--precision"):
            assert list(eval_choices) == list(segment_choices), option


@pytest.mark.parametrize("command", ["mpcl-train", "mpcl-eval", "mpcl-export"])
def test_threads_must_be_positive_everywhere(command):
    result = CliRunner().invoke(_commands()[command], ["--threads", "0"])
    assert result.exit_code == 2 and "expected a positive whole number, got 0" in result.output


def test_segment_main_parses_like_before(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as stop:
        segment_main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"mpcl {mpcl.__version__}"
    with pytest.raises(SystemExit) as stop:
        segment_main([str(tmp_path / "a.nii.gz"), "--model", str(tmp_path)])  # no -o
    assert stop.value.code == 2 and "Missing option '-o' / '--output'" in capsys.readouterr().err
    # a list: the code comes back; nothing to load is exit 2 before any case
    code = segment_main(
        [str(tmp_path / "a.nii.gz"), "-o", str(tmp_path / "s.nii.gz"), "--model", str(tmp_path)]
    )
    assert code == 2 and "Error: " in capsys.readouterr().err
    # None (the console script): sys.argv, and sys.exit with the code
    argv = [
        "mpcl-segment",
        str(tmp_path / "a.nii.gz"),
        "-o",
        str(tmp_path / "s.nii.gz"),
        "--model",
        str(tmp_path),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        segment_main()
    assert stop.value.code == 2


@pytest.mark.parametrize(
    ("raised", "code", "message"),
    [
        (InputError("scan.nii.gz: file or folder does not exist"), 2, "Error: scan.nii.gz: file or folder"),
        (KeyboardInterrupt(), 130, "Interrupted."),
        (Terminated(), 143, "Interrupted."),
    ],
)
def test_errors_and_interruptions_map_to_one_set_of_exit_codes(raised, code, message):
    @click.command()
    @friendly_errors
    def command():
        raise raised

    result = CliRunner().invoke(command, [])
    assert result.exit_code == code and message in result.output


def test_sigterm_raises_terminated_while_a_command_runs_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)

    @click.command()
    @friendly_errors
    def command():
        signal.raise_signal(signal.SIGTERM)

    result = CliRunner().invoke(command, [])
    assert result.exit_code == 143 and "Interrupted." in result.output
    assert signal.getsignal(signal.SIGTERM) == before
