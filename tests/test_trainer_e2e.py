"""End to end on the phantom: train → checkpoint → resume (bit-exact) → evaluate → NIfTI predictions."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from mpcl.errors import ConfigError, InputError
from mpcl.nn.checkpoint import load_checkpoint
from mpcl.training.data.loading import load_data
from mpcl.training.evaluate import evaluate_volumes
from mpcl.training.trainer import Trainer, build_network

pytestmark = pytest.mark.slow  # every test trains


def _train(config, stop_at=None, resume=None):
    trainer = Trainer(config, load_data(config.data))
    if resume is not None:
        trainer.resume_from(resume)
    return trainer, trainer.fit(stop_at=stop_at, progress=False)


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


METHOD_PARAMS = {
    "supervised": {},
    "mean_teacher": {"consistency_start": 0, "consistency": 1.0},
    "bcp": {"pretrain_iterations": 2},  # the resume point (4) lies in the self-training stage
}


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_train_checkpoint_resume_is_exact(tiny_config, method):
    params = METHOD_PARAMS[method]
    straight_trainer, straight = _train(tiny_config(method, iterations=6, subdir="straight", **params))
    config = tiny_config(method, iterations=6, subdir="interrupted", **params)
    _, first = _train(config, stop_at=4)  # stops between checkpoints: latest.pt is written at 4
    assert load_checkpoint(first.last_checkpoint)["iteration"] == 4
    resumed_trainer, resumed = _train(config, resume=first.last_checkpoint)
    assert resumed.iterations_run == 2
    _assert_same_weights(
        straight_trainer.models.student.state_dict(), resumed_trainer.models.student.state_dict()
    )
    if straight_trainer.models.teacher is not None:
        _assert_same_weights(
            straight_trainer.models.teacher.state_dict(), resumed_trainer.models.teacher.state_dict()
        )
    # the logs of the resumed run continue the interrupted one without duplicated rows
    rows = [int(r["iteration"]) for r in resumed_trainer.train_log.rows()]
    assert rows == [1, 2, 3, 4, 5, 6]
    validations = [2, 3, 6] if method == "bcp" else [3, 6]  # BCP also validates at the end of stage 1
    assert [int(r["iteration"]) for r in resumed_trainer.val_log.rows()] == validations
    for name in ("best.pt", "latest.pt", "train_log.csv", "val_log.csv", "curves.png", "train_summary.json"):
        assert (resumed.output_dir / name).is_file(), name


def test_training_learns_on_the_phantom(tiny_config):
    config = tiny_config("supervised", iterations=100)
    config.train.val_every = 50
    config.train.lr = 0.05
    config.train.labeled_batch = 4
    trainer, result = _train(config)
    losses = np.array([float(row["loss"]) for row in trainer.train_log.rows()])
    assert losses[-10:].mean() < 0.5 * losses[:10].mean()
    best_lv_dice = max(float(row["dice_LV"]) for row in trainer.val_log.rows())
    assert best_lv_dice > 0.3  # an untrained network scores ~0; the LV is the easiest structure
    summary = json.loads((result.output_dir / "train_summary.json").read_text())
    assert summary["best_val_mean_dice"] == pytest.approx(result.best_val_dice)


def test_checkpoint_metadata_and_evaluation_writes_geometry(tiny_config, tmp_path):
    config = tiny_config("supervised", iterations=3)
    _, result = _train(config)
    state = load_checkpoint(result.best_checkpoint)
    metadata = state["metadata"]
    assert metadata["class_names"] == ["background", "RV", "myocardium", "LV"]
    assert metadata["patch_size"] == [32, 32] and metadata["normalization"] == {"scheme": "minmax"}
    assert metadata["method"] == "supervised" and metadata["mpcl_version"]
    model = build_network(config, 4)
    model.load_state_dict(state["student"])
    data = load_data(config.data)
    out = tmp_path / "pred"
    report = evaluate_volumes(model, data.test_volumes, data.class_names, (32, 32), torch.device("cpu"), out)
    assert set(report["summary"]) == {"RV", "myocardium", "LV", "mean"}
    volume = data.test_volumes[0]
    written = sitk.ReadImage(str(out / f"{volume.name}.nii.gz"))
    assert written.GetSpacing() == pytest.approx(volume.spacing)
    assert written.GetOrigin() == pytest.approx(volume.origin)
    assert sitk.GetArrayFromImage(written).shape == volume.image.shape


def test_evaluation_slices_along_the_thick_axis():
    from mpcl.backends.torch_backend import TorchBackend
    from mpcl.inference import InferenceSettings, segment_volume

    model = build_network_for_test()
    image = np.random.default_rng(0).random((20, 24, 5)).astype(np.float32)  # x is the thick axis
    backend = TorchBackend.from_module(model, torch.device("cpu"))
    with_maps = InferenceSettings((32, 32), batch_size=16, probabilities=True)
    prediction = segment_volume(image, (9.0, 1.0, 1.0), backend, with_maps)
    assert prediction.slice_axis == 2
    assert prediction.probabilities.shape == (4, 20, 24, 5)
    np.testing.assert_allclose(prediction.probabilities.sum(0), 1.0, atol=1e-5)
    labels = segment_volume(image, (9.0, 1.0, 1.0), backend, InferenceSettings((32, 32))).labels
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, prediction.probabilities.argmax(0))


def build_network_for_test():
    torch.manual_seed(0)
    from mpcl.nn.unet import UNet

    return UNet(channels=[4, 8, 8, 16, 16])


def test_resume_refuses_other_config_and_non_checkpoints(tiny_config, tmp_path):
    config = tiny_config("supervised", iterations=3)
    _, result = _train(config)
    other = tiny_config("supervised", iterations=5, subdir="other")
    trainer = Trainer(other, load_data(other.data))
    with pytest.raises(ConfigError, match="different config"):
        trainer.resume_from(result.last_checkpoint)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pt: not a loadable MPCL checkpoint"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(InputError, match="foreign.pt: not an MPCL checkpoint"):
        load_checkpoint(foreign)
    pickled_object = tmp_path / "object.pt"
    torch.save({"format": "mpcl-checkpoint", "payload": object()}, pickled_object)
    with pytest.raises(InputError, match="object.pt: not a loadable MPCL checkpoint"):
        load_checkpoint(pickled_object)
