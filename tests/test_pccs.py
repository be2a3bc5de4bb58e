"""PCCS: signed distance maps and SDM layers, uncertainty weights, the uncertainty-weighted prototype
contrast, Sinkhorn, prototype updating prototype, uncertainty consistency, and the method in the trainer."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpcl.errors import ConfigError
from mpcl.training.config import config_from_dict
from mpcl.training.data.loading import load_data
from mpcl.training.losses.pccs import (
    class_scores,
    entropy_weight,
    layer_groups,
    pool_layers,
    sinkhorn,
    uncertainty_consistency,
    uncertainty_threshold,
    uncertainty_weighted_contrast,
)
from mpcl.training.losses.sdm import class_layers, sdm_layers, signed_distance
from mpcl.training.methods import StepInfo, build_method
from mpcl.training.methods.base import StageSwitch
from mpcl.training.methods.bcp import copy_paste_step
from mpcl.training.methods.pccs import PCCS, PCCSBaseParams, PCCSParams
from mpcl.training.trainer import Trainer
from tests.conftest import straight_and_resumed, tiny_config_dict

# every prototype term from the first step, small embeddings, bands (the 8x8 grid of 32x32 patches)
FAST = {"consistency_start": 0, "warmup_iterations": 0, "embed_dim": 16, "sdm_levels": "bands"}


def _radius(size: int = 40, centre=(19.5, 20.3)) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.hypot(yy - centre[0], xx - centre[1])


def _heart(size: int = 40) -> np.ndarray:
    """bg 0, a myocardium-like ring 2 (radius 7..12) around an LV-like disc 3, an RV-like block 1."""
    r = _radius(size)
    labels = np.zeros((size, size), dtype=np.int64)
    labels[r <= 12] = 2
    labels[r <= 7] = 3
    labels[16:24, :6] = 1
    return labels


# -- signed distance maps and layers -------------------------------------------------------------------
def test_sdm_of_a_disc_is_negative_inside_positive_outside_and_zero_on_its_boundary():
    r = _radius()
    sdf = signed_distance(r <= 9)
    assert (sdf[r < 8] < 0).all() and (sdf[r > 10] > 0).all()
    assert np.abs(r[sdf == 0] - 9).max() < 1  # the zero level lies within a pixel of the circle
    assert np.abs(sdf - (r - 9))[sdf != 0].max() < 1  # and distances are Euclidean, in pixels
    boundary = (r <= 9) & ~((np.roll(r, 1, 0) <= 9) & (np.roll(r, -1, 0) <= 9)
                            & (np.roll(r, 1, 1) <= 9) & (np.roll(r, -1, 1) <= 9))  # fmt: skip
    assert np.array_equal(sdf == 0, boundary)  # zero exactly on the inner (4-connected) boundary


def test_sdm_of_an_empty_or_full_mask_has_no_boundary():
    assert np.isposinf(signed_distance(np.zeros((4, 4), bool))).all()
    assert np.isneginf(signed_distance(np.ones((4, 4), bool))).all()


def test_rings_go_boundary_to_interior_and_a_sandwiched_class_is_measured_from_both_sides():
    labels = _heart()
    uncertain = np.zeros_like(labels, dtype=bool)
    uncertain[:, 20:] = True
    layers = sdm_layers(labels, uncertain, 4, "rings")
    flat = labels.reshape(-1)
    assert all((flat[layer.pixels] == layer.cls).all() for layer in layers)
    lv = [layer for layer in layers if layer.cls == 3]  # bounded by the myocardium only: its own rings
    depth_lv = -signed_distance(labels == 3).reshape(-1)
    assert [layer.depth for layer in lv] == sorted({layer.depth for layer in lv})
    assert all(np.allclose(depth_lv[layer.pixels], layer.depth) for layer in lv)
    myo = [layer for layer in layers if layer.cls == 2]
    levels = np.unique(-signed_distance(labels == 2)[(labels == 2) & (signed_distance(labels == 2) < 0)])
    assert len(myo) == 2 * len(levels)  # one ring per level from the LV side and one from the outer side
    inner = -signed_distance(labels <= 2).reshape(-1)
    assert np.allclose(inner[myo[0].pixels], myo[0].depth)  # first side: distance to the LV
    background = [layer for layer in layers if layer.cls == 0]
    assert len(background) == 2 and background[0].depth < background[1].depth
    assert all(uncertain.reshape(-1)[layer.pixels].all() for layer in background)


def test_bands_bound_the_count_and_keep_a_thin_class_that_has_no_ring():
    labels = np.zeros((40, 40), dtype=np.int64)
    labels[:, 10:12] = 1  # a band two pixels thick: every pixel is on the class boundary
    assert not [layer for layer in sdm_layers(labels, np.ones_like(labels, bool), 2) if layer.cls == 1]
    bands = [layer for layer in sdm_layers(labels, np.ones_like(labels, bool), 2, "bands", 3)
             if layer.cls == 1]  # fmt: skip
    assert 1 <= len(bands) <= 3 and sum(layer.pixels.size for layer in bands) == int((labels == 1).sum())
    lv = [layer for layer in sdm_layers(_heart(), np.ones((40, 40), bool), 4, "bands", 4) if layer.cls == 3]
    assert len(lv) == 4 and [layer.depth for layer in lv] == sorted(layer.depth for layer in lv)


def test_class_layers_are_one_per_present_class():
    layers = class_layers(np.array([[0, 0, 2], [2, 2, 2]]), 4)
    assert [(layer.cls, layer.pixels.tolist()) for layer in layers] == [(0, [0, 1]), (2, [2, 3, 4, 5])]


def test_pooling_overlapping_layers_gives_unit_means_and_mean_probabilities():
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    probabilities = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    prototypes, mean_probabilities = pool_layers(
        features, probabilities, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 2, 1, 2]), 2
    )
    assert torch.allclose(prototypes[0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(prototypes[1], F.normalize(torch.tensor([3.0, 2.0]), dim=0))
    assert torch.allclose(mean_probabilities, torch.tensor([[0.75, 0.25], [0.25, 0.75]]))


# -- uncertainty -----------------------------------------------------------------------------------
def test_uncertainty_weights_are_lower_where_the_teacher_is_more_uncertain():
    logits = torch.tensor([[8.0, 0, 0, 0], [2.0, 0, 0, 0], [0.5, 0, 0, 0], [0.0, 0, 0, 0]])
    probabilities = torch.softmax(logits, dim=1).T.reshape(1, 4, 2, 2)  # pixels: certain → uniform
    soft = entropy_weight(probabilities, "soft", 0.5).reshape(-1)
    assert soft[0] > soft[1] > soft[2] > soft[3] and soft[3] == pytest.approx(0.0, abs=1e-6)
    hard = entropy_weight(probabilities, "hard", uncertainty_threshold(0, 100)).reshape(-1)
    assert hard.tolist() == [1.0, 0.0, 0.0, 0.0]  # θ(0) = 0.25·ln 2.7 keeps only the confident pixel
    assert (
        uncertainty_threshold(0, 100) < uncertainty_threshold(100, 100) == pytest.approx(0.5 * math.log(2.7))
    )


def _prototypes(*directions: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(directions), dim=1)


def test_contrast_is_lower_when_prototypes_sit_on_their_own_class():
    labels = torch.tensor([0, 0, 1, 1])
    own = _prototypes([1, 0.1, 0], [1, -0.1, 0], [0, 1, 0.1], [0.1, 1, 0])
    swapped = own[[0, 2, 1, 3]]
    probabilities = torch.full((4, 3), 1 / 3)
    for weighted in (True, False):
        on_own = uncertainty_weighted_contrast(own, labels, probabilities, weighted=weighted)
        on_other = uncertainty_weighted_contrast(swapped, labels, probabilities, weighted=weighted)
        assert on_own < 0.01 < on_other


def test_similar_positives_weigh_more_so_a_dubious_positive_counts_less():
    labels = torch.tensor([0, 0, 0, 1])
    prototypes = _prototypes([1, 0], [1, 0.05], [0.2, 1], [0, 1])  # the third "class 0" looks like class 1
    probabilities = torch.full((4, 2), 0.5)
    weighted = uncertainty_weighted_contrast(prototypes, labels, probabilities, weighted=True)
    plain = uncertainty_weighted_contrast(prototypes, labels, probabilities, weighted=False)
    assert weighted < plain


def test_anchor_weights_follow_the_uncertainty_sign():
    labels = torch.tensor([0, 0, 1, 1])
    prototypes = _prototypes([1, 0], [1, 0], [0.6, 1], [1, 0.6])  # class 1's anchors are the hard ones
    probabilities = torch.tensor([[1.0, 0], [1.0, 0], [0.5, 0.5], [0.5, 0.5]])  # and the uncertain ones
    towards_uncertain = uncertainty_weighted_contrast(prototypes, labels, probabilities, sign=1)
    towards_certain = uncertainty_weighted_contrast(prototypes, labels, probabilities, sign=-1)
    assert towards_uncertain > towards_certain


def test_contrast_terms_have_gradient_and_skip_anchors_without_positives():
    torch.manual_seed(0)
    prototypes = F.normalize(torch.randn(7, 5), dim=1).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3])  # classes 2 and 3 have no positive
    loss = uncertainty_weighted_contrast(prototypes, labels, torch.softmax(torch.randn(7, 4), 1))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert prototypes.grad[:5].abs().sum() > 0
    lonely = uncertainty_weighted_contrast(prototypes[5:], labels[5:], torch.full((2, 4), 0.25))
    assert lonely == 0


# -- consistency -----------------------------------------------------------------------------------
def test_uncertainty_consistency_squared_error_weights_and_entropy_scale():
    scores = torch.randn(4, 3, 5, 5)
    same = uncertainty_consistency(scores, scores, 2, entropy_coefficient=0.0)
    assert same == pytest.approx(0.0, abs=1e-5)
    student = scores + 1.0  # squared error 1 per pixel in each half
    assert uncertainty_consistency(student, scores, 2, 0.0) == pytest.approx(2.0)
    no_trust = torch.zeros(4, 5, 5)
    assert uncertainty_consistency(student, scores, 2, 0.0, weight=no_trust) == pytest.approx(0.0)
    fro = uncertainty_consistency(scores, scores, 2, 1.0, "fro")
    mean = uncertainty_consistency(scores, scores, 2, 1.0, "mean")
    assert fro == pytest.approx(float(mean) * math.sqrt(4 * 5 * 5), rel=1e-4)


def test_teacher_class_scores_pick_the_best_sub_prototype_per_class():
    prototypes = torch.eye(4)[:, None].repeat(1, 2, 1)  # class c: two copies of e_c
    prototypes[1, 1] = torch.tensor([0.0, 0.0, 0.6, 0.8])
    features = F.normalize(torch.tensor([0.0, 0.1, 0.6, 0.8]), dim=0).reshape(1, 4, 1, 1)
    scores = class_scores(features, prototypes)
    assert scores.argmax(1).item() == 1  # class 1's second sub-prototype is the closest
    assert scores.mean().abs() < 1e-5  # LayerNorm over classes


# -- prototype updating prototype ------------------------------------------------------------------
@pytest.mark.parametrize(("count", "k", "noise", "preference"), [(40, 2, 0.01, 0.05), (60, 3, 0.03, 0.1)])
def test_sinkhorn_splits_a_class_equally_even_when_every_pixel_prefers_one_prototype(
    count: int, k: int, noise: float, preference: float
):
    torch.manual_seed(0)
    scores = torch.randn(count, k) * noise
    scores[:, 0] += preference  # (almost) every pixel prefers sub-prototype 0
    assert int((scores.argmax(1) == 0).sum()) > 0.9 * count  # a plain argmax would collapse onto it
    assignment = sinkhorn(scores, iterations=4, epsilon=0.05)
    # Each pixel's row is a distribution over the K sub-prototypes ...
    assert torch.allclose(assignment.sum(1), torch.ones(count), atol=1e-5)
    # ... and the class's pixels are split equally: every sub-prototype receives count / K of the mass.
    assert torch.allclose(assignment.sum(0), torch.full((k,), count / k), rtol=1e-3, atol=0.0)
    # So the hard targets (argmax) do not collapse either: every sub-prototype gets a fair share.
    assert int(torch.bincount(assignment.argmax(1), minlength=k).min()) >= count / (2 * k)


def test_layer_groups_cut_layers_boundary_to_interior_into_k_slots():
    prototypes = torch.eye(5)
    labels = torch.tensor([1, 1, 1, 1, 2])
    depth = torch.tensor([3.0, 1.0, 4.0, 2.0, 0.0])
    grouped, present = layer_groups(prototypes, labels, depth, 3, 2)
    assert present.tolist() == [False, True, True]
    assert torch.allclose(grouped[1, 0], F.normalize(prototypes[[1, 3]].sum(0), dim=0))  # shallowest two
    assert torch.allclose(grouped[1, 1], F.normalize(prototypes[[0, 2]].sum(0), dim=0))
    assert torch.equal(grouped[2, 0], grouped[2, 1])  # one layer fills both slots
    assert grouped[0].abs().sum() == 0


def _method(**params) -> PCCS:
    return PCCS(PCCSParams(K=2, embed_dim=3, gamma=0.9, mix_momentum=0.8, **params), num_classes=2)


def test_prototype_update_moves_only_slots_with_agreeing_pixels_then_mixes_in_layer_prototypes():
    torch.manual_seed(0)
    method = _method()
    before = method.bank.prototypes.clone()
    layer = torch.nn.Conv2d(3, 4, 1, bias=False)
    with torch.no_grad():  # student sub-prototypes: class 0 = e0 (both slots), class 1 = e1
        layer.weight.copy_(torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]])[..., None, None])
    features = torch.tensor([[1.0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0]]).T.reshape(1, 3, 2, 2)
    teacher = F.normalize(torch.tensor([[1.0, 0, 1], [1, 0, 1], [0, 1, 1], [0, 1, 1]]), dim=1)
    z_teacher = teacher.T.reshape(1, 3, 2, 2)
    teacher_labels = torch.tensor([[[0, 0], [1, 1]]])  # the student says class 0 everywhere
    nothing = (torch.zeros(2, 2, 3), torch.zeros(2, dtype=torch.bool))
    aux = method._update_prototypes(layer, features, z_teacher, teacher_labels, nothing)
    moved = F.normalize(0.9 * before[0] + 0.1 * teacher[0], dim=-1)
    after = method.bank.prototypes
    changed = [not torch.allclose(after[0, k], before[0, k]) for k in range(2)]
    assert any(changed)  # agreeing class-0 pixels moved the slot(s) they were sampled into
    for k in range(2):
        assert torch.allclose(after[0, k], moved[k]) or torch.allclose(after[0, k], before[0, k])
    assert torch.equal(after[1], before[1])  # class 1: teacher and student disagree, no update
    assert method._last["pccs_agreement"] == 0.5
    aux.backward()  # l_aux trains the student's prototype layer
    assert torch.isfinite(aux) and layer.weight.grad.abs().sum() > 0
    layer_prototypes = F.normalize(torch.tensor([[[0.0, 0, 1], [0, 0, 1]], [[0, 0, 0], [0, 0, 0]]]), dim=-1)
    snapshot = method.bank.prototypes.clone()
    only_class_0 = (layer_prototypes, torch.tensor([True, False]))
    method._update_prototypes(layer, features, z_teacher, torch.ones_like(teacher_labels), only_class_0)
    mixed = F.normalize(0.8 * snapshot[0] + 0.2 * layer_prototypes[0], dim=-1)
    assert torch.allclose(method.bank.prototypes[0], mixed)  # class 0: only the layer mixing moved it
    assert torch.equal(method.bank.prototypes[1], snapshot[1])  # no agreement, no layers: untouched


def test_without_proto_update_every_sub_prototype_follows_the_class_mean():
    method = _method(proto_update=False)
    before = method.bank.prototypes.clone()
    z_teacher = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1, 0]]), dim=1).T.reshape(1, 3, 1, 2)
    method._class_mean_update(z_teacher, torch.tensor([[[0, 0]]]))
    mean = F.normalize(torch.tensor([1.0, 1.0, 0.0]), dim=0)
    assert torch.allclose(method.bank.prototypes[0], F.normalize(0.9 * before[0] + 0.1 * mean, dim=-1))
    assert torch.equal(method.bank.prototypes[1], before[1])


def test_initial_prototypes_are_fixed_unit_vectors_independent_of_the_torch_seed():
    torch.manual_seed(1)
    first = _method().bank.prototypes
    torch.manual_seed(2)
    assert torch.equal(first, _method().bank.prototypes)
    assert torch.allclose(first.norm(dim=-1), torch.ones(2, 2))


# -- the method in the trainer ---------------------------------------------------------------------
def _trainer(tmp_path, iterations=4, subdir="run", **params) -> Trainer:
    config = config_from_dict(tiny_config_dict(tmp_path / subdir, "pccs", iterations, **params))
    return Trainer(config, load_data(config.data))


ALL_TERMS = {"supervised", "uncertainty_consistency", "prototype_contrast", "prototype_aux"}


@pytest.mark.parametrize("levels", ["rings", "bands"])
def test_one_step_on_cpu_has_every_term_finite_with_gradient(tmp_path, levels):
    trainer = _trainer(tmp_path, **{**FAST, "sdm_levels": levels, "sdm_images": "all"})
    terms = trainer.method.training_step(trainer.batches(0), trainer.models, StepInfo(0, 4))
    assert set(terms) == ALL_TERMS
    assert all(torch.isfinite(value) for value in terms.values())
    torch.stack(list(terms.values())).sum().backward()
    for name in ("projection", "prototypes"):
        assert all(
            p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.models.extra[name].parameters()
        )
    assert terms["prototype_contrast"] > 0  # labelled images bring several classes, hence negatives
    trainer.train_step(1, trainer.batches(1))  # and the trainer's full step (backward, SGD, EMA) runs


@pytest.mark.parametrize(
    ("switch", "removed"),
    [("unc_consistency", "uncertainty_consistency"), ("proto_update", "prototype_aux"),
     ("contrast", "prototype_contrast")],
)  # fmt: skip
def test_each_switch_removes_its_term(tmp_path, switch, removed):
    trainer = _trainer(tmp_path, **FAST, **{switch: False})
    terms = trainer.method.training_step(trainer.batches(0), trainer.models, StepInfo(0, 4))
    assert set(terms) == ALL_TERMS - {removed}


def test_switching_off_sdm_layers_or_uncertainty_weights_changes_the_contrast(tmp_path):
    def contrast(subdir, **params):
        trainer = _trainer(tmp_path, subdir=subdir, **{**FAST, "sdm_images": "all", **params})
        terms = trainer.method.training_step(trainer.batches(0), trainer.models, StepInfo(0, 4))
        return terms["prototype_contrast"], trainer.method.diagnostics()["pccs_prototypes"]

    full, count = contrast("full")
    plain, _ = contrast("plain", unc_weight=False)
    class_means, mean_count = contrast("means", sdm_protos=False)
    assert plain != full  # same batch and prototypes, other weights
    assert 4 <= mean_count < count  # one prototype per (image, class) instead of one per layer
    assert torch.isfinite(class_means) and class_means > 0


@pytest.mark.parametrize(
    "options",
    [{"pseudo_source": "teacher", "consistency_weighting": "soft"},
     {"consistency_weighting": "hard", "ent_reduce": "mean", "unc_sign": -1, "sdm_levels": "rings"}],
)  # fmt: skip
def test_options_run_and_give_finite_terms(tmp_path, options):
    trainer = _trainer(tmp_path, **{**FAST, **options})
    terms = trainer.method.training_step(trainer.batches(0), trainer.models, StepInfo(0, 4))
    assert set(terms) == ALL_TERMS and all(torch.isfinite(value) for value in terms.values())


def test_shipped_config_is_valid_and_pccs_with_bands_in_the_benchmark():
    from pathlib import Path

    from mpcl.training.config import load_config
    from tests.benchmark_helpers import load_benchmark

    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "configs" / "acdc_pccs_3labeled.yaml")
    assert config.method.name == "pccs" and config.method.params["sdm_levels"] == "rings"
    method = build_method(config.method, 4)
    assert method.params.base.mix == "bcp" and method.ema_decay == 0.99  # BCP's recipe, as its config
    assert config.train.iterations == 40000 and config.train.poly_power == 0.0
    assert method.stage_switches(config.train.iterations) == [StageSwitch(10000, "best")]
    benchmark = load_benchmark("ssl_acdc")
    assert benchmark.VARIANTS["pccs_bcp"] == (
        "configs/acdc_pccs_3labeled.yaml",
        {"method.params.sdm_levels": "bands"},
    )


def test_phases_supervised_then_consistency_then_prototypes(tmp_path):
    trainer = _trainer(tmp_path, consistency_start=2, warmup_iterations=4, embed_dim=16)
    seen = []
    for iteration in (1, 2, 4):
        terms = trainer.method.training_step(
            trainer.batches(iteration), trainer.models, StepInfo(iteration, 10)
        )
        seen.append(set(terms))
    assert seen == [{"supervised"}, {"supervised", "uncertainty_consistency"}, ALL_TERMS]
    assert trainer.method.consistency_weight(StepInfo(1, 10)) == 0
    assert (
        0
        < trainer.method.consistency_weight(StepInfo(5, 10))
        < trainer.method.consistency_weight(StepInfo(10, 10))
    )


@pytest.mark.slow
def test_prototypes_and_student_survive_a_resume_exactly(tmp_path):
    params = {**FAST, "warmup_iterations": 1}
    straight, resumed = straight_and_resumed(
        lambda subdir: _trainer(tmp_path, subdir=subdir, **params), tmp_path
    )
    assert torch.equal(straight.method.bank.prototypes, resumed.method.bank.prototypes)
    assert not torch.equal(straight.method.bank.prototypes, _method_like(straight).bank.prototypes)
    resumed_student = resumed.models.student.state_dict()
    for name, value in straight.models.student.state_dict().items():
        assert torch.equal(value, resumed_student[name])
    header = (tmp_path / "straight" / "train_log.csv").read_text().splitlines()[0]
    assert "loss_prototype_aux" in header and "pccs_agreement" in header


def _method_like(trainer: Trainer) -> PCCS:
    return PCCS(trainer.method.params, trainer.method.num_classes)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters only: a frozen teacher in training mode still updates its batch-norm buffers."""
    return {name: value.clone() for name, value in module.named_parameters()}


@pytest.mark.slow
def test_frozen_teacher_is_the_trainers_teacher_never_moves_and_survives_a_resume(tmp_path):
    params = {**FAST, "teacher_update": "frozen"}
    trainer = _trainer(tmp_path, subdir="frozen", **params)
    assert trainer.method.teacher_update().kind == "frozen"
    initial = _weights(trainer.models.teacher)
    initial_head = _weights(trainer.models.teacher_extra)
    trainer.fit(stop_at=2, progress=False)
    teacher = trainer.models.teacher
    assert all(torch.equal(value, initial[name]) for name, value in _weights(teacher).items())
    assert all(torch.equal(v, initial_head[n]) for n, v in _weights(trainer.models.teacher_extra).items())
    assert not all(torch.equal(v, initial[n]) for n, v in _weights(trainer.models.student).items())
    assert set(trainer.method.state_dict()) == {"bank"}  # the teacher is the trainer's, in the checkpoint
    resumed = _trainer(tmp_path, subdir="frozen", **params)
    resumed.resume_from(tmp_path / "frozen" / "latest.pt")
    _same_state(teacher, resumed.models.teacher)
    ema = _trainer(tmp_path, subdir="ema", **FAST)
    ema.fit(stop_at=2, progress=False)
    assert not all(torch.equal(v, initial[n]) for n, v in _weights(ema.models.teacher).items())


def _earlier_frozen_layout(trainer: Trainer, path, moved: float = 1.0) -> tuple[dict, dict]:
    """A checkpoint as earlier versions wrote it for ``teacher_update: frozen``: PCCS's frozen teacher
    (network and projection head) in the method state, and a trainer teacher that had moved by EMA."""
    from mpcl.nn.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(path)
    frozen = {f"network.{k}": v for k, v in state["teacher"].items()}
    frozen.update({k: v for k, v in state["teacher_extra"].items() if k.startswith("projection.")})
    state["method_state"]["frozen_teacher"] = frozen
    state["teacher"] = {k: v + moved if v.is_floating_point() else v for k, v in state["teacher"].items()}
    save_checkpoint(path, state)
    return frozen, state


@pytest.mark.slow
def test_a_checkpoint_of_the_earlier_frozen_layout_resumes_with_its_frozen_copy_as_the_teacher(tmp_path):
    params = {**FAST, "teacher_update": "frozen"}
    trainer = _trainer(tmp_path, subdir="old", **params)
    trainer.fit(stop_at=2, progress=False)
    frozen, _ = _earlier_frozen_layout(trainer, tmp_path / "old" / "latest.pt")
    resumed = _trainer(tmp_path, subdir="old", **params)
    resumed.resume_from(tmp_path / "old" / "latest.pt")
    teacher = resumed.models.teacher.state_dict()
    network = {name[len("network.") :]: v for name, v in frozen.items() if name.startswith("network.")}
    assert network and all(torch.equal(teacher[name], value) for name, value in network.items())
    head = resumed.models.teacher_extra.state_dict()
    assert all(torch.equal(head[name], v) for name, v in frozen.items() if name.startswith("projection."))
    with pytest.raises(ValueError, match="earlier checkpoint layout"):
        resumed.method.load_state_dict({"bank": resumed.method.bank.state_dict(), "frozen_teacher": frozen})


def test_a_checkpoint_of_the_earlier_frozen_layout_on_the_copy_paste_base_is_refused(tmp_path):
    params = {**FAST, "teacher_update": "frozen", "base": {"mix": "bcp", "pretrain_iterations": 2}}
    trainer = _trainer(tmp_path, subdir="old", **params)
    trainer.save("latest.pt", 0)
    _earlier_frozen_layout(trainer, tmp_path / "old" / "latest.pt")
    with pytest.raises(ConfigError, match="latest.pt: written when pccs with teacher_update: frozen on base"):
        _trainer(tmp_path, subdir="old", **params).resume_from(tmp_path / "old" / "latest.pt")


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="method.params.K must be >= 1"):
        config_from_dict(tiny_config_dict(tmp_path, "pccs", K=0))
    with pytest.raises(ConfigError, match="unknown key 'method.params.sdm_level'"):
        config_from_dict(tiny_config_dict(tmp_path, "pccs", sdm_level="bands"))
    with pytest.raises(ConfigError, match="method.params.sdm_levels must be one of"):
        config_from_dict(tiny_config_dict(tmp_path, "pccs", sdm_levels="ring"))
    data = tiny_config_dict(tmp_path, "pccs")
    data["train"]["unlabeled_batch"] = 0
    with pytest.raises(ConfigError, match="unlabeled_batch >= 1"):
        config_from_dict(data)


# -- on either base --------------------------------------------------------------------------------
ALL_OFF = {"sdm_protos": False, "unc_weight": False, "contrast": False, "proto_update": False,
           "unc_consistency": False}  # fmt: skip


def _same_state(first: torch.nn.Module, second: torch.nn.Module) -> None:
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
@pytest.mark.parametrize(("base", "mix"), [("supervised", "none"), ("bcp", "bcp")])
def test_all_switches_off_is_the_base_method_bit_for_bit_through_pccs_own_view(tmp_path, base, mix):
    """PCCS's own view code (not a hand-over to the base) with every component off gives the base's
    weights: ``mix: none`` is the supervised ½(CE + Dice) baseline PCCS builds on (the unlabelled slices
    join the student's pass only when a component uses them); ``mix: bcp`` is BCP across its stage switch
    (restored best stage-1 state, teacher copy, self-training)."""
    params = {"pretrain_iterations": 2} if mix == "bcp" else {}
    config = config_from_dict(tiny_config_dict(tmp_path / "base", base, 4, **params))
    reference = Trainer(config, load_data(config.data))
    reference.fit(stop_at=4, progress=False)
    pccs = _trainer(tmp_path, subdir="pccs", **ALL_OFF, base={"mix": mix, **params})
    calls = []
    view = pccs.method._copy_paste_view if mix == "bcp" else pccs.method._supervised_view
    setattr(pccs.method, view.__name__, lambda *args: calls.append(1) or view(*args))
    pccs.fit(stop_at=4, progress=False)
    assert len(calls) == 4 and pccs.models.extra is None
    _same_state(reference.models.student, pccs.models.student)
    if mix == "bcp":
        _same_state(reference.models.teacher, pccs.models.teacher)
        assert (tmp_path / "pccs" / "best_stage_end_2.pt").is_file()


@pytest.mark.parametrize("passes", ["separate", "joint"])
def test_on_bcp_pretraining_is_bcp_alone_then_every_term_works_on_the_mixed_inputs(tmp_path, passes):
    trainer = _trainer(
        tmp_path, **FAST, base={"mix": "bcp", "pretrain_iterations": 1, "forward_passes": passes}
    )
    method, models = trainer.method, trainer.models
    assert method.stage_switches(4) == [StageSwitch(1, "best")]
    terms = method.training_step(trainer.batches(0), models, StepInfo(0, 4))
    assert set(terms) == {"copy_paste_labeled"}  # pre-training: BCP's loss alone, whatever the phases
    trainer.train_step(0, trainer.batches(0))
    terms = method.training_step(trainer.batches(1), models, StepInfo(1, 4))
    assert set(terms) == ALL_TERMS - {"supervised"} | {"copy_paste_bidirectional"}
    assert all(torch.isfinite(value) for value in terms.values())
    torch.stack(list(terms.values())).sum().backward()
    for name in ("projection", "prototypes"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in models.extra[name].parameters())


def test_on_bcp_labels_are_the_mixed_label_map_and_the_prototypes_move_with_pseudo_labelled_pixels(tmp_path):
    trainer = _trainer(tmp_path, **FAST, base={"mix": "bcp", "pretrain_iterations": 0})
    method, models, batch, step = trainer.method, trainer.models, trainer.batches(0), StepInfo(0, 4)
    torch.manual_seed(5)
    _, view = method._copy_paste_view(batch, models, step, models.teacher)
    torch.manual_seed(5)  # the same box and teacher dropout
    mixed = copy_paste_step(method.params.base, method.num_classes, batch, models, step)
    assert torch.equal(view.labels, mixed.target)  # ground truth from labelled slices, pseudo-label elsewhere
    assert torch.equal(view.update_pixels, ~mixed.from_labeled)
    assert view.split == batch.labeled_image.shape[0] // 2 and view.layer_first == 0  # l_c per mixed input
    assert view.student.logits.shape[0] == batch.labeled_image.shape[0]


def test_ema_decay_lives_in_the_base_and_the_old_key_still_loads(tmp_path):
    assert PCCSParams().base.ema_decay == 0.99
    assert PCCSParams(ema_decay=0.95).base.ema_decay == 0.95  # configs written before the base
    assert PCCSParams(base=PCCSBaseParams(ema_decay=0.9)).base.ema_decay == 0.9
    old = config_from_dict(tiny_config_dict(tmp_path, "pccs", ema_decay=0.95))
    assert Trainer(old, load_data(old.data)).method.ema_decay == 0.95
    with pytest.raises(ConfigError, match="ema_decay and method.params.base.ema_decay differ"):
        config_from_dict(tiny_config_dict(tmp_path, "pccs", ema_decay=0.95, base={"ema_decay": 0.9}))
    data = tiny_config_dict(tmp_path, "pccs", base={"mix": "bcp"})
    data["train"]["labeled_batch"] = 3
    with pytest.raises(ConfigError, match="labeled_batch even"):
        config_from_dict(data)
