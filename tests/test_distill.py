"""Distillation is the ``distill`` method of the one Trainer: it resumes exactly and writes the logs."""

from __future__ import annotations

import csv

import pytest
import torch

from tests.conftest import straight_and_resumed


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from tests.export_helpers import train_tiny_checkpoint

    return train_tiny_checkpoint(tmp_path_factory.mktemp("teacher"), steps=20)


def _distill_trainer(teacher, tmp_path, subdir):
    from mpcl.export.distill import distill_config_dict
    from mpcl.nn.checkpoint import load_checkpoint
    from mpcl.training.config import config_from_dict
    from mpcl.training.data.loading import load_data
    from mpcl.training.trainer import Trainer

    stored = load_checkpoint(teacher)["config"]
    yaml_content = {
        "seed": 3,
        "model": {"channels": [2, 4, 4, 8, 8]},
        "train": {
            "iterations": 4,
            "labeled_batch": 2,
            "unlabeled_batch": 2,
            "val_every": 2,
            "checkpoint_every": 2,
            "log_every": 1,
            "device": "cpu",
        },
        "method": {"params": {"temperature": 2.0}},
    }
    config = config_from_dict(distill_config_dict(yaml_content, stored, teacher, tmp_path / subdir))
    return Trainer(config, load_data(config.data), tmp_path / subdir)


def test_distillation_resumes_exactly_and_writes_its_logs(teacher, tmp_path):
    straight, resumed = straight_and_resumed(
        lambda subdir: _distill_trainer(teacher, tmp_path, subdir), tmp_path, stop_at=2
    )
    for name, value in straight.models.student.state_dict().items():
        assert torch.equal(value, resumed.models.student.state_dict()[name]), name
    assert straight.best_dice == resumed.best_dice and straight.best_iteration == resumed.best_iteration
    for log in ("train_log.csv", "val_log.csv"):
        with (tmp_path / "straight" / log).open() as a, (tmp_path / "interrupted" / log).open() as b:
            assert list(csv.DictReader(a)) == list(csv.DictReader(b))
    with (tmp_path / "straight" / "train_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["iteration"]) for row in rows] == [1, 2, 3, 4]
    assert {"loss_kd", "loss_dice", "lr"} <= set(rows[0])
    with (tmp_path / "straight" / "val_log.csv").open() as handle:
        assert [int(row["iteration"]) for row in csv.DictReader(handle)] == [2, 4]
    assert (tmp_path / "straight" / "best.pt").is_file()


def test_distill_loss_is_the_weighted_kd_and_dice(teacher):
    from mpcl.training.losses.dice import soft_dice_loss
    from mpcl.training.methods.distill import DistillParams, distillation_terms

    torch.manual_seed(0)
    student, teacher_logits = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    labels = torch.randint(0, 4, (2, 8, 8))
    params = DistillParams(temperature=3.0, kd_weight=0.5, dice_weight=2.0)
    terms = distillation_terms(student, teacher_logits, labels, params)
    p_teacher = torch.softmax(teacher_logits / 3, 1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(student / 3, 1))).sum(1).mean() * 9
    assert terms["kd"] == pytest.approx(0.5 * kl.item(), rel=1e-5)
    dice = soft_dice_loss(torch.softmax(student[:2], 1), labels)
    assert terms["dice"] == pytest.approx(2.0 * dice.item(), rel=1e-6)
