"""Export steps one by one: strip, BN folding, ONNX checks, fp16/int8, thresholds, configs, TRT metadata."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mpcl.errors import ConfigError, ModelPackageError
from tests.segment_helpers import CLASS_NAMES, PATCH, make_checkpoint


@pytest.fixture(scope="module")
def tiny_state(tmp_path_factory):
    from mpcl.nn.checkpoint import load_checkpoint

    return load_checkpoint(make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", seed=3))


@pytest.fixture(scope="module")
def folded_pair(tiny_state):
    from mpcl.nn.folding import fold_batch_norm
    from mpcl.nn.student import stripped_student

    reference, spec = stripped_student(tiny_state)
    return reference, fold_batch_norm(reference), spec


def _inputs(count=3, size=PATCH, seed=0):
    return torch.rand(count, 1, *size, generator=torch.Generator().manual_seed(seed))


# -- deployment student -------------------------------------------------------------------------------
def test_batch_norm_folding_is_exact_and_removes_every_bn(folded_pair):
    reference, folded, _ = folded_pair
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in reference.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        expected, actual = reference.eval()(_inputs()), folded.eval()(_inputs())
    scale = max(1.0, float(expected.abs().max()))
    assert float((actual - expected).abs().max()) <= 1e-5 * scale
    assert reference.training is False  # folding works on a copy and leaves the source untouched
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in reference.modules())


def test_folded_weights_load_into_the_network_model_json_describes(folded_pair):
    from mpcl.nn.spec import build_network_from_spec, deployment_spec

    reference, folded, spec = folded_pair
    rebuilt = build_network_from_spec(deployment_spec(spec), 1, len(CLASS_NAMES))
    rebuilt.load_state_dict(folded.state_dict(), strict=True)  # no BN keys expected or present
    assert not any(key.split(".")[-1] == "running_mean" for key in rebuilt.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(_inputs()), reference(_inputs()), atol=1e-5, rtol=0)


def test_unknown_batch_norm_mode_is_one_sentence():
    from mpcl.errors import InputError
    from mpcl.nn.spec import build_network_from_spec

    with pytest.raises(InputError, match="network.batch_norm 'fused' is not known"):
        build_network_from_spec({"name": "unet2d", "batch_norm": "fused"}, 1, 4)


@pytest.mark.slow
def test_strip_removes_training_only_parts(tmp_path):
    from mpcl.export.pipeline import ExportOptions, export_package
    from mpcl.nn.checkpoint import load_checkpoint
    from tests.export_helpers import train_tiny_checkpoint

    checkpoint = train_tiny_checkpoint(tmp_path, steps=1)
    source = load_checkpoint(checkpoint)
    assert {"teacher", "extra", "method_state", "optimizer"} <= set(source)
    assert any(key.startswith("deep_heads.") for key in source["student"])

    options = ExportOptions(onnx=False, progress=False)
    package = export_package(checkpoint, tmp_path / "model", options, real_data=False).package
    shipped = load_checkpoint(package.path_of("torch"))
    assert set(shipped) == {"format", "format_version", "iteration", "student", "metadata", "config"}
    assert not any(key.startswith("deep_heads.") for key in shipped["student"])
    assert not any("running_var" in key for key in shipped["student"])  # BN folded away
    assert package.network["deep_supervision"] is False and package.network["batch_norm"] == "folded"
    assert sorted(p.name for p in package.root.iterdir()) == ["model.json", "model.pt"]
    assert shipped["config"]["model"]["deep_supervision"] is False


# -- ONNX -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_file(folded_pair, tmp_path_factory):
    from mpcl.export.onnx_export import export_onnx, optimize_onnx

    folder = tmp_path_factory.mktemp("onnx")
    export_onnx(folded_pair[1], folder / "raw.onnx", 1, PATCH)
    optimize_onnx(folder / "raw.onnx", folder / "model.onnx")
    return folder / "model.onnx"


def test_onnx_graph_passes_checker_with_dynamic_batch_and_spatial_axes(onnx_file, folded_pair):
    import onnxruntime

    from mpcl.export.onnx_export import ONNX_OPSET, check_onnx_file, opset_of

    check_onnx_file(onnx_file)
    assert opset_of(onnx_file) >= ONNX_OPSET >= 17
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    reference = folded_pair[0]
    for count, size in ((1, PATCH), (3, (48, 64))):
        batch = _inputs(count, size, seed=count)
        with torch.no_grad():
            expected = reference(batch).numpy()
        actual = session.run(None, {"image": batch.numpy()})[0]
        assert actual.shape == (count, len(CLASS_NAMES), *size)
        np.testing.assert_allclose(actual, expected, atol=1e-4 * max(1.0, np.abs(expected).max()), rtol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_graph_with_static_spatial_axes_is_refused(folded_pair, tmp_path):
    from mpcl.export.onnx_export import check_onnx_file
    from mpcl.export.parity import CheckFailed

    path = tmp_path / "static.onnx"
    torch.onnx.export(
        folded_pair[1],
        (torch.zeros(1, 1, *PATCH),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    with pytest.raises(CheckFailed, match=r"axes \[2, 3\] are static"):
        check_onnx_file(path)


def test_fp16_graph_keeps_a_float32_interface_and_matches_fp32(onnx_file, tmp_path):
    import onnx
    import onnxruntime

    from mpcl.export.onnx_export import check_onnx_file
    from mpcl.export.parity import THRESHOLDS, compare_logits
    from mpcl.export.quantize import convert_fp16

    half = tmp_path / "model.fp16.onnx"
    convert_fp16(onnx_file, half)
    check_onnx_file(half)
    graph = onnx.load(str(half)).graph
    assert all(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer)
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch = _inputs(4, seed=5).numpy()
    run = lambda path: onnxruntime.InferenceSession(  # noqa: E731
        str(path), providers=["CPUExecutionProvider"]
    ).run(None, {"image": batch})[0]
    full, reduced = run(onnx_file), run(half)
    assert reduced.dtype == np.float32
    assert 0 < np.abs(full - reduced).max()  # really computed in fp16
    assert compare_logits(full, reduced, THRESHOLDS["onnx_fp16"]).passed


def test_int8_graph_is_qdq_and_calibrated_on_the_slices_given(onnx_file, tmp_path):
    import onnx

    from mpcl.export.onnx_export import check_onnx_file
    from mpcl.export.quantize import quantize_int8

    calibration = _inputs(6, seed=9).numpy()
    quantize_int8(onnx_file, tmp_path / "model.int8.onnx", calibration)
    check_onnx_file(tmp_path / "model.int8.onnx")
    ops = [node.op_type for node in onnx.load(str(tmp_path / "model.int8.onnx")).graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".quantize-")]


# -- thresholds -------------------------------------------------------------------------------------------
def test_parity_thresholds_pass_and_fail_where_they_should():
    from mpcl.export.parity import ParityThresholds, compare_logits

    expected = np.zeros((1, 2, 2, 2), np.float32)
    expected[:, 0] = 10.0  # class 0 everywhere, logit scale 10
    thresholds = ParityThresholds(1e-3, 0.75)
    assert compare_logits(expected, expected + 0.009, thresholds).passed  # 0.009 <= 1e-3 * 10
    assert not compare_logits(expected, expected + 0.011, thresholds).passed
    flipped = expected.copy()
    flipped[0, 1, 0, :] = 20.0  # two of four pixels change label; logits within no tolerance
    result = compare_logits(expected, flipped, ParityThresholds(None, 0.75))
    assert result.label_agreement == 0.5 and not result.passed
    nan = expected.copy()
    nan[0, 0, 0, 0] = np.nan
    assert not compare_logits(expected, nan, thresholds).passed


def test_dice_gate_counts_points():
    from mpcl.export.parity import DiceCheck

    assert DiceCheck(0.80, 0.79, 1.0, 2).passed  # exactly one point
    assert not DiceCheck(0.80, 0.7899, 1.0, 2).passed
    assert DiceCheck(0.80, 0.85, 0.0, 2).passed and DiceCheck(0.80, 0.85, 0.0, 2).drop_points < 0
    assert not DiceCheck(0.80, float("nan"), 100.0, 2).passed


# -- distillation config ----------------------------------------------------------------------------------
DISTILL_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "distill").glob("*.yaml"))


@pytest.mark.parametrize("path", DISTILL_CONFIGS, ids=lambda path: path.name)
def test_shipped_distill_configs_are_valid(path):
    from mpcl.export.distill import load_distill_config

    config = load_distill_config(path)  # an ordinary experiment config of the distill method
    assert config.method.name == "distill" and config.train.iterations == 3000
    assert len(config.model.channels) == 5 and config.model.channels[0] < 16


def test_both_distill_configs_are_shipped():
    assert {path.name for path in DISTILL_CONFIGS} >= {"small.yaml", "small_no_dropout.yaml"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "model:\n  chanels: [2, 4, 4, 8, 8]\n",
            r"unknown key 'config.model.chanels' \(did you mean 'channels'",
        ),
        ("channels: [2, 4, 4, 8, 8]\n", "unknown key 'distill.channels'"),  # the old, flat shape
        ("model:\n  channels: [2, 4, 8]\n", "model.channels and model.dropout must each list 5 values"),
        ("method:\n  params:\n    temperature: 0\n", "method.params.temperature must be > 0"),
        ("train:\n  iterations: many\n", "config.train.iterations must be an integer"),
        ("method:\n  params: {kd_weight: 0, dice_weight: 0}\n", "cannot both be 0"),
        ("method:\n  name: bcp\n", "distill.method.name must be 'distill'"),
        ("[unclosed\n", "not valid YAML"),
    ],
)
def test_bad_distill_config_is_one_sentence_naming_the_file(tmp_path, text, message):
    from mpcl.export.distill import load_distill_config

    path = tmp_path / "distill.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_distill_config(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value).strip()


# -- TensorRT metadata ------------------------------------------------------------------------------------
@pytest.fixture
def engine_package(package_dir, tmp_path, monkeypatch):
    """A package listing an 'engine' with recorded build metadata, and a fake tensorrt module."""
    import shutil

    from mpcl.model_package import register_file

    folder = shutil.copytree(package_dir, tmp_path / "model")
    (folder / "model.engine").write_bytes(b"not a real engine")
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))

    def make(**info):
        return register_file(folder, "tensorrt", "model.engine", **info)

    return make


def test_engine_built_elsewhere_is_refused_before_loading(engine_package, monkeypatch):
    from mpcl.backends import tensorrt_backend

    monkeypatch.setattr(tensorrt_backend, "current_gpu_name", lambda device="cuda": "NVIDIA H100 80GB HBM3")
    same = engine_package(gpu_name="NVIDIA H100 80GB HBM3", tensorrt_version="10.3.0")
    assert tensorrt_backend.engine_mismatch(same, "cuda") is None
    other_gpu = engine_package(gpu_name="NVIDIA A100-SXM4-40GB", tensorrt_version="10.3.0")
    assert "built for a NVIDIA A100-SXM4-40GB and this GPU is a NVIDIA H100" in (
        tensorrt_backend.engine_mismatch(other_gpu, "cuda")
    )
    other_version = engine_package(gpu_name="NVIDIA H100 80GB HBM3", tensorrt_version="11.0.0")
    assert "built with TensorRT 11.0.0 and this is TensorRT 10.3.0" in (
        tensorrt_backend.engine_mismatch(other_version, "cuda")
    )
    unknown = engine_package(precision="fp16")
    assert "does not record the engine's gpu_name and tensorrt_version" in (
        tensorrt_backend.engine_mismatch(unknown, "cuda")
    )


def test_int8_file_without_fp32_graph_is_refused(package_dir, tmp_path):
    import json
    import shutil

    from mpcl.model_package import load_model_package

    folder = shutil.copytree(package_dir, tmp_path / "model")
    data = json.loads((folder / "model.json").read_text())
    data["files"]["onnx_int8"] = data["files"].pop("onnx")
    (folder / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelPackageError, match="without the fp32 ONNX file"):
        load_model_package(folder)


def test_onnx_precision_choice(package_dir):
    from mpcl.backends.onnxruntime_backend import onnx_role
    from mpcl.model_package import load_model_package

    package = load_model_package(package_dir)  # fp32 only
    assert onnx_role(package, "cpu") == onnx_role(package, "cuda") == "onnx"
    with pytest.raises(ModelPackageError, match="has no int8 ONNX file"):
        onnx_role(package, "cpu", "int8")
    with pytest.raises(ModelPackageError, match="unknown ONNX precision"):
        onnx_role(package, "cpu", "int4")


def test_engine_builder_drives_the_tensorrt_api_as_documented(onnx_file, tmp_path, monkeypatch):
    """API-shape smoke test with a recording stand-in for tensorrt (real TensorRT is not installed here):
    strongly typed network, the patch/batch profile, and the metadata the backend compares."""
    from mpcl.backends import tensorrt_backend
    from mpcl.export.tensorrt_build import EngineProfile, build_engine

    calls = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getattr__(self, attribute):
            def method(*args):
                calls.setdefault(f"{self.name}.{attribute}", []).append(args)
                if attribute == "create_network":
                    return Recorder("network")
                if attribute == "create_builder_config":
                    return Recorder("config")
                if attribute == "create_optimization_profile":
                    return Recorder("profile")
                if attribute == "build_serialized_network":
                    return b"engine-bytes"
                return True

            return method

    fake = types.SimpleNamespace(
        __version__="10.9.0",
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Builder=lambda logger: Recorder("builder"),
        OnnxParser=lambda network, logger: Recorder("parser"),
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE=0),
    )
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(tensorrt_backend, "current_gpu_name", lambda device="cuda": "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "device", lambda device: __import__("contextlib").nullcontext())
    info = build_engine(onnx_file, tmp_path / "model.engine", EngineProfile(1, PATCH, 1, 4, 16), "fp16")
    assert (tmp_path / "model.engine").read_bytes() == b"engine-bytes"
    assert calls["builder.create_network"] == [(1 << 1,)]  # STRONGLY_TYPED
    assert calls["parser.parse_from_file"] == [(str(onnx_file),)]
    assert calls["profile.set_shape"] == [("image", (1, 1, *PATCH), (4, 1, *PATCH), (16, 1, *PATCH))]
    assert info["gpu_name"] == "NVIDIA H100 80GB HBM3" and info["tensorrt_version"] == "10.9.0"
    assert info["precision"] == "fp16" and info["profile"]["max"] == [16, 1, *PATCH]
