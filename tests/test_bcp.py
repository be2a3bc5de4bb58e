import pytest
import torch

from mpcl.errors import ConfigError
from mpcl.training.config import config_from_dict
from mpcl.training.data.loading import load_data
from mpcl.training.losses.dice import ce_dice_loss
from mpcl.training.losses.mixing import largest_component_per_class, paste, random_box_mask
from mpcl.training.methods import StepInfo
from mpcl.training.trainer import Trainer
from tests.conftest import tiny_config_dict


def test_box_mask_has_the_requested_size():
    torch.manual_seed(0)
    mask = random_box_mask((30, 24), 2 / 3)
    assert mask.sum().item() == 20 * 16
    rows, cols = torch.nonzero(mask, as_tuple=True)
    assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 == 16


def test_paste_takes_inside_from_the_first_and_outside_from_the_second():
    mask = torch.zeros(4, 4)
    mask[1:3, 1:3] = 1
    images = paste(torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), mask)
    assert torch.equal(images[:, 0], mask.expand(2, 4, 4))
    labels = paste(torch.full((2, 4, 4), 3), torch.full((2, 4, 4), 1), mask)
    assert labels.dtype == torch.int64
    assert torch.equal(labels[0], torch.where(mask.bool(), 3, 1))


def test_largest_component_keeps_one_blob_per_class():
    labels = torch.zeros(1, 10, 10, dtype=torch.long)
    labels[0, 0:2, 0:2] = 1  # small island of class 1
    labels[0, 5:9, 5:9] = 1  # large blob of class 1
    labels[0, 0:3, 7:10] = 2  # single blob of class 2
    cleaned = largest_component_per_class(labels, 4)
    assert cleaned[0, 0:2, 0:2].sum() == 0
    assert (cleaned[0, 5:9, 5:9] == 1).all() and (cleaned[0, 0:3, 7:10] == 2).all()


def test_zero_weight_pixels_do_not_affect_the_loss():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 8, 8)
    target = torch.randint(0, 4, (1, 8, 8))
    weight = torch.ones(1, 8, 8)
    weight[:, :4] = 0
    changed = logits.clone()
    changed[:, :, :4] = torch.randn(1, 4, 4, 8) * 5
    assert ce_dice_loss(logits, target, weight) == pytest.approx(ce_dice_loss(changed, target, weight).item())
    assert ce_dice_loss(logits, target, torch.ones_like(weight)) != pytest.approx(
        ce_dice_loss(changed, target, torch.ones_like(weight)).item()
    )


def test_bcp_stages_and_teacher_reset(tmp_path):
    config = config_from_dict(tiny_config_dict(tmp_path, "bcp", iterations=6, pretrain_iterations=2))
    trainer = Trainer(config, load_data(config.data))
    terms = trainer.method.training_step(trainer.batches(0), trainer.models, StepInfo(0, 6))
    assert set(terms) == {"copy_paste_labeled"}
    trainer.fit(stop_at=2, progress=False)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(trainer.models.teacher.parameters(), trainer.models.student.parameters(), strict=True)
    )
    trainer.start_stage(2)  # what fit does before iteration 2
    for teacher, student in zip(
        trainer.models.teacher.parameters(), trainer.models.student.parameters(), strict=True
    ):
        assert torch.equal(teacher, student)  # self-training starts from the pre-trained student
    terms = trainer.method.training_step(trainer.batches(2), trainer.models, StepInfo(2, 6))
    assert set(terms) == {"copy_paste_bidirectional"}
    terms["copy_paste_bidirectional"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.models.student.parameters())


def test_bcp_refuses_unequal_or_odd_batches(tmp_path):
    data = tiny_config_dict(tmp_path, "bcp")
    data["train"]["labeled_batch"] = 3
    data["train"]["unlabeled_batch"] = 3
    with pytest.raises(ConfigError, match="bcp needs train.labeled_batch even"):
        config_from_dict(data)
