"""The FLOP count behind benchmarks/ort_profile.py's compute floor, checked against the torch network."""

from __future__ import annotations

import shutil
from pathlib import Path

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
    from mpcl.export.student import fold_batch_norm
    from mpcl.training.networks.unet import UNet

    network = fold_batch_norm(UNet(1, 4, (4, 8, 16, 32, 64)).eval())
    path = tmp_path / "net.onnx"
    export_onnx(network, path, 1, (64, 64))
    counted = _ort_profile().conv_flops(path, 3, 48, 80)  # another batch and size than traced
    expected = _torch_flops(network, torch.zeros(3, 1, 48, 80))
    assert counted == expected
    assert expected["ConvTranspose"] > 0 and expected["Conv"] > 10 * expected["ConvTranspose"]


def test_fma_peak_measures_avx512_exactly_when_the_cpu_has_it(tmp_path):
    """The floor's peak must come from the widest FMA this CPU has, or the floor is too generous."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler to build benchmarks/fma_peak.c")
    flags = next(
        (line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), ""
    ).split()
    if "avx2" not in flags or "fma" not in flags:
        pytest.skip("this CPU has no AVX2/FMA, which fma_peak.c needs")
    peak, how = _ort_profile().fma_peak_gflops(1, tmp_path)
    assert peak is not None and peak > 0, how
    assert ("no AVX-512F" in how) == ("avx512f" not in flags), how
