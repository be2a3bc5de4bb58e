import math

import pytest
import torch

from mpcl.training.data.loading import load_data
from mpcl.training.methods import StepInfo
from mpcl.training.methods.mean_teacher import MeanTeacherParams, consistency_weight
from mpcl.training.trainer import Trainer


def _one_step_terms(config):
    trainer = Trainer(config, load_data(config.data))
    batch = trainer.batches(0)
    return trainer, trainer.method.training_step(batch, trainer.models, StepInfo(0, config.train.iterations))


def test_supervised_returns_only_supervised_term_and_ignores_unlabelled(tiny_config):
    trainer, terms = _one_step_terms(tiny_config("supervised"))
    assert set(terms) == {"supervised"}
    assert trainer.batches(0).unlabeled_image.shape[0] == 0  # no unlabelled data is even prepared
    assert trainer.models.teacher is None


def test_mean_teacher_terms_and_gradients(tiny_config):
    trainer, terms = _one_step_terms(tiny_config("mean_teacher", consistency_start=0, consistency=1.0))
    assert set(terms) == {"supervised", "consistency"}
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["consistency"].item() > 0
    terms["consistency"].backward()
    grads = [p.grad for p in trainer.models.student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in trainer.models.teacher.parameters())


def test_consistency_is_off_before_start_and_ramps_to_lambda():
    params = MeanTeacherParams(consistency=0.1, consistency_start=10, rampup_iterations=100, rampup_step=1)
    assert consistency_weight(params, StepInfo(9, 1000)) == 0.0
    assert (
        0
        < consistency_weight(params, StepInfo(10, 1000))
        < consistency_weight(params, StepInfo(60, 1000))
        < 0.1
    )
    assert consistency_weight(params, StepInfo(100, 1000)) == 0.1
    default_ramp = MeanTeacherParams(consistency=0.1, consistency_start=0, rampup_step=1)
    assert consistency_weight(default_ramp, StepInfo(999, 1000)) < 0.1  # whole run by default, as SSL4MIS


def test_consistency_ramp_moves_in_ssl4mis_epochs():
    """SSL4MIS: consistency · sigmoid_rampup(iter_num // 150, 200), i.e. 0.1·exp(−5(1 − ⌊t/150⌋/200)²)."""
    params = MeanTeacherParams(consistency=0.1, consistency_start=1000)
    for t in (1000, 1149, 1150, 15_000, 29_999):
        expected = 0.1 * math.exp(-5 * (1 - min((t // 150) / 200, 1)) ** 2)
        assert consistency_weight(params, StepInfo(t, 30_000)) == pytest.approx(expected, rel=1e-12)
    assert consistency_weight(params, StepInfo(1000, 30_000)) == consistency_weight(
        params, StepInfo(1049, 30_000)
    )


def test_deep_supervision_term_when_enabled(tiny_config):
    config = tiny_config("supervised", deep_supervision_weight=0.5)
    config.model.deep_supervision = True
    _, terms = _one_step_terms(config)
    assert set(terms) == {"supervised", "deep_supervision"} and terms["deep_supervision"].item() > 0
