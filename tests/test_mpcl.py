"""MPCL: intensity grouping (IHPG), prototype-space losses (PSO), dual-branch alignment (DKA), the bank,
and the method on its two bases."""

import pytest
import torch
import torch.nn.functional as F

from mpcl.errors import ConfigError
from mpcl.training.config import config_from_dict
from mpcl.training.data.loading import load_data
from mpcl.training.data.phantom import MYO, PhantomSpec, make_phantom_volume
from mpcl.training.losses.prototypes import (
    IGNORE,
    diversity_loss,
    dual_alignment,
    generalisation_loss,
    group_prototypes,
    intensity_groups,
    pixel_prototype_contrast,
    prototype_logits,
    separation_loss,
)
from mpcl.training.methods import StepInfo
from mpcl.training.methods.prototype_bank import PrototypeBank
from mpcl.training.trainer import Trainer
from tests.conftest import straight_and_resumed, tiny_config_dict


def _phantom_slice():
    volume, subregions = make_phantom_volume(11, PhantomSpec(noise_std=0.0, psf_sigma=0.0, bias_strength=0.0))
    index = max(range(volume.image.shape[0]), key=lambda i: int((subregions[i] == 1).sum()))
    image = torch.from_numpy(volume.image[index])[None]
    label = torch.from_numpy(volume.label[index].astype("int64"))[None]
    return image, label, torch.from_numpy(subregions[index].astype("int64"))[None]


# -- IHPG ----------------------------------------------------------------------------------------
def test_two_groups_recover_the_two_intensity_subregions_of_the_myocardium():
    image, label, subregions = _phantom_slice()
    in_myo = label == MYO
    assert 0 < int((subregions[in_myo] == 1).sum()) < int(in_myo.sum())  # both sub-regions present
    groups = intensity_groups(image, label, [1, 1, 2, 1], n_min=16, rule="kmeans")
    assert torch.equal(groups[in_myo], subregions[in_myo])  # group 1 = the bright sector, exactly
    # features that see intensity give two different prototypes, one per sub-region
    z = F.normalize(torch.stack([image, 1 - image, torch.ones_like(image)], dim=1), dim=1)
    prototypes, counts = group_prototypes(z, label, groups, 4, 2)
    assert counts[MYO, 0] == int((subregions[in_myo] == 0).sum()) and counts[MYO, 1] > 0
    assert float(prototypes[MYO, 0] @ prototypes[MYO, 1]) < 0.999


def test_quantile_rule_makes_equal_groups_and_cuts_an_unequal_plateau_pair():
    image, label, subregions = _phantom_slice()
    in_myo = label == MYO
    groups = intensity_groups(image, label, [1, 1, 2, 1], n_min=16, rule="quantile")
    sizes = torch.bincount(groups[in_myo], minlength=2)
    assert abs(int(sizes[0]) - int(sizes[1])) <= 1  # the median split
    assert not torch.equal(groups[in_myo], subregions[in_myo])  # which is why kmeans is the default


def test_groups_are_per_image_dark_to_bright_and_small_classes_are_ignored():
    intensity = torch.tensor([[[0.1, 0.2, 0.8, 0.9]], [[0.5, 0.6, 0.95, 0.99]]])
    labels = torch.tensor([[[1, 1, 1, 1]], [[1, 1, 1, 2]]])
    groups = intensity_groups(intensity, labels, [1, 2, 2], n_min=2)
    assert groups[0, 0].tolist() == [0, 0, 1, 1]
    assert groups[1, 0, :3].tolist() == [0, 0, 1]  # thresholds of image 1 are its own
    assert groups[1, 0, 3] == IGNORE  # class 2 has one pixel < n_min
    batch_groups = intensity_groups(intensity, labels, [1, 2, 2], n_min=2, scope="batch")
    assert batch_groups[1, 0, :3].tolist() != groups[1, 0, :3].tolist()  # one threshold for the batch


# -- PSO -------------------------------------------------------------------------------------------
def _two_class_bank():
    bank = torch.zeros(2, 2, 4)
    bank[0, 0, 0] = bank[0, 1, 1] = bank[1, 0, 2] = bank[1, 1, 3] = 1.0
    return bank, torch.ones(2, 2, dtype=torch.bool)


def test_contrast_is_lower_when_pixels_sit_on_their_own_prototype():
    bank, valid = _two_class_bank()
    labels = torch.tensor([[[0, 0, 1, 1]]])
    groups = torch.tensor([[[0, 1, 0, 1]]])
    own = bank[labels[0, 0], groups[0, 0]].T.reshape(1, 4, 1, 4)
    other = bank[1 - labels[0, 0], groups[0, 0]].T.reshape(1, 4, 1, 4)
    on_own = pixel_prototype_contrast(own, labels, groups, bank, valid)
    on_other = pixel_prototype_contrast(other, labels, groups, bank, valid)
    assert on_own < 0.01 < on_other
    # a pixel sitting on its sibling prototype is not pushed away from it (siblings are not negatives)
    sibling = bank[labels[0, 0], 1 - groups[0, 0]].T.reshape(1, 4, 1, 4)
    assert pixel_prototype_contrast(sibling, labels, groups, bank, valid) < on_other


def test_contrast_samples_at_most_the_anchor_budget():
    bank, valid = _two_class_bank()
    z = F.normalize(torch.randn(1, 4, 8, 8), dim=1).requires_grad_()
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    groups = torch.zeros(1, 8, 8, dtype=torch.long)
    loss = pixel_prototype_contrast(z, labels, groups, bank, valid, anchors_per_group=5)
    loss.backward()
    assert int((z.grad.abs().sum(1) > 0).sum()) == 5


def test_diversity_zero_for_orthogonal_siblings_and_positive_for_identical():
    present = torch.ones(2, 2, dtype=torch.bool)
    orthogonal, _ = _two_class_bank()
    assert diversity_loss(orthogonal, present) == 0
    identical = orthogonal.clone()
    identical[:, 1] = identical[:, 0]
    assert diversity_loss(identical, present) == pytest.approx(0.3)


def test_separation_and_generalisation_on_hand_made_prototypes():
    bank, valid = _two_class_bank()
    present = torch.ones(2, 2, dtype=torch.bool)
    assert separation_loss(bank, present, bank, valid) == 0  # classes orthogonal
    mixed = bank.clone()
    mixed[0, 0] = bank[1, 0]  # a class-0 prototype sits on class 1
    assert separation_loss(mixed, present, bank, valid) > 0
    assert generalisation_loss(bank, present, bank, valid) == pytest.approx(0.0)
    assert generalisation_loss(mixed, present, bank, valid) == pytest.approx(0.25)


@pytest.mark.parametrize("term", ["contrast", "diversity", "separation", "generalisation", "alignment"])
def test_each_term_is_finite_and_sends_gradient_into_the_embeddings(term):
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(3, 2, 8), dim=-1)
    valid = torch.ones(3, 2, dtype=torch.bool)
    z = F.normalize(torch.randn(2, 8, 6, 6), dim=1).requires_grad_()
    labels = torch.randint(0, 3, (2, 6, 6))
    groups = torch.randint(0, 2, (2, 6, 6))
    prototypes, counts = group_prototypes(z, labels, groups, 3, 2)
    present = counts > 0
    if term == "contrast":
        loss = pixel_prototype_contrast(z, labels, groups, bank, valid)
    elif term == "diversity":
        loss = diversity_loss(prototypes, present, margin=-1.0)
    elif term == "separation":
        loss = separation_loss(prototypes, present, bank, valid, margin=-1.0)
    elif term == "generalisation":
        loss = generalisation_loss(prototypes, present, bank, valid)
    else:
        logits = prototype_logits(z, bank, valid)
        teacher = torch.softmax(torch.randn(2, 3, 6, 6) * 5, 1)
        loss = dual_alignment(torch.randn(2, 3, 6, 6), logits, teacher, torch.randn(2, 3, 6, 6) * 5,
                              torch.ones(2, 6, 6, dtype=torch.bool), threshold=0.0)  # fmt: skip
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


# -- DKA ---------------------------------------------------------------------------------------------
def test_prototype_classifier_picks_the_class_of_the_nearest_prototype():
    bank, valid = _two_class_bank()
    z = bank[[0, 1, 1], [1, 0, 1]].T.reshape(1, 4, 1, 3)
    assert prototype_logits(z, bank, valid).argmax(1).tolist() == [[[0, 1, 1]]]
    valid[1, 1] = False  # an invalid prototype takes no part
    assert prototype_logits(z, bank, valid).argmax(1)[0, 0, 2] == 0


def test_alignment_is_zero_when_branches_agree_and_weights_gate_uncertain_pixels():
    logits = torch.randn(1, 3, 4, 4) * 10
    probabilities = torch.softmax(logits, 1)
    pixels = torch.ones(1, 4, 4, dtype=torch.bool)
    assert dual_alignment(logits, logits, probabilities, logits, pixels, 0.0) == pytest.approx(0, abs=1e-5)
    flat = torch.zeros(1, 3, 4, 4)  # uniform teacher: below any confidence threshold > 1/3
    student = torch.randn(1, 3, 4, 4)
    assert dual_alignment(student, student, torch.softmax(flat, 1), flat, pixels, 0.9) == 0
    assert dual_alignment(student, student, torch.softmax(flat, 1), flat, pixels, 0.9, "soft") > 0


# -- bank ------------------------------------------------------------------------------------------
def test_bank_initialises_then_moves_by_ema_and_only_for_seen_groups():
    bank = PrototypeBank([1, 2], dim=2, momentum=0.9)
    first = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
    bank.update(first, torch.zeros(2, 2), torch.tensor([[20, 20], [20, 3]]), n_min=16)
    assert bank.valid.tolist() == [[True, False], [True, False]]  # class 0 has 1 group; (1,1) too few
    assert torch.equal(bank.prototypes[1, 0], torch.tensor([0.0, 1.0]))
    second = torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
    bank.update(second, torch.ones(2, 2), torch.full((2, 2), 20), n_min=16)
    moved = bank.prototypes[0, 0]
    assert moved[0] > moved[1] > 0 and moved.norm() == pytest.approx(1.0)
    assert bank.intensity[0, 0] == pytest.approx(0.1)
    assert bank.valid[1, 1]
    restored = PrototypeBank([1, 2], dim=2)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.prototypes, bank.prototypes)
    with pytest.raises(ValueError, match="does not fit"):
        PrototypeBank([3, 3], dim=2).load_state_dict(bank.state_dict())


def test_bank_fill_per_class_update_and_untracked_intensities():
    bank = PrototypeBank([1, 2], dim=2, momentum=0.5)
    bank.fill(torch.tensor([[[2.0, 0.0], [5.0, 5.0]], [[0.0, 3.0], [4.0, 0.0]]]))
    assert bank.valid.tolist() == [[True, False], [True, True]]  # class 0 has one group: (0, 1) stays off
    assert torch.allclose(bank.prototypes.norm(dim=-1)[bank.valid], torch.ones(3))
    with pytest.raises(ValueError, match="do not fit"):
        bank.fill(torch.zeros(2, 3, 2))
    bank.update_per_class(torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]]), torch.tensor([[0], [1]]), n_min=1)
    assert torch.equal(bank.prototypes[0, 0], torch.tensor([1.0, 0.0]))  # class 0 unseen: untouched
    expected = torch.nn.functional.normalize(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), dim=-1)
    assert torch.allclose(bank.prototypes[1], expected)  # both groups of class 1 moved to its one mean
    assert torch.equal(bank.intensity, torch.zeros(2, 2))  # no intensities given: none tracked


# -- the method --------------------------------------------------------------------------------------
def assert_same_state(first: torch.nn.Module, second: torch.nn.Module) -> None:
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def _trainer(tmp_path, iterations=4, subdir="run", **params):
    config = config_from_dict(tiny_config_dict(tmp_path / subdir, "mpcl", iterations, **params))
    return Trainer(config, load_data(config.data))


@pytest.mark.parametrize(
    ("base", "params"),
    [("mean_teacher", {"consistency_start": 0}), ("bcp", {"pretrain_iterations": 2})],
)
@pytest.mark.slow
def test_all_switches_off_is_the_base_method_bit_for_bit(tmp_path, base, params):
    """MPCL's own view code (not a hand-over to the base) with every component off: the same weights
    as the base after the stage switch (BCP: restored best stage-1 state, teacher copy, self-training)."""

    def trained(trainer):  # each trainer seeds torch when built: build, then train, one at a time
        trainer.fit(stop_at=4, progress=False)
        return trainer

    reference = trained(Trainer(*_config_and_data(tmp_path / "base", base, **params)))
    mix = "bcp" if base == "bcp" else "none"
    mpcl = _trainer(tmp_path, subdir="mpcl", ihpg=False, pso=False, dka=False, base={"mix": mix, **params})
    calls = []
    view = mpcl.method._copy_paste_view if mix == "bcp" else mpcl.method._mean_teacher_view
    setattr(mpcl.method, view.__name__, lambda *args: calls.append(1) or view(*args))
    trained(mpcl)
    assert len(calls) == 4 and mpcl.models.extra is None
    assert_same_state(reference.models.student, mpcl.models.student)
    assert_same_state(reference.models.teacher, mpcl.models.teacher)
    if base == "bcp":
        assert (tmp_path / "mpcl" / "best_stage_end_2.pt").is_file()


def _config_and_data(output_dir, method, **params):
    config = config_from_dict(tiny_config_dict(output_dir, method, 4, **params))
    return config, load_data(config.data)


@pytest.mark.parametrize("mix", ["none", "bcp"])
def test_one_step_has_every_term_with_gradient(tmp_path, mix):
    """(Its speed is measured in benchmarks/train_speed.py, not asserted here.)"""
    trainer = _trainer(
        tmp_path, warmup_iterations=0, tau_conf=0.0, n_min=1, base={"mix": mix, "pretrain_iterations": 0}
    )
    trainer.train_step(0, trainer.batches(0))  # fills the bank; the classifier needs every class
    assert trainer.method.bank.complete
    batch = trainer.batches(1)
    terms = trainer.method.training_step(batch, trainer.models, StepInfo(1, 4))
    expected = {"pso_contrast", "pso_diversity", "pso_separation", "pso_generalisation", "dka_prototype_ce",
                "dka_alignment"}  # fmt: skip
    assert expected <= set(terms)
    assert (
        {"supervised", "consistency"} <= set(terms) if mix == "none" else "copy_paste_bidirectional" in terms
    )
    total = torch.stack(list(terms.values())).sum()
    total.backward()
    assert all(torch.isfinite(value) for value in terms.values())
    projection = trainer.models.extra["projection"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projection.parameters())


@pytest.mark.parametrize("switch", ["ihpg", "pso", "dka"])
def test_each_switch_removes_its_terms(tmp_path, switch):
    trainer = _trainer(tmp_path, warmup_iterations=0, tau_conf=0.0, n_min=1, **{switch: False})
    trainer.train_step(0, trainer.batches(0))
    terms = trainer.method.training_step(trainer.batches(1), trainer.models, StepInfo(1, 4))
    pso = {"pso_contrast", "pso_separation", "pso_generalisation"}
    if switch == "ihpg":
        assert "pso_diversity" not in terms and trainer.method.bank.prototypes.shape[1] == 1
        assert pso | {"dka_alignment"} <= set(terms)
    elif switch == "pso":
        assert not any(name.startswith("pso") for name in terms) and "dka_alignment" in terms
    else:
        assert not any(name.startswith("dka") for name in terms) and pso <= set(terms)


def test_warm_up_uses_labelled_pixels_only_and_no_ramped_terms(tmp_path):
    trainer = _trainer(tmp_path, warmup_iterations=10, tau_conf=0.0, n_min=1)
    terms = trainer.method.training_step(trainer.batches(0), trainer.models, StepInfo(0, 20))
    assert not any(name.startswith("pso") or name == "dka_alignment" for name in terms)
    assert trainer.method.mpcl_ramp(StepInfo(9, 20)) == 0 < trainer.method.mpcl_ramp(StepInfo(10, 20))


@pytest.mark.slow
def test_bank_and_teacher_head_survive_a_resume_exactly(tmp_path):
    params = {"warmup_iterations": 1, "tau_conf": 0.5, "n_min": 1}
    straight, resumed = straight_and_resumed(
        lambda subdir: _trainer(tmp_path, iterations=4, subdir=subdir, **params), tmp_path
    )
    assert torch.equal(straight.method.bank.prototypes, resumed.method.bank.prototypes)
    assert_same_state(straight.models.teacher_extra, resumed.models.teacher_extra)
    assert_same_state(straight.models.student, resumed.models.student)
    log = (tmp_path / "straight" / "train_log.csv").read_text().splitlines()[0]
    assert "bank_sibling_cos" in log and "loss_pso_contrast" in log


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="method.params.K must be >= 1"):
        config_from_dict(tiny_config_dict(tmp_path, "mpcl", K=0))
    with pytest.raises(ConfigError, match="unknown key 'method.params.base.mixx'"):
        config_from_dict(tiny_config_dict(tmp_path, "mpcl", base={"mixx": "bcp"}))
    data = tiny_config_dict(tmp_path, "mpcl", base={"mix": "bcp"})
    data["train"]["labeled_batch"] = 3
    with pytest.raises(ConfigError, match="labeled_batch even"):
        config_from_dict(data)
    with pytest.raises(ConfigError, match="K_per_class lists 2 values for 4 classes"):
        _trainer(tmp_path, K_per_class=[1, 2])
