import pytest
import torch

from mpcl.errors import ConfigError
from mpcl.nn.checkpoint import load_checkpoint
from mpcl.training.config import config_from_dict
from mpcl.training.data.batches import Batch
from mpcl.training.data.loading import load_data
from mpcl.training.losses.dice import ce_dice_loss
from mpcl.training.losses.mixing import (
    largest_component_per_class,
    mix_images,
    mix_loss,
    outer_box_mask,
    random_box_mask,
)
from mpcl.training.methods import Models, StepInfo
from mpcl.training.methods.bcp import BCPParams, copy_paste_loss, copy_paste_step, run_per_input
from mpcl.training.trainer import Trainer
from tests.conftest import tiny_config_dict


def test_box_mask_has_the_requested_size():
    torch.manual_seed(0)
    mask = random_box_mask((30, 24), 2 / 3)
    assert mask.sum().item() == 20 * 16
    rows, cols = torch.nonzero(mask, as_tuple=True)
    assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 == 16


def test_mix_images_takes_outside_from_the_first_and_the_box_from_the_second():
    mask = torch.ones(4, 4)
    mask[1:3, 1:3] = 0
    images = mix_images(torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4), mask)
    assert torch.equal(images[:, 0], (1 - mask).expand(2, 4, 4))


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


@pytest.mark.slow
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


# -- BCP's published formulas, transcribed from its ACDC script into plain loops --------------------
def _bcp_dice_loss(probabilities, target, mask, n_classes=4):
    """BCP ``DiceLoss.forward(probs, target[:, None], mask[:, None])``: a loop over classes."""
    loss = 0.0
    for c in range(n_classes):
        score, one_hot = probabilities[:, c], (target == c).float()
        intersect = torch.sum(score * one_hot * mask)
        y_sum = torch.sum(one_hot * one_hot * mask)
        z_sum = torch.sum(score * score * mask)
        loss += 1 - (2 * intersect + 1e-10) / (z_sum + y_sum + 1e-10)
    return loss / n_classes


def _bcp_mix_loss(output, img_l, patch_l, mask, l_weight=1.0, u_weight=0.5, unlab=False):
    """BCP ``mix_loss``: ``mask`` is 1 outside the box (the "image" region), 0 inside (the "patch")."""
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    soft = torch.softmax(output, dim=1)
    image_weight, patch_weight = (u_weight, l_weight) if unlab else (l_weight, u_weight)
    patch_mask = 1 - mask
    dice = (
        _bcp_dice_loss(soft, img_l, mask) * image_weight
        + _bcp_dice_loss(soft, patch_l, patch_mask) * patch_weight
    )
    loss_ce = image_weight * (ce(output, img_l) * mask).sum() / (mask.sum() + 1e-16)
    loss_ce = loss_ce + patch_weight * (ce(output, patch_l) * patch_mask).sum() / (patch_mask.sum() + 1e-16)
    return dice, loss_ce


def _fixed_case(seed=0, batch=3, size=12):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, 4, size, size, generator=generator) * 2
    outer = torch.randint(0, 4, (batch, size, size), generator=generator)
    inner = torch.randint(0, 4, (batch, size, size), generator=generator)
    mask = torch.ones(batch, size, size)
    mask[:, 2:10, 3:11] = 0
    return logits, outer, inner, mask


@pytest.mark.parametrize(("outer_weight", "inner_weight"), [(1.0, 1.0), (0.5, 1.0), (1.0, 0.5)])
def test_mix_loss_equals_bcps_mix_loss(outer_weight, inner_weight):
    logits, outer, inner, mask = _fixed_case()
    dice, ce = mix_loss(logits, outer, inner, mask, outer_weight, inner_weight)
    unlab = outer_weight != 1.0 or inner_weight == 1.0
    u_weight = outer_weight if unlab else inner_weight
    reference = _bcp_mix_loss(logits, outer, inner, mask, u_weight=u_weight, unlab=unlab)
    assert dice.item() == pytest.approx(reference[0].item(), rel=1e-6)
    assert ce.item() == pytest.approx(reference[1].item(), rel=1e-6)


def _step_with_known_inputs(stage_iteration: int, loss: str = "published"):
    """A BCP step on hand-built tensors (teacher = a fixed convolution), plus its inputs."""
    torch.manual_seed(0)
    params = BCPParams(pretrain_iterations=1, loss=loss, largest_component=False)
    images = torch.rand(4, 1, 12, 12)
    labels = torch.randint(0, 4, (4, 12, 12))
    unlabeled = torch.rand(4, 1, 12, 12)
    teacher = torch.nn.Conv2d(1, 4, 3, padding=1)
    models = Models(student=torch.nn.Conv2d(1, 4, 3, padding=1), teacher=teacher)
    batch = Batch(images, labels, unlabeled)
    torch.manual_seed(1)
    step = copy_paste_step(params, 4, batch, models, StepInfo(stage_iteration, 10))
    return params, step, images, labels, unlabeled, teacher


def test_self_training_loss_is_half_the_sum_of_both_mix_losses():
    params, step, images, labels, unlabeled, teacher = _step_with_known_inputs(1)
    outer = step.outer_mask
    # BCP's inputs: unlabelled a outside + labelled a in the box; labelled b outside + unlabelled b inside
    assert torch.equal(step.inputs[0].images, unlabeled[:2] * outer + images[:2] * (1 - outer))
    assert torch.equal(step.inputs[1].images, images[2:] * outer + unlabeled[2:] * (1 - outer))
    with torch.no_grad():
        pseudo = torch.softmax(teacher(unlabeled), 1).argmax(1)
    inside = (outer == 0).expand(2, -1, -1)  # the mixed label maps keep integer labels
    assert step.target.dtype == labels.dtype
    assert torch.equal(step.target[:2], torch.where(inside, labels[:2], pseudo[:2]))
    assert torch.equal(step.target[2:], torch.where(inside, pseudo[2:], labels[2:]))
    torch.manual_seed(2)
    logits = [torch.randn(2, 4, 12, 12), torch.randn(2, 4, 12, 12)]
    mask = outer.expand(2, -1, -1)
    unl_dice, unl_ce = _bcp_mix_loss(logits[0], pseudo[:2], labels[:2], mask, u_weight=0.5, unlab=True)
    l_dice, l_ce = _bcp_mix_loss(logits[1], labels[2:], pseudo[2:], mask, u_weight=0.5)
    expected = (unl_dice + l_dice + unl_ce + l_ce) / 2
    assert copy_paste_loss(params, step, logits).item() == pytest.approx(expected.item(), rel=1e-6)
    # ground truth: the labelled box of the first input, the labelled surround of the second
    assert torch.equal(step.from_labeled[:2], (outer == 0).expand(2, -1, -1))
    assert torch.equal(step.from_labeled[2:], (outer == 1).expand(2, -1, -1))


def test_pre_training_loss_is_half_of_dice_plus_ce_with_both_regions_weighted_one():
    params, step, images, labels, _, _ = _step_with_known_inputs(0)
    outer = step.outer_mask
    assert len(step.inputs) == 1 and step.stage == "copy_paste_labeled"
    assert torch.equal(step.inputs[0].images, images[:2] * outer + images[2:] * (1 - outer))
    logits = [torch.randn(2, 4, 12, 12)]
    dice, ce = _bcp_mix_loss(
        logits[0], labels[:2], labels[2:], outer.expand(2, -1, -1), u_weight=1.0, unlab=True
    )
    assert copy_paste_loss(params, step, logits).item() == pytest.approx(((dice + ce) / 2).item(), rel=1e-6)


def test_published_loss_is_larger_than_the_pixel_weighted_deviation():
    """The published sum over regions and inputs is about 3x the normalised pixel-weighted loss."""
    published = _step_with_known_inputs(1)
    logits = [torch.randn(2, 4, 12, 12), torch.randn(2, 4, 12, 12)]
    weighted = _step_with_known_inputs(1, loss="pixel_weighted")
    ratio = copy_paste_loss(published[0], published[1], logits) / copy_paste_loss(
        weighted[0], weighted[1], logits
    )
    assert 2.0 < ratio.item() < 4.0


def test_box_corner_is_drawn_as_numpy_randint_does():
    corners = set()
    for seed in range(300):
        torch.manual_seed(seed)
        mask = outer_box_mask((9, 9), 2 / 3)
        rows, cols = torch.nonzero(mask == 0, as_tuple=True)
        assert rows.max() - rows.min() + 1 == 6 and cols.max() - cols.min() + 1 == 6
        corners.add((int(rows.min()), int(cols.min())))
    assert {row for row, _ in corners} == {0, 1, 2}  # np.random.randint(0, 9 - 6): 0..2, never 3


def test_largest_component_is_8_connected_as_skimage_label():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 0:2, 0:2] = 1  # 4 pixels
    labels[0, 2:4, 2:4] = 1  # touches the first diagonally only
    labels[0, 5:8, 5:8] = 1  # 9 pixels: the largest 4-connected blob
    eight = largest_component_per_class(labels, 4, connectivity=8)
    four = largest_component_per_class(labels, 4, connectivity=4)
    assert int((four == 1).sum()) == 9
    assert int((eight == 1).sum()) == 9  # the diagonal pair is 8 pixels, still smaller
    labels[0, 4, 4] = 1  # now the diagonal chain joins all three under 8-connectivity
    assert int((largest_component_per_class(labels, 4, connectivity=8) == 1).sum()) == 18
    assert int((largest_component_per_class(labels, 4, connectivity=4) == 1).sum()) == 9


def test_separate_passes_see_each_mixed_input_alone():
    """One pass per input (BCP) differs from one joint pass: batch-norm uses each input's statistics."""
    network = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4)).train()
    inputs = [torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8) * 3]
    separate = run_per_input(network, inputs, "separate")
    joint = run_per_input(network, inputs, "joint")
    assert torch.allclose(separate[0], network(inputs[0]))
    assert not torch.allclose(separate[0], joint[0], atol=1e-3)


@pytest.mark.slow
def test_best_checkpoints_are_chosen_within_each_stage(tmp_path):
    data = tiny_config_dict(tmp_path, "bcp", iterations=8, pretrain_iterations=4)
    data["train"].update(val_every=2, checkpoint_every=8)
    config = config_from_dict(data)
    trainer = Trainer(config, load_data(config.data))
    assert set(trainer.stage_switches) == {4} and trainer.stage_switches[4].restore == "best"
    trainer.fit(progress=False)
    dice = {int(r["iteration"]): float(r["mean_dice"]) for r in trainer.val_log.rows()}
    assert sorted(dice) == [2, 4, 6, 8]
    stage_one = load_checkpoint(tmp_path / "best_stage_end_4.pt")
    assert stage_one["iteration"] == max((2, 4), key=lambda i: (dice[i], -i))
    best = load_checkpoint(tmp_path / "best.pt")  # among self-training validations only
    assert best["iteration"] == max((6, 8), key=lambda i: (dice[i], -i))


def test_stage_switch_restores_student_optimiser_and_copies_the_teacher(tmp_path):
    data = tiny_config_dict(tmp_path, "bcp", iterations=8, pretrain_iterations=4)
    data["train"].update(val_every=2, checkpoint_every=8)
    config = config_from_dict(data)
    trainer = Trainer(config, load_data(config.data))
    trainer.fit(stop_at=4, progress=False)
    best = load_checkpoint(tmp_path / "best.pt")
    trainer.start_stage(4)
    for name, value in trainer.models.student.state_dict().items():
        assert torch.equal(value, best["student"][name]), name
        assert torch.equal(trainer.models.teacher.state_dict()[name], value), name
    momentum = [state["momentum_buffer"] for state in trainer.optimizer.state_dict()["state"].values()]
    saved = [state["momentum_buffer"] for state in best["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, saved, strict=True))
    assert trainer.best_dice == -1.0 and not (tmp_path / "best.pt").exists()
