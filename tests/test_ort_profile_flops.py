"""The FLOP count behind benchmarks/ort_profile.py's compute floor, checked against the torch network."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.benchmark_helpers import load_benchmark


def _ort_profile():
    return load_benchmark("ort_profile")


def _torch_flops(model: torch.nn.Module, image: torch.Tensor) -> dict[str, float]:
    """2 x multiply-adds per Conv2d / ConvTranspose2d, counted from the tensors each layer really sees."""
    counts = {"Conv": 0.0, "ConvTranspose": 0.0}

    def hook(module, inputs, output):
        kernel = module.kernel_size[0] * module.kernel_size[1]
        if isinstance(module, torch.nn.ConvTranspose2d):
            per_input = module.out_channels // module.groups * kernel
            counts["ConvTranspose"] += 2 * inputs[0].numel() * per_input
        else:
            counts["Conv"] += 2 * output.numel() * module.in_channels // module.groups * kernel

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)
    ]
    with torch.no_grad():
        model(image)
    for handle in handles:
        handle.remove()
    return counts


def test_conv_flops_of_the_exported_graph_match_the_torch_network(tmp_path):
    from mpcl.export.onnx_export import export_onnx
    from mpcl.nn.folding import fold_batch_norm
    from mpcl.nn.unet import UNet

    network = fold_batch_norm(UNet(1, 4, (4, 8, 16, 32, 64)).eval())
    path = tmp_path / "net.onnx"
    export_onnx(network, path, 1, (64, 64))
    counted = _ort_profile().conv_flops(path, 3, 48, 80)  # another batch and size than traced
    expected = _torch_flops(network, torch.zeros(3, 1, 48, 80))
    assert counted == expected
    assert expected["ConvTranspose"] > 0 and expected["Conv"] > 10 * expected["ConvTranspose"]


@pytest.mark.slow
def test_fma_peak_measures_avx512_exactly_when_the_cpu_has_it(tmp_path):
    """The floor's peak must come from the widest FMA this CPU has, or the floor is too generous."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler to build benchmarks/fma_peak.c")
    flags = next(
        (line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), ""
    ).split()
    if "avx2" not in flags or "fma" not in flags:
        pytest.skip("this CPU has no AVX2/FMA, which fma_peak.c needs")
    peaks, how = _ort_profile().fma_peaks(1, tmp_path)
    assert peaks is not None and peaks["AVX2"] > 0, how
    assert ("AVX512" in peaks) == ("avx512f" in flags), how
    assert ("no AVX-512F" in how) == ("avx512f" not in flags), how


@pytest.mark.slow
def test_openvino_held_to_avx2_runs_avx2_convolutions(package_dir, tmp_path):
    """The AVX2 row is only worth its floor if oneDNN really ran AVX2 kernels (it reads the limit once,
    at load), so the benchmark reports the kernels it saw and says when the limit was not honoured."""
    pytest.importorskip("openvino")
    from mpcl.model_package import load_model_package

    package = load_model_package(package_dir)
    batch = np.zeros((2, package.in_channels, *package.patch_size), np.float32)
    measured = _ort_profile().openvino_isa_limited(package, batch, 1, 2, tmp_path, "AVX2")
    assert measured["conv_kernels"], measured
    assert all("avx512" not in kernel for kernel in measured["conv_kernels"]), measured
    assert measured["limit_honoured"] and measured["median_s"] > 0


def test_every_convolution_of_the_openvino_profile_finds_its_flops(package_dir):
    """The per-layer table is only right if each OpenVINO convolution is matched to its own ONNX node."""
    pytest.importorskip("openvino")
    from mpcl.model_package import load_model_package

    profile = _ort_profile()
    package = load_model_package(package_dir)
    batch = np.zeros((2, package.in_channels, *package.patch_size), np.float32)
    onnx_path = package.path_of("onnx")
    node_flops = profile.conv_flops_by_node(onnx_path, 2, *package.patch_size)
    _, node_seconds = profile.openvino_profile(package, batch, 1, 2)
    layers = profile.conv_layers(node_seconds, node_flops, peak=100.0)
    convs = {name for name, (op, _) in node_flops.items() if op == "Conv"}
    assert sorted(layer["node"] for layer in layers) == sorted(convs)
    total = profile.conv_flops(onnx_path, 2, *package.patch_size)["Conv"]
    assert sum(layer["gflop"] for layer in layers) == pytest.approx(total / 1e9)
    assert [layer["ms_above_floor"] for layer in layers] == sorted(
        (layer["ms_above_floor"] for layer in layers), reverse=True
    )
