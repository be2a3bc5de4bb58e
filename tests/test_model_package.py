"""Model packages: written from a checkpoint, validated on load, refused with one sentence when wrong."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from mpcl import Segmenter
from mpcl.errors import ConfigError, InputError, ModelPackageError
from mpcl.model_package import (
    DEFAULT_COLORS,
    MODEL_JSON,
    PACKAGE_VERSION,
    load_model_package,
    register_file,
    sha256_of,
)
from tests.segment_helpers import CLASS_NAMES, PATCH, auto_cpu_backend, make_checkpoint, make_package


@pytest.fixture
def package_copy(package_dir, tmp_path):
    """A private copy to break."""
    return shutil.copytree(package_dir, tmp_path / "model")


def _edit_json(folder, change):
    data = json.loads((folder / MODEL_JSON).read_text())
    change(data)
    (folder / MODEL_JSON).write_text(json.dumps(data))


def test_package_is_derived_from_checkpoint_metadata(package_dir):
    package = load_model_package(package_dir)
    assert sorted(p.name for p in package_dir.iterdir()) == ["model.json", "model.onnx", "model.pt"]
    assert package.class_names == CLASS_NAMES
    assert package.patch_size == tuple(PATCH)
    assert package.normalization == {"scheme": "zscore"}
    assert package.method == "mean_teacher"
    assert package.network["channels"] == [4, 8, 8, 16, 16]
    assert package.labels["background"].color == (0, 0, 0)
    assert package.labels["RV"].color == DEFAULT_COLORS[0] and package.labels["LV"].value == 3
    raw = json.loads((package_dir / MODEL_JSON).read_text())
    assert raw["format_version"] == PACKAGE_VERSION and raw["mpcl_version"]
    assert raw["files"]["onnx"]["sha256"] == sha256_of(package_dir / "model.onnx")
    assert raw["files"]["onnx"]["max_abs_logit_difference_vs_torch"] < 1e-4
    # loading through the model.json path works as well
    assert load_model_package(package_dir / MODEL_JSON).class_names == CLASS_NAMES


def test_package_checkpoint_is_slim_and_loadable(package_dir):
    from mpcl.nn.checkpoint import load_checkpoint

    state = load_checkpoint(package_dir / "model.pt")
    assert "optimizer" not in state and "teacher" not in state
    assert state["metadata"]["class_names"] == CLASS_NAMES


def test_auto_backend_is_the_fastest_installed_and_logged(package_dir, caplog):
    with caplog.at_level(logging.INFO, logger="mpcl.segment"):
        segmenter = Segmenter.from_pretrained(package_dir, device="cpu")
    assert segmenter.backend.name == auto_cpu_backend()
    assert f"backend: {auto_cpu_backend()} on cpu" in caplog.text


def test_auto_backend_without_openvino_is_onnxruntime_and_says_why(package_dir, caplog, monkeypatch):
    import mpcl.backends.openvino_backend as openvino_backend

    monkeypatch.setattr(openvino_backend, "module_available", lambda name: name != "openvino")
    with caplog.at_level(logging.INFO, logger="mpcl.segment"):
        segmenter = Segmenter.from_pretrained(package_dir, device="cpu")
    assert segmenter.backend.name == "onnxruntime"
    assert "openvino on cpu: openvino is not installed" in caplog.text


def test_torch_only_package_falls_back_to_torch(tmp_path):
    make_package(tmp_path, onnx=False)
    segmenter = Segmenter.from_pretrained(tmp_path / "model", device="cpu")
    assert segmenter.backend.name == "torch"


def test_tensorrt_without_engine_is_a_clear_error(package_dir):
    with pytest.raises(ConfigError, match="no TensorRT engine"):
        Segmenter.from_pretrained(package_dir, backend="tensorrt")
    with pytest.raises(ConfigError, match="unknown backend"):
        Segmenter.from_pretrained(package_dir, backend="coreml")


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_format_version_is_refused(package_copy, version):
    _edit_json(package_copy, lambda data: data.update(format_version=version))
    with pytest.raises(ModelPackageError, match=f"format version {version!r} is not supported"):
        load_model_package(package_copy)


def test_not_a_package(tmp_path, package_copy):
    with pytest.raises(ModelPackageError, match="does not exist"):
        load_model_package(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPackageError, match="no model.json"):
        load_model_package(tmp_path / "empty")
    (package_copy / MODEL_JSON).write_text("{not json")
    with pytest.raises(ModelPackageError, match="not valid JSON"):
        load_model_package(package_copy)
    (package_copy / MODEL_JSON).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ModelPackageError, match="not an MPCL model package"):
        load_model_package(package_copy)


def test_missing_file_is_refused_on_load(package_copy):
    (package_copy / "model.onnx").unlink()
    with pytest.raises(ModelPackageError, match="model.onnx.*missing"):
        load_model_package(package_copy)


def test_replaced_file_fails_its_checksum(package_copy):
    onnx = package_copy / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1] + bytes([onnx.read_bytes()[-1] ^ 1]))
    with pytest.raises(ModelPackageError, match="does not match the SHA-256"):
        Segmenter.from_pretrained(package_copy, backend="onnxruntime")


def _rehash(package, role: str) -> None:
    """Record the current file's SHA-256, as a package consistently built around a wrong network has."""
    _edit_json(
        package,
        lambda data: data["files"][role].update(sha256=sha256_of(package / data["files"][role]["path"])),
    )


def test_onnx_with_wrong_class_count_is_refused(package_copy, tmp_path):
    """An ONNX file from another model (3 classes) under a 4-class model.json: a mismatched file."""
    from mpcl.export.pipeline import write_model_package

    write_model_package(
        make_checkpoint(tmp_path / "three.pt", class_names=["bg", "a", "b"]), tmp_path / "three"
    )
    shutil.copy(tmp_path / "three" / "model.onnx", package_copy / "model.onnx")
    _rehash(package_copy, "onnx")
    with pytest.raises(ModelPackageError, match=r"output shape .* does not match model.json"):
        Segmenter.from_pretrained(package_copy, backend="onnxruntime")
    shutil.copy(tmp_path / "three" / "model.pt", package_copy / "model.pt")
    _rehash(package_copy, "torch")
    with pytest.raises(ModelPackageError, match="do not match model.json"):
        Segmenter.from_pretrained(package_copy, backend="torch")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(classes=[{"name": "only"}]), "2 to 256 classes"),
        (lambda d: d["classes"][1].update(value=5), "expected 1"),
        (lambda d: d["classes"][1].update(color=[300, 0, 0]), "three integers"),
        (lambda d: d.update(patch_size=[32]), "patch_size"),
        (lambda d: d.update(normalization={"scheme": "histogram"}), "normalization.scheme"),
        (lambda d: d["resampling"].update(in_plane="crop"), "resampling policy"),
        (lambda d: d.update(postprocessing={"largest_component": ["aorta"]}), "unknown class"),
        (lambda d: d["files"].update(weights={"path": "w.bin"}), "unknown file role"),
        (lambda d: d["files"]["onnx"].update(path="../model.onnx"), "inside the package"),
        (lambda d: d.pop("files"), "missing key"),
    ],
)
def test_malformed_model_json_is_refused(package_copy, change, message):
    _edit_json(package_copy, change)
    with pytest.raises(ModelPackageError, match=message):
        load_model_package(package_copy)


def test_postprocessing_names_become_class_values(package_copy):
    _edit_json(
        package_copy, lambda d: d.update(postprocessing={"largest_component": True, "fill_holes": ["LV"]})
    )
    package = load_model_package(package_copy)
    assert package.postprocessing.largest_component == (1, 2, 3)
    assert package.postprocessing.fill_holes == (3,)


def test_existing_package_needs_overwrite(tmp_path):
    from mpcl.export.pipeline import write_model_package

    folder = make_package(tmp_path)
    before = (folder / MODEL_JSON).read_text()
    with pytest.raises(InputError, match="already exists"):
        write_model_package(tmp_path / "best.pt", folder)
    assert (folder / MODEL_JSON).read_text() == before
    package = write_model_package(tmp_path / "best.pt", folder, overwrite=True, name="renamed")
    assert package.name == "renamed"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_register_file_records_checksum(package_copy):
    engine = package_copy / "model.fp16.onnx"
    shutil.copy(package_copy / "model.onnx", engine)
    package = register_file(package_copy, "onnx", engine.name, precision="fp32-copy")
    assert package.files["onnx"].path == engine
    assert package.files["onnx"].sha256 == sha256_of(engine)
    assert package.files["onnx"].info == {"precision": "fp32-copy"}
    segmenter = Segmenter(package, backend="onnxruntime")
    image = np.zeros((2, 32, 32), np.float32)
    assert segmenter((image, (1.0, 1.0, 1.0))).label_map.shape == (2, 32, 32)
