"""``train.compile``: the step's networks through ``torch.compile``; the eager modules serve the rest.

With dynamo's ``eager`` backend (tracing without code generation, seconds) a compiled step is the eager
step bit for bit, dropout included, for a plain and a copy-paste prototype method, and a compiled run
resumes exactly; checkpoints keep the eager state-dict keys. One slow test compiles with inductor (the
real backend): its losses are eager's without dropout, and with dropout a run resumes exactly.
"""

from __future__ import annotations

import pytest
import torch

from mpcl.nn.checkpoint import load_checkpoint
from mpcl.training import compilation
from mpcl.training.compilation import CompiledNetwork
from mpcl.training.data.loading import load_data
from mpcl.training.trainer import Trainer
from tests.conftest import straight_and_resumed
from tests.test_precision import _config


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _trainer(tmp_path, name: str, compile: bool, subdir: str, iterations: int = 4, **model) -> Trainer:
    config = _config(tmp_path, name, iterations=iterations, subdir=subdir, **model)
    config.train.compile = compile
    return Trainer(config, load_data(config.data))


def _losses(trainer: Trainer, steps: int = 3) -> list[float]:
    return [float(trainer.train_step(i, trainer.batches(i))[0]) for i in range(steps)]


@pytest.mark.parametrize("name", ["supervised", "mpcl_bcp"])
def test_a_compiled_step_is_the_eager_step(tmp_path, monkeypatch, name):
    monkeypatch.setattr(compilation, "BACKEND", "eager")
    eager = _trainer(tmp_path, name, False, "eager")
    expected = _losses(eager)
    compiled = _trainer(tmp_path, name, True, "compiled")
    assert isinstance(compiled.step_models.student, CompiledNetwork)
    assert compiled._begin_step(0) is compiled.step_models
    if compiled.models.teacher is not None:
        assert isinstance(compiled.step_models.teacher, CompiledNetwork)
    assert _losses(compiled) == expected
    for got, want in zip(
        compiled.models.student.parameters(), eager.models.student.parameters(), strict=True
    ):
        assert torch.equal(got, want)
    saved = load_checkpoint(compiled.save("latest.pt", 3))
    assert saved["student"].keys() == eager.models.student.state_dict().keys()  # no "_orig_mod." prefix
    assert saved["config"]["train"]["compile"] is True


def test_a_compiled_run_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(compilation, "BACKEND", "eager")
    straight, resumed = straight_and_resumed(lambda subdir: _trainer(tmp_path, "bcp", True, subdir), tmp_path)
    for got, want in zip(
        resumed.models.student.parameters(), straight.models.student.parameters(), strict=True
    ):
        assert torch.equal(got, want)


@pytest.mark.slow
def test_inductor_compiled_steps_match_eager_without_dropout_and_resume_exactly_with_it(tmp_path):
    eager = _losses(_trainer(tmp_path, "supervised", False, "eager", dropout=[0.0] * 5))
    compiled = _losses(_trainer(tmp_path, "supervised", True, "compiled", dropout=[0.0] * 5))
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert compiled[-1] < compiled[0]  # it trains
    # with dropout: inductor's own random stream, restored with the checkpoint's generator state
    straight, resumed = straight_and_resumed(
        lambda subdir: _trainer(tmp_path / "dropout", "supervised", True, subdir), tmp_path / "dropout"
    )
    for got, want in zip(
        resumed.models.student.parameters(), straight.models.student.parameters(), strict=True
    ):
        assert torch.equal(got, want)
