"""The plan applied: cropping, slicing axis, target spacing with patch-sized windows, CT normalisation,
in training, the checkpoint, the model package and Segmenter (mpcl.planned_geometry, mpcl.inference)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from click.testing import CliRunner

from mpcl.errors import ConfigError, InputError, ModelPackageError
from mpcl.inference import InferenceSettings, segment_volume
from mpcl.model_package import RESAMPLING_POLICY, build_model_json, load_model_package, parse_model_json
from mpcl.planned_geometry import (
    PlannedGeometry,
    PlannedInput,
    box_slices,
    nonzero_box,
    pad_to_patch,
    resample_images,
    resample_labels,
    resampled_shape,
    uncrop,
    window_starts,
)
from mpcl.preprocessing import normalize_intensity
from mpcl.training.config import config_from_dict
from tests.plan_helpers import Case, train_slim, write_dataset, write_volume

REPO = Path(__file__).resolve().parents[1]


class PointwiseBackend:
    """A stand-in network whose class-1 logit is a pixel's own intensity minus 0.5: its labels do not
    depend on where a window starts, so windowed inference must equal thresholding the whole slice.
    Records the input shapes it was given."""

    name, device = "pointwise", "cpu"

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.shapes.append(batch.shape)
        x = batch[:, 0] - 0.5
        return (np.stack([-x, x], axis=1) * 20).astype(np.float32)


# -- cropping ---------------------------------------------------------------------------------------


def test_crop_box_and_its_inverse_round_trip():
    rng = np.random.default_rng(0)
    volume = np.zeros((6, 20, 30), np.float32)
    volume[1:5, 3:17, 4:25] = rng.random((4, 14, 21)) + 0.1
    box = nonzero_box(volume)
    assert box == ((1, 5), (3, 17), (4, 25))
    cropped = volume[box_slices(box)]
    np.testing.assert_array_equal(uncrop(cropped, box, volume.shape), volume)
    assert nonzero_box(np.zeros((2, 3, 4))) == ((0, 2), (0, 3), (0, 4))  # nothing non-zero: keep all
    with pytest.raises(InputError, match="does not fill the crop box"):
        uncrop(cropped[:, 1:], box, volume.shape)


def test_outside_the_crop_box_is_background_and_the_output_keeps_the_grid():
    volume = np.zeros((5, 24, 28), np.float32)
    volume[1:4, 4:20, 6:22] = 0.2
    volume[2, 8:14, 10:16] = 0.9  # class 1 inside
    backend = PointwiseBackend()
    settings = InferenceSettings((16, 16), planned=PlannedGeometry(crop_to_nonzero=True), probabilities=True)
    prediction = segment_volume(volume, (1.0, 1.0, 3.0), backend, settings)
    assert prediction.labels.shape == volume.shape
    np.testing.assert_array_equal(prediction.labels, (volume > 0.5).astype(np.uint8))
    outside = np.ones(volume.shape, bool)
    outside[1:4, 4:20, 6:22] = False
    assert np.all(prediction.probabilities[0][outside] == 1) and np.all(
        prediction.probabilities[1][outside] == 0
    )
    assert len(backend.shapes) == 1 and backend.shapes[0][0] == 3  # only the box's 3 slices were run


def test_per_case_statistics_are_measured_inside_the_crop_box():
    volume = np.zeros((4, 10, 10), np.float32)
    volume[:, 2:8, 2:8] = np.arange(4 * 36, dtype=np.float32).reshape(4, 6, 6) + 100
    settings = InferenceSettings((16, 16), normalization={"scheme": "zscore"})
    from mpcl.inference import prepare_volume

    whole = prepare_volume(volume, settings)
    planned = prepare_volume(
        volume,
        InferenceSettings(
            (16, 16), normalization={"scheme": "zscore"}, planned=PlannedGeometry(crop_to_nonzero=True)
        ),
    )
    assert whole.crop_box is None and planned.crop_box == ((0, 4), (2, 8), (2, 8))
    inside = planned.data[box_slices(planned.crop_box)]
    assert abs(float(inside.mean())) < 1e-5 and abs(float(inside.std()) - 1) < 1e-4
    assert abs(float(whole.data[box_slices(planned.crop_box)].mean())) > 0.5  # the zeros shift the stats


# -- resampling to a target spacing and back --------------------------------------------------------


def test_resampling_an_anisotropic_slice_and_back_is_exact_for_a_linear_ramp():
    h, w, spacing, target = 9, 41, (3.0, 0.5), (1.0, 1.0)
    size = resampled_shape((h, w), spacing, target)
    assert size == (25, 21)  # (9 - 1) * 3 + 1, (41 - 1) * 0.5 + 1: the end pixels stay where they were
    rows, cols = np.meshgrid(np.arange(h) * spacing[0], np.arange(w) * spacing[1], indexing="ij")
    ramp = (0.3 * rows + 0.7 * cols).astype(np.float32)[None]
    fine = resample_images(ramp, size)
    rows_t, cols_t = np.meshgrid(np.arange(size[0]) * 1.0, np.arange(size[1]) * 1.0, indexing="ij")
    np.testing.assert_allclose(fine[0], 0.3 * rows_t + 0.7 * cols_t, atol=1e-4)  # same mm, same value
    np.testing.assert_allclose(resample_images(fine, (h, w)), ramp, atol=1e-4)


def test_labels_resample_through_one_hot_maps_and_keep_their_physical_extent():
    label = np.zeros((1, 9, 41), np.uint8)
    label[0, 3:6, 10:30] = 2  # rows 9..15 mm, columns 5..14.5 mm
    fine = resample_labels(label, resampled_shape((9, 41), (3.0, 0.5), (1.0, 1.0)), 3)
    rows, cols = np.nonzero(fine[0] == 2)
    assert (rows.min(), rows.max()) == (8, 16) and (cols.min(), cols.max()) == (5, 14)
    assert set(np.unique(fine)) == {0, 2}


def test_inference_at_a_target_spacing_maps_back_onto_the_anisotropic_grid():
    # slices across z; in-plane 2.0 x 0.5 mm resampled to 1 x 1 mm; the disc must come back where it was
    shape = (3, 20, 64)
    yy, xx = np.meshgrid(np.arange(20) * 2.0, np.arange(64) * 0.5, indexing="ij")
    disc = (((yy - 19) ** 2 + (xx - 16) ** 2) < 8**2).astype(np.float32)
    volume = np.repeat(disc[None], shape[0], axis=0)
    backend = PointwiseBackend()
    planned = PlannedGeometry(target_spacing=(1.0, 1.0))
    labels = segment_volume(
        volume, (0.5, 2.0, 5.0), backend, InferenceSettings((16, 16), planned=planned)
    ).labels
    assert labels.shape == shape
    agree = (labels == disc.astype(np.uint8)).mean()
    assert agree > 0.97  # only pixels on the disc's edge may differ after two interpolations
    assert all(s[1:] == (1, 16, 16) for s in backend.shapes)  # patch-sized windows only


# -- windows --------------------------------------------------------------------------------------


def test_window_starts_cover_the_slice_with_overlap():
    assert window_starts(10, 16) == [0]
    assert window_starts(40, 16) == [0, 8, 16, 24]
    assert window_starts(41, 16) == [0, 8, 16, 24, 25]
    padded, offset = pad_to_patch(np.ones((2, 5, 20), np.float32), (16, 16), -3.0)
    assert padded.shape == (2, 16, 20) and offset == (5, 0)
    assert padded[0, 0, 0] == -3.0 and padded[0, 5, 0] == 1.0


def test_sliding_windows_on_a_slice_larger_than_the_patch_equal_the_whole_slice():
    rng = np.random.default_rng(3)
    volume = rng.random((2, 50, 37)).astype(np.float32)
    backend = PointwiseBackend()
    planned = PlannedGeometry(target_spacing=(1.0, 1.0))  # the scan is at 1 mm already: no resampling
    settings = InferenceSettings((16, 16), planned=planned, batch_size=4, uncertainty=True)
    prediction = segment_volume(volume, (1.0, 1.0, 4.0), backend, settings)
    np.testing.assert_array_equal(prediction.labels, (volume > 0.5).astype(np.uint8))
    assert all(s[1:] == (1, 16, 16) for s in backend.shapes)
    windows = len(window_starts(50, 16)) * len(window_starts(37, 16))
    assert sum(s[0] for s in backend.shapes) == 2 * windows  # every window of every slice, in chunks
    assert max(s[0] for s in backend.shapes) <= 4
    assert prediction.uncertainty.shape == volume.shape


def test_a_slice_smaller_than_the_patch_is_padded_not_zoomed():
    volume = np.full((2, 10, 12), 0.2, np.float32)
    volume[:, 4:6, 4:8] = 0.9
    backend = PointwiseBackend()
    planned = PlannedGeometry(target_spacing=(1.0, 1.0))
    labels = segment_volume(
        volume, (1.0, 1.0, 2.0), backend, InferenceSettings((32, 32), planned=planned)
    ).labels
    np.testing.assert_array_equal(labels, (volume > 0.5).astype(np.uint8))
    assert backend.shapes == [(2, 1, 32, 32)]


# -- normalisation --------------------------------------------------------------------------------


def test_ct_uses_fixed_dataset_statistics_and_mr_each_case_its_own():
    rng = np.random.default_rng(1)
    dark = rng.normal(0, 50, (3, 8, 8)).astype(np.float32)
    bright = dark + 400  # the same anatomy, 400 HU brighter (e.g. contrast agent)
    ct = {"clip_lower": -100.0, "clip_upper": 300.0, "mean": 50.0, "std": 100.0}
    a, b = normalize_intensity(dark, "ct", ct), normalize_intensity(bright, "ct", ct)
    np.testing.assert_allclose(a, (np.clip(dark, -100, 300) - 50) / 100, rtol=1e-6, atol=1e-6)
    assert float(b.max()) == pytest.approx(2.5)  # clipped at 300 HU: the units keep their meaning
    assert float(a.mean()) < float(b.mean())
    mr_a, mr_b = normalize_intensity(dark, "zscore"), normalize_intensity(bright, "zscore")
    np.testing.assert_allclose(mr_a, mr_b, atol=1e-4)  # per case: the offset is normalised away
    with pytest.raises(InputError, match="missing"):
        normalize_intensity(dark, "ct", {"clip_lower": 0})
    with pytest.raises(InputError, match="clip_lower < clip_upper"):
        normalize_intensity(dark, "ct", {**ct, "std": 0})


def _data_config(**data) -> dict:
    return {"data": {"kind": "nifti_folder", "root": "/data", **data}}


def test_config_keys_for_the_plan_are_validated():
    config = config_from_dict(
        _data_config(
            normalization="ct",
            ct_normalization={"clip_lower": -100, "clip_upper": 300, "mean": 40, "std": 80},
            slicing_axis="x",
            target_spacing=[0.8, 0.8],
            crop_to_nonzero=True,
        )
    )
    assert config.data.target_spacing == (0.8, 0.8) and config.data.ct_normalization.std == 80.0
    for data, message in [
        ({"normalization": "ct"}, "needs data.ct_normalization"),
        ({"ct_normalization": {"clip_lower": 0, "clip_upper": 1, "mean": 0, "std": 1}}, "is set but"),
        ({"target_spacing": [0.8, 0]}, "0.001 to 100"),
        ({"slicing_axis": "w"}, "slicing_axis"),
        ({"kind": "phantom", "root": None, "crop_to_nonzero": True}, "nifti_folder only"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(_data_config(**data), "cfg.yaml")


# -- slicing axis -----------------------------------------------------------------------------------


def test_slicing_axis_ties_go_to_z_unless_the_plan_names_an_axis():
    auto = PlannedGeometry()
    assert auto.axis_for((1.0, 1.0, 1.0)) == 0  # isotropic: a tie, the first array axis
    assert auto.axis_for((1.0, 3.0, 3.0)) == 0  # y and z tied as coarsest: z
    assert auto.axis_for((5.0, 1.0, 1.0)) == 2
    assert PlannedGeometry(slicing_axis="x").axis_for((1.0, 1.0, 1.0)) == 2
    assert PlannedGeometry(slicing_axis="y").axis_for((1.0, 1.0, 9.0)) == 1
    volume = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    prediction = segment_volume(
        volume, (1.0, 1.0, 1.0), PointwiseBackend(), InferenceSettings((16, 16), planned=PlannedGeometry("x"))
    )
    assert prediction.slice_axis == 2 and prediction.labels.shape == volume.shape


# -- the model package ------------------------------------------------------------------------------


def _metadata(**extra) -> dict:
    return {
        "class_names": ["background", "a"],
        "normalization": {"scheme": "zscore"},
        "patch_size": [32, 32],
        "resize": "linear",
        **extra,
    }


def _package(root: Path, model_json: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.pt").write_bytes(b"weights")
    import hashlib

    model_json["files"] = {"torch": {"path": "model.pt", "sha256": hashlib.sha256(b"weights").hexdigest()}}
    (root / "model.json").write_text(json.dumps(model_json))
    return root


def test_model_json_records_the_plan_and_unplanned_packages_are_unchanged(tmp_path):
    unplanned = build_model_json(_metadata(), {})
    assert unplanned["resampling"] == RESAMPLING_POLICY  # written exactly as before the plan existed
    assert load_model_package(_package(tmp_path / "old", unplanned)).planned == PlannedGeometry()
    planned = PlannedGeometry("z", (0.75, 0.8), True)
    ct = {"scheme": "ct", "clip_lower": -100.0, "clip_upper": 250.0, "mean": 60.0, "std": 70.0}
    model_json = build_model_json(_metadata(planned_geometry=planned.to_dict(), normalization=ct), {})
    assert model_json["resampling"]["in_plane"] == "target_spacing"
    package = load_model_package(_package(tmp_path / "new", model_json))
    assert package.planned == planned and package.resize == "linear" and package.normalization == ct
    settings = InferenceSettings.for_package(package)
    assert settings.planned == planned and settings.normalization == ct
    sample = load_model_package(REPO / "plugins/slicer/MPCLSegmentation/Resources/SampleModel")
    assert sample.planned == PlannedGeometry() and not sample.planned.active


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"in_plane": "target_spacing"}, "without target_spacing_mm"),
        ({"in_plane": "target_spacing", "target_spacing_mm": [0.5, -1]}, "target_spacing"),
        ({"target_spacing_mm": [1, 1]}, "in_plane"),
        ({"crop": "box"}, "crop"),
        ({"slice_axis": "w"}, "slice_axis"),
    ],
)
def test_a_bad_planned_resampling_is_refused(tmp_path, change, message):
    model_json = build_model_json(_metadata(), {})
    model_json["resampling"].update(change)
    with pytest.raises(ModelPackageError, match=f"resampling policy .*{message}"):
        parse_model_json(json.loads(json.dumps({**model_json, "files": {}})), tmp_path)


def test_a_ct_normalization_without_its_statistics_is_refused(tmp_path):
    model_json = build_model_json(_metadata(normalization={"scheme": "ct", "mean": 1.0}), {})
    with pytest.raises(ModelPackageError, match="ct normalization needs"):
        load_model_package(_package(tmp_path / "p", model_json))


# -- the data loader --------------------------------------------------------------------------------


def _ring_case(name: str, matrix: int, spacing: float, pad: int, seed: int) -> Case:
    """A 4-slice MR-like case: a ring (class 1) and disc (class 2) of fixed size in mm on a positive
    background, on a ``matrix``² grid at ``spacing`` mm, inside a zero border of ``pad`` pixels."""
    rng = np.random.default_rng(seed)
    centre = (matrix - 1) / 2
    yy, xx = np.meshgrid(*(np.arange(matrix) - centre,) * 2, indexing="ij")
    radius = np.hypot(yy, xx) * spacing
    label2d = np.zeros((matrix, matrix), np.uint8)
    label2d[(radius > 8) & (radius < 14)] = 1
    label2d[radius <= 8] = 2
    image2d = np.choose(label2d, [200.0, 600.0, 900.0]).astype(np.float32)
    shape = (4, matrix + 2 * pad, matrix + 2 * pad)
    image = np.zeros(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    inner = (slice(None), slice(pad, pad + matrix), slice(pad, pad + matrix))
    image[inner] = image2d + rng.normal(0, 30, (4, matrix, matrix)).astype(np.float32).clip(-150, 150)
    label[inner] = label2d
    return Case(name, image, label, (spacing, spacing, 5.0), origin=(-12.5, 30.0, 4.0))


LABELS = {"background": 0, "ring": 1, "core": 2}
# training cases at three in-plane spacings and zero borders; the field of view is 40 mm in each
CASES = [("c0", 40, 1.0, 4), ("c1", 27, 1.5, 0), ("c2", 50, 0.8, 10), ("c3", 40, 1.0, 2)]


def _ring_dataset(root: Path) -> Path:
    cases = [_ring_case(name, m, s, p, seed=i) for i, (name, m, s, p) in enumerate(CASES)]
    return write_dataset(root, cases, channel_names={"0": "MRI"}, labels=LABELS)


def test_planned_loader_crops_resamples_and_cuts_patch_sized_windows(tmp_path):
    from mpcl.training.config_schema import DataConfig
    from mpcl.training.data.nifti_folder import load_nifti_folder

    root = _ring_dataset(tmp_path / "rings")
    config = DataConfig(
        kind="nifti_folder",
        root=str(root),
        val_cases=1,
        normalization="zscore",
        patch_size=(32, 32),
        target_spacing=(1.0, 1.0),
        crop_to_nonzero=True,
    )
    data = load_nifti_folder(config)
    assert data.normalization == {"scheme": "zscore"}
    assert all(item.image.shape == (32, 32) and item.label.shape == (32, 32) for item in data.labeled)
    # c0: 40 px at 1 mm (crop removes the border) -> 40 px -> windows at 0 and 8 in each direction
    c0 = [item for item in data.labeled if item.name.startswith("c0_")]
    assert len(c0) == 4 * 4
    # c1: 27 px at 1.5 mm -> 40 px at 1 mm; the core (radius 8 mm) has the same size in pixels as c0's
    core = {
        name: sum(
            int((item.label == 2).sum()) for item in data.labeled if item.name.startswith(f"{name}_slice_0_")
        )
        for name in ("c0", "c1")
    }
    assert core["c1"] == pytest.approx(core["c0"], rel=0.25)
    val = data.val_volumes[0]
    assert val.name == "c3" and val.planned == PlannedInput(
        PlannedGeometry(target_spacing=(1.0, 1.0), crop_to_nonzero=True), ((0, 4), (2, 42), (2, 42))
    )
    assert val.image.shape == (4, 44, 44)  # whole, on its own grid
    unplanned = load_nifti_folder(DataConfig(kind="nifti_folder", root=str(root), val_cases=1))
    assert unplanned.val_volumes[0].planned is None
    assert {item.image.shape for item in unplanned.labeled} == {(48, 48), (27, 27), (70, 70)}


# -- end to end -------------------------------------------------------------------------------------


@pytest.mark.slow  # trains a few iterations, packages, segments
def test_plan_train_package_and_segment_a_scan_at_another_spacing_and_size(tmp_path):
    from mpcl import Segmenter
    from mpcl.nn.checkpoint import load_checkpoint
    from mpcl.training.evaluate import volume_predictor
    from mpcl.training.plan_cli import plan_main
    from mpcl.training.trainer import inference_model_from_checkpoint, stored_config

    root = _ring_dataset(tmp_path / "Dataset010_Rings")
    config_path = tmp_path / "rings.yaml"
    result = CliRunner().invoke(plan_main, [str(root), "--config-out", str(config_path), "--no-progress"])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load(config_path.read_text())
    data = config["data"]
    assert data["crop_to_nonzero"] is True and data["slicing_axis"] == "z"
    assert data["target_spacing"] == [1.0, 1.0] and config["evaluation"]["resize"] == "linear"
    result = train_slim(config, config_path, tmp_path / "run", iterations=3)
    assert result.exit_code == 0, result.output

    state = load_checkpoint(tmp_path / "run" / "best.pt")
    assert state["metadata"]["planned_geometry"] == {
        "slicing_axis": "z",
        "target_spacing": [1.0, 1.0],
        "crop_to_nonzero": True,
    }
    package = load_model_package(tmp_path / "run" / "model")
    assert package.planned == PlannedGeometry("z", (1.0, 1.0), True)

    # a new scan at another spacing (0.6 mm), size and origin, with an oblique-free but flipped direction
    scan = _ring_case("new", 66, 0.6, 7, seed=9)
    path = write_volume(
        scan.image, tmp_path / "new.nii.gz", scan.spacing, (-1, 0, 0, 0, 1, 0, 0, 0, 1), (3.0, -7.5, 11.0)
    )
    segmenter = Segmenter(package, backend="torch", postprocess=False)
    output = segmenter(path)
    image = sitk.ReadImage(str(path))
    written = output.to_sitk()
    assert written.GetSize() == image.GetSize()
    assert written.GetSpacing() == pytest.approx(image.GetSpacing())
    assert written.GetOrigin() == pytest.approx(image.GetOrigin())
    assert written.GetDirection() == pytest.approx(image.GetDirection())
    assert np.all(output.label_map[:, :7] == 0) and np.all(
        output.label_map[:, :, -7:] == 0
    )  # outside the crop
    # the CPU runtimes apply the same plan around their own network: the same probabilities on the scan
    reference = segmenter(path, probabilities=True).probabilities
    for backend in ("onnxruntime", "openvino"):
        other = Segmenter(package, backend=backend, precision="fp32", postprocess=False)(
            path, probabilities=True
        )
        np.testing.assert_allclose(other.probabilities, reference, atol=1e-4, err_msg=backend)
        assert other.to_sitk().GetOrigin() == pytest.approx(image.GetOrigin())

    # validation segments a loaded (normalised) volume exactly as Segmenter segments its scan file
    from mpcl.backends.torch_backend import TorchBackend
    from mpcl.training.data.loading import load_data

    stored = stored_config(state, "best.pt")
    volume = load_data(stored.data).val_volumes[0]
    model = inference_model_from_checkpoint(state, stored, 3)
    labels = volume_predictor(model, stored.data.patch_size, "cpu", stored.evaluation.resize)(volume)
    settings = InferenceSettings(stored.data.patch_size, probabilities=True)  # what volume_predictor runs
    validated = segment_volume(
        volume.image, volume.spacing, TorchBackend.from_module(model), settings, planned=volume.planned
    )
    np.testing.assert_array_equal(validated.labels, labels)
    deployed = segmenter(root / "imagesTr" / f"{volume.name}_0000.nii.gz", probabilities=True)
    assert validated.probabilities.std() > 1e-3  # not a constant map: the comparison means something
    # the package's network is BN-folded, so only rounding may differ
    np.testing.assert_allclose(deployed.probabilities, validated.probabilities, atol=1e-4)
