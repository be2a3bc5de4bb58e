"""One inference core (mpcl.inference) for deployment, validation, mpcl-eval and the export gate; the
backend capability interface; readable reprs.

The core must give the labels training evaluation gave before it was shared (torch softmax at the patch,
numpy resize back), ``mpcl-eval --model`` must give exactly what ``mpcl-segment`` gives on the same
scans, and a backend must refuse options it cannot honour instead of dropping them.
"""

from __future__ import annotations

import json
import shutil
import types
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from click.testing import CliRunner

from mpcl import Segmenter
from mpcl.backends import Capabilities, select_backend
from mpcl.backends.torch_backend import TorchBackend
from mpcl.errors import ConfigError, InputError
from mpcl.inference import InferenceSettings, segment_volume
from mpcl.io import read_image, write_image
from mpcl.kernels.reference import HeadOutputs, head_reference, preprocess_reference
from mpcl.model_package import load_model_package
from mpcl.training.data.base import Volume
from mpcl.training.evaluate import evaluate_volumes
from tests.conftest import tiny_config_dict
from tests.segment_helpers import (
    CLASS_NAMES,
    GEOMETRY,
    TINY_CHANNELS,
    make_checkpoint,
    phantom_volume,
    reference_prediction,
)


def _tiny_unet(seed: int = 0):
    from mpcl.nn.unet import UNet

    torch.manual_seed(seed)
    model = UNet(1, 4, TINY_CHANNELS)
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode matters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


def _volumes():
    rng = np.random.default_rng(0)
    thick_z = rng.random((5, 37, 45)).astype(np.float32)
    thick_x = rng.random((20, 24, 6)).astype(np.float32)
    return [
        Volume("thick_z", thick_z, rng.integers(0, 4, thick_z.shape).astype(np.uint8), (1.1, 0.9, 7.0)),
        Volume("thick_x", thick_x, rng.integers(0, 4, thick_x.shape).astype(np.uint8), (9.0, 1.0, 1.2)),
    ]


# -- the labels of a checkpoint stay those of the former evaluation code -------------------------------
@pytest.mark.parametrize("resize", ["linear", "nearest"])
def test_evaluate_volumes_gives_the_reference_labels(tmp_path, resize):
    model = _tiny_unet()
    model.train()  # as during training: validation must evaluate in eval mode and then restore this
    volumes = _volumes()
    out = tmp_path / "pred"
    report = evaluate_volumes(model, volumes, CLASS_NAMES, (32, 32), torch.device("cpu"), out, resize=resize)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert [case["name"] for case in report["cases"]] == ["thick_z", "thick_x"]
    for volume in volumes:
        expected, _ = reference_prediction(model, volume.image, volume.spacing, (32, 32), resize)
        model.train()
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{volume.name}.nii.gz")))
        assert written.shape == volume.image.shape
        np.testing.assert_array_equal(written, expected, err_msg=f"{volume.name}, {resize}")


def test_evaluate_volumes_scores_a_backend_as_its_torch_network():
    """The export gate hands evaluate_volumes a runtime backend (anything with ``run``)."""
    model = _tiny_unet(1).eval()
    torch_backend = TorchBackend.from_module(model)
    calls = []

    class Recording:  # a minimal backend: only run()
        def run(self, batch):
            calls.append(batch.shape)
            return torch_backend.run(batch)

    volumes = _volumes()
    expected = evaluate_volumes(model, volumes, CLASS_NAMES, (32, 32), "cpu")
    scored = evaluate_volumes(Recording(), volumes, CLASS_NAMES, (32, 32), None)
    assert json.dumps(scored, sort_keys=True) == json.dumps(expected, sort_keys=True)
    assert calls and all(shape[1:] == (1, 32, 32) for shape in calls)
    with pytest.raises(TypeError, match="expected a torch module or a backend"):
        evaluate_volumes(object(), volumes, CLASS_NAMES, (32, 32), None)


def test_torch_backend_from_module_is_a_backend():
    model = _tiny_unet(2)
    backend = TorchBackend.from_module(model, "cpu")
    assert backend.name == "torch" and backend.device == "cpu"
    assert backend.capabilities == Capabilities("fp32", False, backend.capabilities.fused_reason)
    batch = np.random.default_rng(0).random((3, 1, 32, 32)).astype(np.float32)
    logits = backend.run(batch)
    assert logits.dtype == np.float32 and logits.shape == (3, 4, 32, 32)
    with torch.no_grad():
        np.testing.assert_array_equal(logits, model.eval()(torch.from_numpy(batch)).numpy())
    with pytest.raises(InputError, match="needs a torch.nn.Module"):
        TorchBackend.from_module(object())


def test_settings_are_checked():
    with pytest.raises(InputError, match="resize must be one of"):
        InferenceSettings((32, 32), resize="cubic")
    with pytest.raises(InputError, match="batch_size must be at least 1"):
        InferenceSettings((32, 32), batch_size=0)
    with pytest.raises(ConfigError, match="cannot run resize='nearest'"):
        InferenceSettings((32, 32), resize="nearest", fused=True)
    assert InferenceSettings([32, 48]).patch_size == (32, 48)


def test_core_normalises_and_post_processes_as_the_segmenter(package_dir):
    """Segmenter is the core with the package's settings: same labels from the core called directly."""
    from mpcl.model_package import Postprocessing

    segmenter = Segmenter.from_pretrained(package_dir, backend="onnxruntime", device="cpu")
    segmenter.package = replace(segmenter.package, postprocessing=Postprocessing(largest_component=(1, 2, 3)))
    volume = phantom_volume()
    settings = InferenceSettings.for_package(segmenter.package, batch_size=8)
    assert settings.normalization == segmenter.package.normalization and settings.postprocessing.enabled
    prediction = segment_volume(volume, GEOMETRY.spacing, segmenter.backend, settings)
    assert "postprocess" in prediction.timings
    np.testing.assert_array_equal(prediction.labels, segmenter((volume, GEOMETRY.spacing)).label_map)


# -- mpcl-eval --model scores what mpcl-segment delivers ---------------------------------------------------
def _label_volume(image: np.ndarray) -> np.ndarray:
    labels = np.zeros(image.shape, np.uint8)
    labels[image > np.percentile(image, 60)] = 1
    labels[image > np.percentile(image, 80)] = 2
    labels[image > np.percentile(image, 93)] = 3
    return labels


def _nifti_dataset(root):
    """A user's NIfTI folder: raw (not normalised) oblique scans, two training cases and two test cases."""
    for folder in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / folder).mkdir(parents=True)
    for index in range(4):
        image = phantom_volume(seed=index) * (1.0 + 0.3 * index)  # intensities differ between scans
        split = "Tr" if index < 2 else "Ts"
        write_image(image, GEOMETRY, root / f"images{split}" / f"case_{index}_0000.nii.gz")
        write_image(_label_volume(image), GEOMETRY, root / f"labels{split}" / f"case_{index}.nii.gz")


def _write_config(tmp_path, data: dict):
    config = tiny_config_dict(tmp_path / "run", "supervised", iterations=1)
    config["data"] = {**config["data"], **data}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _package(tmp_path, normalization: dict):
    from mpcl.export.pipeline import write_model_package
    from mpcl.nn.checkpoint import load_checkpoint, save_checkpoint

    checkpoint = make_checkpoint(tmp_path / "best.pt", normalization=normalization)
    state = load_checkpoint(checkpoint)  # a random head predicts one class everywhere; this one does not
    state["student"]["head.bias"].zero_()
    state["student"]["head.weight"].mul_(20)
    save_checkpoint(checkpoint, state)
    clean_ups = {"largest_component": True, "fill_holes": ["LV"]}  # so that post-processing matters
    write_model_package(checkpoint, tmp_path / "model", postprocessing=clean_ups)
    return tmp_path / "model"


def _segment_cli(scans, out, package):
    from mpcl.cli_segment import segment_main

    args = [*map(str, scans), "-o", f"{out}/", "--model", str(package), "--device", "cpu", "-q"]
    assert segment_main(args) == 0


def _eval_cli(package, config, predictions, extra=()):
    from mpcl.training.cli import eval_main

    metrics = predictions.parent / "metrics.json"
    args = ["--model", str(package), "--config", str(config), "--device", "cpu"]
    args += ["--save-predictions", str(predictions), "--output", str(metrics), *extra]
    result = CliRunner().invoke(eval_main, args)
    assert result.exit_code == 0, result.output
    return json.loads(metrics.read_text()), result.output


@pytest.mark.slow  # exports packages / starts a subprocess
def test_eval_model_equals_segment_on_the_same_nifti_scans(tmp_path):
    root = tmp_path / "data"
    _nifti_dataset(root)
    package = _package(tmp_path, {"scheme": "zscore"})
    data = {"kind": "nifti_folder", "root": str(root), "class_names": CLASS_NAMES, "normalization": "zscore"}
    config = _write_config(tmp_path, data)
    report, output = _eval_cli(package, config, tmp_path / "eval")
    assert report["inputs"] == "scan files" and report["postprocessing"] is True
    assert "through Segmenter" in output and len(report["cases"]) == 2
    scans = sorted((root / "imagesTs").iterdir())
    _segment_cli(scans, tmp_path / "segment", package)
    raw = Segmenter.from_pretrained(package, device="cpu", postprocess=False)
    post_processing_changed_something = False
    for scan in scans:
        case = scan.name.replace("_0000.nii.gz", "")
        evaluated, eval_geometry = read_image(tmp_path / "eval" / f"{case}.nii.gz")
        segmented, segment_geometry = read_image(tmp_path / "segment" / f"{case}.nii.gz")
        np.testing.assert_array_equal(evaluated, segmented, err_msg=case)  # voxel for voxel
        np.testing.assert_allclose(eval_geometry.spacing, segment_geometry.spacing, rtol=1e-6)
        np.testing.assert_allclose(eval_geometry.origin, segment_geometry.origin, atol=1e-4)
        post_processing_changed_something |= bool((raw(scan).label_map != evaluated).any())
    assert post_processing_changed_something  # the comparison includes the package's clean-ups


@pytest.mark.slow  # exports packages / starts a subprocess
def test_eval_model_on_normalised_volumes_equals_segment_on_those_arrays(tmp_path):
    """Phantom (and ACDC) volumes exist only min-max normalised: Segmenter gets them as a user would."""
    package = _package(tmp_path, {"scheme": "minmax"})
    config = _write_config(tmp_path, {})
    images = tmp_path / "images"
    report, _ = _eval_cli(package, config, tmp_path / "eval", ["--save-images", str(images)])
    assert report["inputs"] == "minmax-normalised arrays"
    scans = sorted(images.iterdir())
    _segment_cli(scans, tmp_path / "segment", package)
    for scan in scans:
        evaluated, _ = read_image(tmp_path / "eval" / scan.name)
        segmented, _ = read_image(tmp_path / "segment" / scan.name)
        np.testing.assert_array_equal(evaluated, segmented, err_msg=scan.name)


# -- the backend capability interface ------------------------------------------------------------------
def test_unsupported_precision_device_and_options_are_refused(package_dir, monkeypatch):
    from mpcl.backends import openvino_backend, tensorrt_backend

    package = load_model_package(package_dir)
    with pytest.raises(
        ConfigError, match="torch backend cannot run precision 'int8' .*onnxruntime and openvino"
    ):
        select_backend(package, "torch", "cpu", precision="int8")
    with pytest.raises(ConfigError, match="tensorrt backend cannot run precision 'int8'"):
        tensorrt_backend.create(package, "cuda", precision="int8")
    with pytest.raises(ConfigError, match="tensorrt backend runs on cuda, not on device 'cpu'"):
        tensorrt_backend.create(package, "cpu")
    with pytest.raises(ConfigError, match="openvino backend runs on cpu, not on device 'cuda:0'"):
        openvino_backend.create(package, "cuda:0")
    with pytest.raises(ConfigError, match="fused_kernels='on' needs the torch backend.*onnxruntime"):
        select_backend(package, "onnxruntime", "cpu", fused_kernels="on")
    with pytest.raises(ConfigError, match=r"unknown backend option\(s\) \['thread'\]"):
        select_backend(package, "onnxruntime", "cpu", thread=2)
    with pytest.raises(ConfigError, match="torch backend cannot run precision 'fp16'"):
        Segmenter(package, backend="torch", device="cpu", precision="fp16")
    assert (
        Segmenter(package, backend="torch", device="cpu", precision="fp32").backend.capabilities.precision
        == "fp32"
    )
    # 'auto' skips, with the reason, the backends that cannot run the precision asked for
    monkeypatch.setattr(openvino_backend, "unavailable_reason", lambda package, device: "not here (test)")
    with pytest.raises(
        ConfigError, match="onnxruntime on cpu: it runs no bf16 model; torch on cpu: it runs no"
    ):
        select_backend(package, "auto", "cpu", precision="bf16")


def test_tensorrt_precision_is_the_engines(package_dir, tmp_path, monkeypatch):
    from mpcl.backends.tensorrt_backend import engine_precision
    from mpcl.model_package import register_file

    folder = shutil.copytree(package_dir, tmp_path / "model")
    (folder / "model.engine").write_bytes(b"not a real engine")
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    package = register_file(folder, "tensorrt", "model.engine", precision="fp16")
    assert engine_precision(package) == engine_precision(package, "fp16") == "fp16"
    with pytest.raises(ConfigError, match="engine was built in fp16, so it cannot run precision 'fp32'"):
        engine_precision(package, "fp32")


class _FusedReference:
    """A FusedBackend whose segment_slices is the kernels' numpy reference around a real backend."""

    def __init__(self, inner):
        self.inner, self.name, self.device = inner, "fused-reference", "cpu"
        self.capabilities = Capabilities("fp32", True, "")
        self.fused_calls = 0

    def run(self, batch):
        return self.inner.run(batch)

    def describe(self):
        return "numpy reference of the fused kernels"

    def segment_slices(self, slices, affine, patch_hw, flips, probabilities, uncertainty, timings):
        self.fused_calls += 1
        batch = preprocess_reference(slices, affine, patch_hw)
        batch = np.concatenate([np.flip(batch, f) if f else batch for f in flips])
        logits = self.inner.run(np.ascontiguousarray(batch))
        head = head_reference(logits, flips, slices.shape[1:], probabilities, uncertainty)
        return HeadOutputs(head.labels.astype(np.uint8), head.probabilities, head.uncertainty)


def test_segmenter_reads_capabilities_not_attributes(package_dir, monkeypatch):
    """The fused path is taken because the backend declares it, and only then."""
    import mpcl.segmenter as segmenter_module

    plain = Segmenter.from_pretrained(package_dir, backend="onnxruntime", device="cpu")
    fused_backend = _FusedReference(plain.backend)
    monkeypatch.setattr(segmenter_module, "select_backend", lambda *args, **kwargs: fused_backend)
    fused = Segmenter.from_pretrained(package_dir, device="cpu")
    assert fused.fused and not plain.fused
    volume = phantom_volume((4, 20, 24))
    expected = plain((volume, GEOMETRY.spacing), probabilities=True)
    result = fused((volume, GEOMETRY.spacing), probabilities=True)
    assert fused_backend.fused_calls == 1
    np.testing.assert_allclose(result.probabilities, expected.probabilities, atol=1e-5)
    fused_backend.capabilities = Capabilities("fp32", False, "switched off (test)")
    assert not Segmenter.from_pretrained(package_dir, device="cpu").fused
    with pytest.raises(ConfigError, match="switched off"):
        Segmenter.from_pretrained(package_dir, device="cpu", fused_kernels="on")


# -- readable reprs ---------------------------------------------------------------------------------------
def test_reprs_are_short_and_say_what_matters(package_dir):
    segmenter = Segmenter.from_pretrained(package_dir, backend="onnxruntime", device="cpu", batch_size=4)
    text = repr(segmenter)
    for part in ("Segmenter(", "onnxruntime", "device='cpu'", "batch_size=4", "tta=False", str(package_dir)):
        assert part in text, text
    result = segmenter((phantom_volume(), GEOMETRY.spacing), uncertainty=True)
    text = repr(result)
    assert len(text) < 400 and "array(" not in text, text
    counts = np.bincount(result.label_map.ravel(), minlength=4)
    names = {label.value: name for name, label in result.labels.items()}
    for value, count in enumerate(counts):
        assert (f"{names[value]}: {count}" in text) == bool(count), text
    for part in ("shape (z, y, x)=(6, 40, 48)", "0.8, 0.9, 6.5", "backend='onnxruntime'", "'uncertainty'"):
        assert part in text, text
    assert "'probabilities'" not in text


# -- the core belongs to the torch-free runtime ------------------------------------------------------------
@pytest.mark.slow  # exports packages / starts a subprocess
def test_core_and_torch_backend_module_import_without_torch():
    from tests.test_runtime_without_torch import _run

    result = _run(
        """
        import mpcl.inference, mpcl.backends.torch_backend, mpcl.segmenter
        import sys
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
