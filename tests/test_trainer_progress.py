"""What a user watches while training: the progress bar's numbers and log lines printed above the bar."""

from __future__ import annotations

import logging
import sys

import pytest
from tqdm import tqdm

from mpcl.training import trainer as trainer_module
from mpcl.training.data.loading import load_data


@pytest.mark.slow
def test_bar_shows_each_validation_at_once_and_logs_go_above_it(tiny_config, monkeypatch):
    events: list[tuple[str, object]] = []

    class RecordingBar(tqdm):
        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            events.append(("postfix", dict(ordered_dict or {}, **kwargs)))
            super().set_postfix(ordered_dict, refresh, **kwargs)

    monkeypatch.setattr(trainer_module, "tqdm", RecordingBar)
    config = tiny_config("supervised", iterations=6)  # validations after steps 3 and 6, a log every step
    trainer = trainer_module.Trainer(config, load_data(config.data))
    validate = trainer.validate

    def recording_validate(iteration):
        handlers = [type(handler).__name__ for handler in logging.root.handlers]
        dice = validate(iteration)
        events.append(("validate", (f"{max(trainer.best_dice, 0):.3f}", handlers)))
        return dice

    trainer.validate = recording_validate
    # only this test's console handler (earlier tests may leave handlers on streams pytest captured)
    monkeypatch.setattr(logging.root, "handlers", [])
    console = logging.StreamHandler(sys.stderr)
    logging.root.addHandler(console)
    try:
        trainer.fit(progress=True)
        assert console in logging.root.handlers  # the console handler is back once the bar is gone
    finally:
        logging.root.removeHandler(console)

    validations = [index for index, (kind, _) in enumerate(events) if kind == "validate"]
    assert len(validations) == 2
    for index in validations:
        best, handlers = events[index][1]
        kind, postfix = events[index + 1]  # the bar shows this validation's best before the next step
        assert kind == "postfix" and postfix["best_dice"] == best and "loss" in postfix
        assert "_TqdmLoggingHandler" in handlers and "StreamHandler" not in handlers
