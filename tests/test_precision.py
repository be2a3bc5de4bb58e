"""Mixed precision and channels-last training (``train.precision``, ``train.channels_last``).

On the CPU: bf16 steps of every method are finite with the losses, prototype machinery, weights, EMA
teacher and banks in float32; the fp32 step is the plain step bit for bit; checkpoints record the precision
and a resume in another one is refused; bf16 resumes exactly; channels-last gives NCHW's losses.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mpcl.errors import ConfigError
from mpcl.nn.checkpoint import load_checkpoint, save_checkpoint
from mpcl.training.config import config_from_dict
from mpcl.training.data.loading import load_data
from mpcl.training.losses.dice import ce_dice_loss
from mpcl.training.losses.pccs import sinkhorn
from mpcl.training.losses.prototypes import pixel_prototype_contrast, prototype_logits
from mpcl.training.methods import StepInfo
from mpcl.training.precision import resolve_precision, run_fp32, to_float32
from mpcl.training.trainer import Trainer, ema_update, poly_lr, resolve_channels_last
from tests.conftest import straight_and_resumed, tiny_config_dict

BARL_LOOSE = {"tau": 0.0, "tau_s": 0.0, "ra_min_pixels": 1, "ia_min_size": 1, "pcbc_schedule": "constant"}
# every method with every term on from the first steps (tiny phantom, 32x32)
METHODS = {
    "supervised": ("supervised", {}),
    "mean_teacher": ("mean_teacher", {"consistency_start": 0, "consistency": 1.0}),
    "bcp": ("bcp", {"pretrain_iterations": 1}),
    "mpcl_bcp": (
        "mpcl",
        {
            "base": {"mix": "bcp", "pretrain_iterations": 1},
            "warmup_iterations": 0,
            "tau_conf": 0.5,
            "n_min": 1,
        },
    ),
    "mpcl_mt": (
        "mpcl",
        {"base": {"consistency_start": 0}, "warmup_iterations": 0, "tau_conf": 0.5, "n_min": 1},
    ),
    "pccs": (
        "pccs",
        {"consistency_start": 0, "warmup_iterations": 0, "embed_dim": 16, "sdm_levels": "bands"},
    ),
    "barl": ("barl", BARL_LOOSE),
}
# the float32 heads of each method (their outputs become similarities)
FLOAT32_HEADS = {
    "mpcl_bcp": ("projection",),
    "mpcl_mt": ("projection",),
    "pccs": ("projection", "prototypes"),
    "barl": ("embed_a", "embed_b"),
}


def _config(tmp_path, name, precision="fp32", channels_last=False, iterations=4, subdir="run", **model):
    method, params = METHODS[name]
    data = tiny_config_dict(tmp_path / subdir, method, iterations, **params)
    if method == "barl":
        data["model"]["deep_supervision"] = True
    data["model"].update(model)
    data["train"].update(precision=precision, channels_last=channels_last)
    return config_from_dict(data)


def _trainer(tmp_path, name, precision="fp32", channels_last=False, iterations=4, subdir="run", **model):
    config = _config(tmp_path, name, precision, channels_last, iterations, subdir, **model)
    return Trainer(config, load_data(config.data))


def _modules(trainer):
    models = trainer.models
    return [m for m in (models.student, models.teacher, models.extra, models.teacher_extra) if m is not None]


def _record_conv_dtypes(module: nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d):
            layer.register_forward_hook(lambda _m, _i, output: seen.append(output.dtype))
    return seen


# -- config ------------------------------------------------------------------------------------------
def test_precision_defaults_to_fp32_and_fp16_needs_cuda(tmp_path):
    config = config_from_dict(tiny_config_dict(tmp_path, "supervised"))
    assert config.train.precision == "fp32" and config.train.channels_last == "auto"
    data = tiny_config_dict(tmp_path, "supervised")
    data["train"]["precision"] = "fp16"  # tiny configs train on the cpu
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU and train.device is cpu; use bf16"):
        config_from_dict(data)
    data["train"]["precision"] = "fp8"
    with pytest.raises(
        ConfigError, match=r"train.precision must be one of \['fp32', 'bf16', 'fp16', 'auto'\]"
    ):
        config_from_dict(data)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cpu)  # device: auto on a machine without a GPU


# -- float32 where it matters --------------------------------------------------------------------------
def test_losses_and_similarities_stay_float32_under_autocast():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)
    target = torch.randint(0, 4, (2, 8, 8))
    z = nn.functional.normalize(torch.randn(2, 6, 8, 8), dim=1)
    bank = nn.functional.normalize(torch.randn(4, 2, 6), dim=-1)
    valid = torch.ones(4, 2, dtype=torch.bool)
    groups = torch.randint(0, 2, (2, 8, 8))
    scores = torch.randn(50, 3)
    expected = [
        ce_dice_loss(logits.bfloat16(), target),
        prototype_logits(z, bank, valid),
        sinkhorn(scores),
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mm(scores, scores.T).dtype == torch.bfloat16  # autocast is on here
        got = [ce_dice_loss(logits.bfloat16(), target), prototype_logits(z, bank, valid), sinkhorn(scores)]
        torch.manual_seed(1)
        contrast = pixel_prototype_contrast(z.bfloat16(), target, groups, bank, valid)
        head = run_fp32(nn.Conv2d(6, 3, 1), z.bfloat16())
    for value, reference in zip(got, expected, strict=True):
        assert value.dtype == torch.float32
        assert torch.equal(value, reference)  # the float32 computation exactly, not a bf16 one
    torch.manual_seed(1)
    assert torch.equal(contrast, pixel_prototype_contrast(z.bfloat16().float(), target, groups, bank, valid))
    assert head.dtype == torch.float32


def test_to_float32_keeps_float32_tensors_and_structures():
    x, h = torch.ones(2), torch.ones(2, dtype=torch.bfloat16)
    assert to_float32(x) is x  # fp32 runs are untouched
    converted = to_float32([h, (h, 3), {"k": h}])
    assert converted[0].dtype == torch.float32 and converted[1][0].dtype == torch.float32
    assert converted[1][1] == 3 and converted[2]["k"] is not None


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bf16_training_on_cpu_is_finite_with_float32_state(tmp_path, name):
    trainer = _trainer(tmp_path, name, "bf16")
    assert trainer.precision == "bf16"
    student_dtypes = _record_conv_dtypes(trainer.models.student)
    head_dtypes = [_record_conv_dtypes(trainer.models.extra[head]) for head in FLOAT32_HEADS.get(name, ())]
    before = {key: value.clone() for key, value in trainer.models.student.state_dict().items()}
    for iteration in range(2):
        loss, terms, _ = trainer.train_step(iteration, trainer.batches(iteration))
        assert math.isfinite(loss.item()) and loss.dtype == torch.float32
        assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in terms.values()), terms
    assert torch.bfloat16 in student_dtypes  # the networks did run in bf16
    for dtypes in head_dtypes:  # ... and the projection heads in float32
        assert dtypes and set(dtypes) == {torch.float32}
    for module in _modules(trainer):  # weights and the EMA teacher stay float32 (autocast casts copies)
        assert all(p.dtype == torch.float32 for p in module.parameters())
    momentum = [s["momentum_buffer"] for s in trainer.optimizer.state.values() if "momentum_buffer" in s]
    assert momentum and all(buffer.dtype == torch.float32 for buffer in momentum)
    if hasattr(trainer.method, "bank"):
        assert trainer.method.bank.prototypes.dtype == torch.float32
        assert trainer.method.bank.intensity.dtype == torch.float32
    after = trainer.models.student.state_dict()
    assert any(not torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize("name", ["supervised", "mean_teacher", "mpcl_bcp"])
def test_fp32_trainer_step_is_the_plain_step_bit_for_bit(tmp_path, name):
    """The default precision adds nothing to a step: no autocast, no scaler, no casts that change a bit."""
    trainer = _trainer(tmp_path, name, subdir="trainer")  # each trainer seeds torch: one at a time
    for iteration in range(2):
        trainer.train_step(iteration, trainer.batches(iteration))
    plain = _trainer(tmp_path, name, subdir="plain")
    models, train = plain.models, plain.config.train
    for iteration in range(2):
        for group in plain.optimizer.param_groups:
            group["lr"] = poly_lr(train.lr, iteration, train.iterations, train.poly_power)
        terms = plain.method.training_step(plain.batches(iteration), models, StepInfo(iteration, 4))
        loss = torch.stack(list(terms.values())).sum()
        plain.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        plain.optimizer.step()
        if models.teacher is not None:
            decay = min(1 - 1 / (iteration + 1), plain.method.ema_decay)
            ema_update(models.teacher, models.student, decay)
            if models.teacher_extra is not None:
                ema_update(models.teacher_extra, models.extra, decay)
    for ours, theirs in zip(_modules(trainer), _modules(plain), strict=True):
        for (key, value), other in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
            assert torch.equal(value, other), key


# -- checkpoints -----------------------------------------------------------------------------------------
def test_checkpoint_records_precision_and_refuses_another(tmp_path):
    bf16 = _trainer(tmp_path, "supervised", "bf16", subdir="bf16")
    checkpoint = bf16.save("latest.pt", 0)
    assert load_checkpoint(checkpoint)["precision"] == "bf16"
    fp32 = _trainer(tmp_path, "supervised", "fp32", subdir="bf16")
    with pytest.raises(ConfigError, match="trained in bf16 but this run trains in fp32; resume with train"):
        fp32.resume_from(checkpoint)


def test_checkpoints_from_before_precision_and_planning_resume_as_fp32_unplanned(tmp_path):
    trainer = _trainer(tmp_path, "supervised")
    trainer.train_step(0, trainer.batches(0))
    state = load_checkpoint(trainer.save("latest.pt", 1))
    for key in ("precision", "grad_scaler", "cuda_rng"):
        state.pop(key)
    for key in ("precision", "channels_last", "sync_batchnorm", "compile"):
        state["config"]["train"].pop(key)
    for key in ("slicing_axis", "target_spacing", "crop_to_nonzero", "ct_normalization"):
        state["config"]["data"].pop(key)  # the planned-geometry keys came later too
    old = save_checkpoint(tmp_path / "old.pt", {k: v for k, v in state.items() if not k.startswith("format")})
    resumed = _trainer(tmp_path, "supervised")
    resumed.resume_from(old)
    assert resumed.start_iteration == 1
    bf16 = _trainer(tmp_path, "supervised", "bf16", subdir="other")
    with pytest.raises(ConfigError, match="trained in fp32 but this run trains in bf16"):
        bf16.resume_from(old)


def test_the_gradient_scaler_path_steps_and_is_checkpointed(tmp_path):
    """fp16 (CUDA only) steps through a gradient scaler; its path and checkpointing, on the CPU with a CPU
    scaler in a bf16 run (benchmarks/gpu_check.py runs real fp16 steps on a GPU)."""
    trainer = _trainer(tmp_path, "bcp", "bf16")
    assert trainer.scaler is None  # bf16 needs none
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    before = trainer.models.student.head.weight.clone()
    for iteration in range(2):
        loss, _, _ = trainer.train_step(iteration, trainer.batches(iteration))
        assert math.isfinite(loss.item())
    assert not torch.equal(before, trainer.models.student.head.weight)
    assert trainer.scaler.get_scale() == 4096.0  # grew after each finite step
    checkpoint = trainer.save("latest.pt", 2)
    assert load_checkpoint(checkpoint)["grad_scaler"]["scale"] == 4096.0
    resumed = _trainer(tmp_path, "bcp", "bf16")
    resumed.scaler = torch.amp.GradScaler("cpu")
    resumed.resume_from(checkpoint)
    assert resumed.scaler.get_scale() == 4096.0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["supervised", "bcp"])
def test_bf16_resume_is_exact(tmp_path, name):
    straight, resumed = straight_and_resumed(
        lambda subdir: _trainer(tmp_path, name, "bf16", iterations=4, subdir=subdir), tmp_path
    )
    for ours, theirs in zip(_modules(straight), _modules(resumed), strict=True):
        for (key, value), other in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
            assert torch.equal(value, other), key
    assert load_checkpoint(tmp_path / "interrupted" / "latest.pt")["precision"] == "bf16"


# -- channels-last ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["supervised", "bcp"])
def test_channels_last_gives_the_nchw_losses(tmp_path, name):
    """Without dropout: a dropout mask is drawn in memory order, so channels-last draws other (equally
    likely) masks than NCHW and the two runs are alike only in distribution."""
    losses = {}
    for layout in ("nchw", "channels_last"):  # each trainer seeds torch: one at a time
        channels_last = layout == "channels_last"
        trainer = _trainer(tmp_path, name, channels_last=channels_last, subdir=layout, dropout=[0.0] * 5)
        losses[layout] = [trainer.train_step(i, trainer.batches(i))[0].item() for i in range(2)]
        if layout == "nchw":
            nchw = trainer
    last = trainer
    conv = last.models.student.head.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    if last.models.teacher is not None:
        assert last.models.teacher.head.weight.is_contiguous(memory_format=torch.channels_last)
    assert losses["channels_last"] == pytest.approx(losses["nchw"], rel=1e-5)
    for (key, value), other in zip(
        nchw.models.student.state_dict().items(), last.models.student.state_dict().values(), strict=True
    ):
        if value.is_floating_point():
            assert torch.allclose(value, other, rtol=1e-4, atol=1e-6), key


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(tmp_path, monkeypatch, caplog, native):
    from mpcl.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level("WARNING", logger="mpcl.train"):
        _trainer(tmp_path, "supervised", "bf16", iterations=1).fit(progress=False)
    assert ("bf16 on a CPU without native bf16" in caplog.text) is not native


def test_channels_last_auto_is_on_for_a_cpu_and_off_for_a_gpu(tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_channels_last("auto", cpu) is True and resolve_channels_last("auto", cuda) is False
    assert resolve_channels_last(False, cpu) is False and resolve_channels_last(True, cuda) is True
    data = tiny_config_dict(tmp_path, "supervised")
    data["train"]["channels_last"] = "yes"
    with pytest.raises(
        ConfigError, match=r"train.channels_last must be true or false or one of \['auto'\], got 'yes'"
    ):
        config_from_dict(data)
    config = config_from_dict(tiny_config_dict(tmp_path, "supervised"))
    trainer = Trainer(config, load_data(config.data))
    assert trainer.channels_last and trainer.models.student.head.weight.is_contiguous(
        memory_format=torch.channels_last
    )
