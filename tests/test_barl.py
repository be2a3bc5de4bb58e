"""BARL: instance matching, region/instance alignment, DPR and PCBC on hand-made tensors, the two-branch
network, and the method inside the trainer (one step, switches, resume, inference)."""

import numpy as np
import pytest
import torch

from mpcl.errors import ConfigError
from mpcl.nn.unet import UNet
from mpcl.training.config import config_from_dict
from mpcl.training.data.loading import load_data
from mpcl.training.losses.barl_alignment import (
    connected_components,
    instance_alignment,
    instance_regions,
    match_instances,
    region_alignment,
)
from mpcl.training.losses.barl_label import (
    agreement_weight,
    agreement_weighted_kl,
    masked_cross_entropy,
    pcbc_loss,
    pcbc_stage_weights,
)
from mpcl.training.losses.prototypes import IGNORE
from mpcl.training.methods import StepInfo, build_method
from mpcl.training.methods.barl import BranchAverage, cutmix, cutmix_boxes, mixed_views
from mpcl.training.methods.base import StageSwitch
from mpcl.training.methods.bcp import copy_paste_step
from mpcl.training.trainer import Trainer, inference_model_from_checkpoint
from tests.conftest import straight_and_resumed, tiny_config_dict


# -- instance matching ---------------------------------------------------------------------------------
def _two_blob_masks():
    """A: a top-left and a bottom-right blob, plus a 2-pixel speck scanned first. B: the same blobs
    shifted by one pixel, a 9-pixel stray, and an extra bar at the top that A lacks — scanned first, so
    B numbers its components differently from A."""
    a = np.zeros((20, 20), bool)
    a[0, 18:20] = True  # speck, below min size
    a[2:7, 2:7] = True  # top-left: A component 1
    a[12:18, 12:18] = True  # bottom-right: A component 2
    b = np.zeros((20, 20), bool)
    b[0:2, 8:18] = True  # extra bar, no overlap with A: B component 1
    b[3:8, 3:8] = True  # top-left shifted (IoU 16/34): B component 2
    b[10:13, 0:3] = True  # 9-pixel stray, dropped at min_size 10
    b[11:17, 13:19] = True  # bottom-right shifted (IoU 25/47): B component 3
    return a, b


def test_instance_matching_pairs_the_right_components():
    a, b = _two_blob_masks()
    match = match_instances(a, b, min_size=10, min_iou=0.3)
    assert match.count_a == 2 and match.count_b == 3  # the speck and the stray are dropped
    assert match.pairs == [(1, 2), (2, 3)]
    assert match.ious == pytest.approx([16 / 34, 25 / 47])
    assert match.unmatched_a == [] and match.unmatched_b == [1]
    assert match.components_b[0, 10] == 1 and match.components_a[0, 18] == 0
    # the IoU threshold rejects a pair that overlaps too little
    shifted = np.zeros_like(a)
    shifted[2:7, 5:10] = True  # overlaps A's first blob by 2 of 5 columns: IoU 10/40
    assert match_instances(a, shifted, min_size=10, min_iou=0.3).pairs == []
    assert match_instances(a, shifted, min_size=10, min_iou=0.2).pairs == [(1, 1)]


def test_components_are_eight_connected_in_2d_and_26_connected_in_3d():
    diagonal = np.eye(4, dtype=bool)
    assert connected_components(diagonal)[1] == 1
    assert connected_components(np.eye(4, dtype=bool)[None].repeat(2, 0))[1] == 1
    corner = np.zeros((2, 2, 2), bool)
    corner[0, 0, 0] = corner[1, 1, 1] = True
    assert connected_components(corner)[1] == 1


def _regions_batch():
    """Two images, class 1 in two blobs per image for both branches (B's shifted by one pixel)."""
    a, b = np.zeros((2, 16, 16), np.int64), np.zeros((2, 16, 16), np.int64)
    for index in range(2):
        a[index, 1:6, 1:6] = 1
        a[index, 9:15, 9:15] = 1
        b[index, 2:7, 2:7] = 1
        b[index, 9:15, 10:16] = 1
    return torch.from_numpy(a), torch.from_numpy(b)


def test_instance_alignment_is_zero_when_matched_regions_agree_and_positive_otherwise():
    prediction_a, prediction_b = _regions_batch()
    regions = instance_regions(prediction_a, prediction_b, num_classes=2, min_size=4, min_iou=0.3)
    assert regions.num_matched == 4 and regions.num_unmatched_a == regions.num_unmatched_b == 0
    # embeddings: one direction per component (constant over it) -> both branches agree exactly
    direction = torch.zeros(2, 3, 16, 16)
    direction[:, 0] = 1.0
    direction[:, :, 9:, 9:] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]
    assert instance_alignment(direction, direction, regions) == pytest.approx(0.0, abs=1e-6)
    other = direction.clone()
    other[:, :, 9:, 9:] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]  # B's second blob points elsewhere
    assert instance_alignment(direction, other, regions) == pytest.approx(0.5)  # half the pairs at 1 − 0
    # the unmatched penalty only acts on unmatched components
    lone = prediction_b.clone()
    lone[:, 9:, 9:] = 0
    lone_regions = instance_regions(prediction_a, lone, 2, 4, 0.3)
    assert lone_regions.num_unmatched_a == 2
    without = instance_alignment(direction, other, lone_regions)
    with_penalty = instance_alignment(direction, other, lone_regions, unmatched_penalty=1.0)
    assert without == pytest.approx(0.0, abs=1e-6) and with_penalty == pytest.approx(1.0)


def test_region_alignment_is_zero_when_branches_agree_and_counts_only_big_regions():
    torch.manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(2, 8, 6, 6), dim=1)
    labels = torch.randint(0, 3, (2, 6, 6))
    assert region_alignment(embeddings, embeddings.clone(), labels, 3, 1) == pytest.approx(0.0, abs=1e-6)
    assert region_alignment(embeddings, -embeddings, labels, 3, 1) == pytest.approx(2.0)
    assert region_alignment(embeddings, -embeddings, torch.full_like(labels, IGNORE), 3, 1) == 0
    assert region_alignment(embeddings, -embeddings, labels, 3, 100) == 0  # no region is that big


# -- label-space terms -------------------------------------------------------------------------------
def test_agreement_weight_and_soft_path():
    logits = torch.randn(2, 4, 5, 5)
    assert agreement_weighted_kl(logits, logits.clone()) == pytest.approx(0.0, abs=1e-6)
    sure_0 = torch.tensor([20.0, -20.0])[None, :, None, None]
    assert agreement_weight(torch.softmax(sure_0, 1), torch.softmax(sure_0, 1)).item() == pytest.approx(1.0)
    assert agreement_weight(torch.softmax(sure_0, 1), torch.softmax(-sure_0, 1)).item() < 1e-6
    # certain disagreement is weighted out, mild disagreement is not
    assert agreement_weighted_kl(sure_0, -sure_0) < 1e-4 < agreement_weighted_kl(sure_0 / 20, -sure_0 / 20)


def test_masked_cross_entropy_counts_only_masked_pixels():
    logits = torch.zeros(1, 2, 1, 2)
    labels = torch.tensor([[[0, 1]]])
    assert masked_cross_entropy(logits, labels, torch.tensor([[[True, False]]])) == pytest.approx(
        np.log(2) / 2
    )
    assert masked_cross_entropy(logits, labels, torch.zeros(1, 1, 2, dtype=torch.bool)) == 0


def _confident(classes: list[int], num_classes: int = 3, strength: float = 10.0) -> torch.Tensor:
    """(1, C, 1, W) logits, one confident class per pixel."""
    one_hot = torch.nn.functional.one_hot(torch.tensor(classes), num_classes).float()
    return (one_hot.T * strength)[None, :, None, :]


def test_pcbc_corrects_coarse_scales_towards_the_finer_consensus_only():
    fine = _confident([0, 1, 2, 2])
    coarse_right = _confident([0, 1, 2, 2])
    coarse_wrong = _confident([0, 1, 1, 0]).requires_grad_()
    assert pcbc_loss([coarse_right, fine], [coarse_right, fine], [1.0], 0.7) < 1e-3
    fine_a, fine_b = fine.clone().requires_grad_(), fine.clone().requires_grad_()
    loss = pcbc_loss([coarse_wrong, fine_a], [coarse_right, fine_b], [1.0], 0.7)
    assert loss > 1.0
    loss.backward()
    assert coarse_wrong.grad.abs()[..., 2:].sum() > 0 and coarse_wrong.grad.abs()[..., :2].sum() < 1e-3
    assert fine_a.grad is None or fine_a.grad.abs().sum() == 0  # the finer scale is never pulled coarse-ward
    # the consensus must be confident: branches disagreeing at the finer scale give no target
    unsure = pcbc_loss(
        [coarse_wrong, _confident([0, 1, 2, 2])], [coarse_right, _confident([0, 1, 0, 1])], [1.0], 0.7
    )
    assert unsure < pcbc_loss([coarse_wrong, fine], [coarse_right, fine], [1.0], 0.7)
    # three scales: a pair with weight 0 is not corrected
    middle_wrong = _confident([2, 2, 2, 2])
    scales = [coarse_right, middle_wrong, fine]
    assert pcbc_loss(scales, scales, [1.0, 0.0], 0.7) > 1.0  # coarse vs the wrong middle consensus
    assert pcbc_loss(scales, scales, [0.0, 1.0], 0.7) > 1.0  # middle vs fine
    assert (
        pcbc_loss([coarse_right, coarse_right, fine], [coarse_right, coarse_right, fine], [1.0, 0.0], 0.7)
        < 1e-3
    )


def test_pcbc_schedule_switches_pairs_on_from_fine_to_coarse():
    total = 1000
    at = lambda t: pcbc_stage_weights(t, total, 3, 0.1, "progressive")  # noqa: E731
    assert at(0)[0] == at(0)[1] == 0 < at(0)[2]
    assert at(100)[0] == 0 < at(100)[1]
    assert all(w > 0 for w in at(200)) and at(999) == pytest.approx([1.0, 1.0, 1.0], abs=1e-2)
    assert pcbc_stage_weights(0, total, 3, 0.1, "constant") == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("term", ["cps", "soft", "pcbc", "ra", "ia"])
def test_each_loss_term_is_finite_and_has_gradient(term):
    torch.manual_seed(0)
    logits_a = (torch.randn(2, 2, 16, 16) * 3).requires_grad_()
    logits_b = (torch.randn(2, 2, 16, 16) * 3).requires_grad_()
    embed_a = torch.nn.functional.normalize(torch.randn(2, 4, 16, 16), dim=1).requires_grad_()
    embed_b = torch.nn.functional.normalize(torch.randn(2, 4, 16, 16), dim=1).requires_grad_()
    if term == "cps":
        labels = logits_a.detach().argmax(1)
        loss = masked_cross_entropy(logits_b, labels, torch.ones_like(labels, dtype=torch.bool))
        inputs = [logits_b]
    elif term == "soft":
        loss, inputs = agreement_weighted_kl(logits_a, logits_b), [logits_a, logits_b]
    elif term == "pcbc":
        fine = torch.randn(2, 2, 16, 16) * 10
        loss, inputs = pcbc_loss([logits_a, fine], [logits_b, fine], [1.0], 0.5), [logits_a, logits_b]
    elif term == "ra":
        labels = torch.randint(0, 2, (2, 16, 16))
        loss, inputs = region_alignment(embed_a, embed_b, labels, 2, 1), [embed_a, embed_b]
    else:
        regions = instance_regions(*_regions_batch(), num_classes=2, min_size=4, min_iou=0.3)
        loss, inputs = instance_alignment(embed_a, embed_b, regions), [embed_a, embed_b]
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(tensor.grad is not None and tensor.grad.abs().sum() > 0 for tensor in inputs)


def test_cutmix_takes_the_box_from_the_next_image_for_image_and_target_alike():
    torch.manual_seed(3)
    boxes = cutmix_boxes(3, (8, 8), prob=1.0, ratio=0.5)
    assert boxes.sum((1, 2)).tolist() == [16, 16, 16]
    images = torch.arange(3.0)[:, None, None, None].expand(3, 1, 8, 8)
    labels = torch.arange(3)[:, None, None].expand(3, 8, 8)
    mixed_images, mixed_labels = cutmix(images, boxes), cutmix(labels, boxes)
    for index in range(3):
        inside = boxes[index]
        assert (mixed_images[index, 0][inside] == (index + 1) % 3).all()
        assert (mixed_images[index, 0][~inside] == index).all()
        assert torch.equal(mixed_labels[index].float(), mixed_images[index, 0])
    assert not cutmix_boxes(3, (8, 8), prob=0.0, ratio=0.5).any()


# -- networks ------------------------------------------------------------------------------------------
def test_bilinear_branch_is_the_reference_bilinear_unet_and_the_default_is_unchanged():
    bilinear = UNet(upsampling="bilinear", deep_supervision=True)
    assert sum(p.numel() for p in UNet(upsampling="bilinear").parameters()) == 1_813_764
    assert bilinear.forward_features(torch.randn(1, 1, 32, 32)).logits.shape == (1, 4, 32, 32)
    default = UNet(channels=[4, 8, 8, 16, 16])
    sibling = UNet(**{**default.hyperparameters(), "upsampling": "bilinear"})
    assert sibling.channels == default.channels and sibling.hyperparameters()["upsampling"] == "bilinear"
    assert "decoder.0.up.weight" in default.state_dict()  # transposed-conv checkpoints still load
    with pytest.raises(ValueError, match="upsampling"):
        UNet(upsampling="nearest")


def test_branch_average_returns_logits_whose_softmax_is_the_mean():
    torch.manual_seed(0)
    a, b = UNet(channels=[4, 8, 8, 16, 16]).eval(), UNet(channels=[4, 8, 8, 16, 16]).eval()
    x = torch.randn(2, 1, 32, 32)
    expected = 0.5 * (torch.softmax(a(x), 1) + torch.softmax(b(x), 1))
    assert torch.allclose(torch.softmax(BranchAverage(a, b)(x), 1), expected, atol=1e-6)


# -- the method in the trainer -----------------------------------------------------------------------
def _config(tmp_path, iterations=4, subdir="run", **params):
    data = tiny_config_dict(tmp_path / subdir, "barl", iterations, **params)
    data["model"]["deep_supervision"] = True
    return config_from_dict(data)


def _trainer(tmp_path, iterations=4, subdir="run", **params):
    config = _config(tmp_path, iterations, subdir, **params)
    return Trainer(config, load_data(config.data))


ALL_TERMS = {"supervised_a", "supervised_b", "dpr_cps", "dpr_soft", "pcbc", "ra", "ia"}
LOOSE = {"tau": 0.0, "tau_s": 0.0, "ra_min_pixels": 1, "ia_min_size": 1, "pcbc_schedule": "constant"}


def test_one_step_on_cpu_has_every_term_and_trains_both_branches(tmp_path):
    """(Its speed is measured in benchmarks, not asserted here.)"""
    trainer = _trainer(tmp_path, **LOOSE)
    models = trainer.models
    assert set(models.extra) == {"branch_b", "embed_a", "embed_b"} and models.teacher is None
    assert isinstance(models.extra["branch_b"].decoder[0].up, torch.nn.Sequential)  # bilinear decoder
    terms = trainer.method.training_step(trainer.batches(0), models, StepInfo(1, 4))
    assert set(terms) == ALL_TERMS
    assert all(torch.isfinite(value) for value in terms.values())
    torch.stack(list(terms.values())).sum().backward()
    for name in ("branch_b", "embed_a", "embed_b"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.extra[name].parameters())
    assert all(p.grad is not None for p in models.student.deep_heads.parameters())
    assert {"branch_agreement", "consensus_confident", "ia_pairs_per_image"} <= set(
        trainer.method.diagnostics()
    )
    before = [p.detach().clone() for p in models.extra["branch_b"].parameters()]
    trainer.train_step(0, trainer.batches(0))  # the trainer's optimiser steps branch B too
    assert any(
        not torch.equal(b, p) for b, p in zip(before, models.extra["branch_b"].parameters(), strict=True)
    )


@pytest.mark.parametrize(
    ("switch", "removed"),
    [("dpr", {"dpr_cps", "dpr_soft"}), ("pcbc", {"pcbc"}), ("ra", {"ra"}), ("ia", {"ia"})],
)
def test_each_switch_removes_its_terms(tmp_path, switch, removed):
    trainer = _trainer(tmp_path, **LOOSE, **{switch: False})
    terms = trainer.method.training_step(trainer.batches(0), trainer.models, StepInfo(1, 4))
    assert set(terms) == ALL_TERMS - removed


def test_all_switches_off_is_two_supervised_networks(tmp_path):
    trainer = _trainer(tmp_path, dpr=False, pcbc=False, ra=False, ia=False)
    assert set(trainer.models.extra) == {"branch_b"}
    terms = trainer.method.training_step(trainer.batches(0), trainer.models, StepInfo(0, 4))
    assert set(terms) == {"supervised_a", "supervised_b"}


@pytest.mark.slow
def test_branch_b_is_saved_and_resumed_exactly(tmp_path):
    straight, resumed = straight_and_resumed(
        lambda subdir: _trainer(tmp_path, subdir=subdir, **LOOSE), tmp_path
    )
    for first, second in (
        (straight.models.student, resumed.models.student),
        (straight.models.extra, resumed.models.extra),
    ):
        for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    header = (tmp_path / "straight" / "train_log.csv").read_text().splitlines()[0]
    assert "loss_pcbc" in header and "branch_agreement" in header


@pytest.mark.slow
def test_inference_averages_both_branches_in_validation_and_from_the_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, iterations=3)
    trainer.fit(progress=False)
    model = trainer.method.inference_model(trainer.models)
    assert isinstance(model, BranchAverage) and model.branch_b is trainer.models.extra["branch_b"]
    state = torch.load(tmp_path / "run" / "latest.pt", weights_only=True)
    rebuilt = inference_model_from_checkpoint(state, trainer.config, trainer.data.num_classes).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model.eval()(x), atol=1e-6)
    only_a = _trainer(tmp_path, subdir="a", infer="A")
    assert only_a.method.inference_model(only_a.models) is only_a.models.student


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="beta must list one weight per scale"):
        _config(tmp_path, scales=3)
    with pytest.raises(ConfigError, match="pcbc needs scales >= 2"):
        _config(tmp_path, scales=1, beta=[1.0])
    data = tiny_config_dict(tmp_path, "barl")
    data["train"]["unlabeled_batch"] = 0
    with pytest.raises(ConfigError, match="unlabeled_batch >= 1"):
        config_from_dict(data)
    config = config_from_dict(tiny_config_dict(tmp_path, "barl"))  # model.deep_supervision left false
    with pytest.raises(ConfigError, match="model.deep_supervision: true"):
        Trainer(config, load_data(config.data))


# -- on the copy-paste base -------------------------------------------------------------------------
ALL_OFF = {"dpr": False, "pcbc": False, "ra": False, "ia": False}


def _same_state(first: torch.nn.Module, second: torch.nn.Module) -> None:
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_all_switches_off_on_bcp_branch_a_is_bcp_bit_for_bit(tmp_path):
    """BARL's own copy-paste step (not a hand-over to BCP) with every component off and one scale (the
    BCP network: ``scales: 1``, ``beta: [1.0]``): branch A and its EMA teacher end with BCP's weights
    across the stage switch, although branch B is built and trained beside it. That holds because branch
    B draws its random numbers (initial weights, dropout) from a stream of its own, a function of the
    run's seed and the iteration, with torch's global stream forked around it: branch A sees exactly the
    draws (box, teacher and student dropout) BCP's run makes."""
    base = {"mix": "bcp", "pretrain_iterations": 2}
    config = config_from_dict(tiny_config_dict(tmp_path / "bcp", "bcp", 4, pretrain_iterations=2))
    reference = Trainer(config, load_data(config.data))
    reference.fit(stop_at=4, progress=False)
    params = {**ALL_OFF, "scales": 1, "beta": [1.0], "infer": "A", "base": base}
    config = config_from_dict(tiny_config_dict(tmp_path / "barl", "barl", 4, **params))  # BCP's network
    barl = Trainer(config, load_data(config.data))
    calls = []
    step = barl.method._copy_paste_step
    barl.method._copy_paste_step = lambda *args: calls.append(1) or step(*args)
    before = {name: value.clone() for name, value in barl.models.extra["branch_b"].state_dict().items()}
    barl.fit(stop_at=4, progress=False)
    assert len(calls) == 4 and set(barl.models.extra) == {"branch_b"}
    assert (tmp_path / "barl" / "best_stage_end_2.pt").is_file()
    _same_state(reference.models.student, barl.models.student)
    _same_state(reference.models.teacher, barl.models.teacher)
    branch_b = barl.models.extra["branch_b"].state_dict()
    assert any(not torch.equal(before[name], branch_b[name]) for name in before)  # B trained too


@pytest.mark.parametrize("passes", ["separate", "joint"])
def test_on_bcp_each_branch_learns_bcp_then_every_term_works_on_the_mixed_inputs(tmp_path, passes):
    trainer = _trainer(
        tmp_path, **LOOSE, base={"mix": "bcp", "pretrain_iterations": 1, "forward_passes": passes}
    )
    method, models = trainer.method, trainer.models
    assert models.teacher is not None and method.stage_switches(4) == [StageSwitch(1, "best")]
    terms = method.training_step(trainer.batches(0), models, StepInfo(0, 4))
    assert set(terms) == {"copy_paste_labeled_a", "copy_paste_labeled_b"}  # pre-training: BCP's loss only
    trainer.train_step(0, trainer.batches(0))
    terms = method.training_step(trainer.batches(1), models, StepInfo(1, 4))
    expected = ALL_TERMS - {"supervised_a", "supervised_b"}
    assert set(terms) == expected | {"copy_paste_bidirectional_a", "copy_paste_bidirectional_b"}
    assert all(torch.isfinite(value) for value in terms.values())
    torch.stack(list(terms.values())).sum().backward()
    for name in ("branch_b", "embed_a", "embed_b"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.extra[name].parameters())
    assert all(p.grad is not None for p in models.student.deep_heads.parameters())


def test_on_bcp_strong_views_are_mixed_like_the_weak_ones(tmp_path):
    trainer = _trainer(tmp_path, base={"mix": "bcp", "pretrain_iterations": 1})
    batch = trainer.batches(0)
    assert batch.labeled_strong is not None and batch.unlabeled_strong is not None
    for iteration in (0, 1):  # pre-training: one labelled mix; then both bidirectional mixes
        mixed = copy_paste_step(trainer.method.params.base, 4, batch, trainer.models, StepInfo(iteration, 4))
        views = mixed_views(mixed, batch.labeled_image, batch.unlabeled_image)
        assert len(views) == len(mixed.inputs) == iteration + 1
        assert all(torch.equal(view, item.images) for view, item in zip(views, mixed.inputs, strict=True))


@pytest.mark.slow
def test_on_bcp_both_branches_resume_exactly(tmp_path):
    params = {**LOOSE, "base": {"mix": "bcp", "pretrain_iterations": 1}}
    straight, resumed = straight_and_resumed(
        lambda subdir: _trainer(tmp_path, subdir=subdir, **params), tmp_path
    )
    for name in ("student", "teacher", "extra"):
        _same_state(getattr(straight.models, name), getattr(resumed.models, name))


def test_shipped_config_is_barl_on_bcp_scored_on_branch_a_with_running_statistics():
    from pathlib import Path

    from mpcl.training.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "acdc_barl_3labeled.yaml")
    method = build_method(config.method, 4)
    assert method.params.base.mix == "bcp" and method.params.infer == "A" and method.ema_decay == 0.99
    assert config.model.upsampling == "transposed" and method.params.branch_b_upsampling == "bilinear"
    assert config.train.bn_recalibration_slices == 0 and config.train.poly_power == 0.0
    assert (config.train.iterations, config.train.labeled_batch, config.train.unlabeled_batch) == (
        40000,
        12,
        12,
    )
    assert method.stage_switches(config.train.iterations) == [StageSwitch(10000, "best")]


def test_bcp_base_refuses_odd_batches(tmp_path):
    data = tiny_config_dict(tmp_path, "barl", base={"mix": "bcp"})
    data["train"]["labeled_batch"] = 3
    with pytest.raises(ConfigError, match="labeled_batch even"):
        config_from_dict(data)
