"""Fused Triton kernels against their numpy references, and the references against the Segmenter.

The kernels run on the CPU under Triton's interpreter. TRITON_INTERPRET is read when a kernel is
*decorated*, so the ``kernels`` fixture sets it and imports the kernel modules afresh (and drops them,
restoring the variable, when this module is done). The AOT (TensorRT) compile check runs in a clean
subprocess, because interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mpcl.backends import module_available
from mpcl.errors import ConfigError, InputError
from mpcl.kernels import reference
from mpcl.preprocessing import NORMALIZATION_SCHEMES, normalize_intensity
from tests.segment_helpers import GEOMETRY, phantom_volume

REPO_ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = ("mpcl.kernels.triton_head", "mpcl.kernels.triton_preprocess")
ALL_FLIPS = ((), (-1,), (-2,), (-2, -1))
_MISSING_FOR_KERNELS = [name for name in ("torch", "triton") if not module_available(name)]
needs_triton = pytest.mark.skipif(
    bool(_MISSING_FOR_KERNELS),
    reason=f"{' and '.join(_MISSING_FOR_KERNELS)} not installed: pip install 'mpcl[gpu]' to test the fused "
    "kernels",
)


@pytest.fixture(scope="module")
def kernels():
    """The kernel modules, decorated under Triton's interpreter."""
    saved = {name: sys.modules.pop(name) for name in KERNEL_MODULES if name in sys.modules}
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        head = importlib.import_module("mpcl.kernels.triton_head")
        preprocess = importlib.import_module("mpcl.kernels.triton_preprocess")
        assert type(head.fused_head_kernel).__name__ == "InterpretedFunction"
        yield SimpleNamespace(head=head, preprocess=preprocess)
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
        for name in KERNEL_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def _assert_labels_match(labels, probabilities, expected_labels, margin=1e-5):
    """Labels must agree wherever the reference's best class leads the runner-up by more than ``margin``
    (elsewhere float rounding may legitimately pick the other one)."""
    top2 = np.sort(probabilities, axis=1)[:, -2:] if probabilities.shape[1] > 1 else None
    clear = np.ones(expected_labels.shape, bool) if top2 is None else (top2[:, 1] - top2[:, 0]) > margin
    assert clear.mean() > 0.9  # the comparison must mean something
    np.testing.assert_array_equal(labels[clear], expected_labels[clear])


# -- references ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", NORMALIZATION_SCHEMES)
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_normalization_affine_reproduces_normalize_intensity(scheme, dtype):
    rng = np.random.default_rng(1)
    volume = (rng.standard_normal((3, 11, 13)) * 300 + 100).astype(dtype)
    volume[0, 0, 0] = 4000  # an outlier the percentile scheme clips
    params = {"lower": 2.0, "upper": 97.0} if scheme == "percentile" else None
    affine = reference.normalization_affine(volume, scheme, params)
    expected = normalize_intensity(volume, scheme, params)
    np.testing.assert_allclose(reference.apply_normalization(volume, affine), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scheme", ["minmax", "percentile"])
def test_constant_volume_normalises_to_zeros(scheme):
    volume = np.full((2, 4, 5), 7.0, np.float32)
    assert reference.normalization_affine(volume, scheme) == reference.ZEROS
    np.testing.assert_array_equal(reference.apply_normalization(volume, reference.ZEROS), 0)


def test_normalization_affine_refuses_bad_input():
    with pytest.raises(InputError, match="non-finite"):
        reference.normalization_affine(np.array([1.0, np.nan]), "minmax")
    with pytest.raises(InputError, match="unknown normalisation scheme"):
        reference.normalization_affine(np.zeros(3), "histogram")


def test_flip_codes():
    assert [reference.flip_code(f) for f in ALL_FLIPS] == [0, 1, 2, 3]
    for bad in [(0,), (-3,), (-1, -1)]:
        with pytest.raises(InputError, match="flip"):
            reference.flip_code(bad)


@pytest.mark.parametrize("tta", [False, True])
def test_references_are_the_segmenters_numpy_path(package_dir, tta):
    """What the runtime feeds the network equals preprocess_reference, and what it returns equals
    head_reference applied to the network's logits (so kernels matching the references match it)."""
    from mpcl import Segmenter

    segmenter = Segmenter.from_pretrained(package_dir, device="cpu", batch_size=16, fused_kernels="off")
    seen = []
    run = segmenter.backend.run

    def recording_run(batch):
        logits = run(batch)
        seen.append((batch.copy(), logits))
        return logits

    segmenter.backend.run = recording_run
    volume, spacing = phantom_volume((12, 9, 10)), (0.7, 4.0, 1.1)  # slicing axis: y (array axis 1)
    result = segmenter((volume, spacing), tta=tta, probabilities=True, uncertainty=True)
    ((batch, logits),) = seen
    slices = np.moveaxis(volume, 1, 0)
    package = segmenter.package
    scheme, params = package.normalization_scheme, package.normalization_params
    affine = reference.normalization_affine(volume, scheme, params)
    patch = package.patch_size
    np.testing.assert_allclose(
        batch[: len(slices)], reference.preprocess_reference(slices, affine, patch), rtol=1e-6, atol=1e-6
    )
    flips = ALL_FLIPS if tta else ((),)
    expected = reference.head_reference(logits, flips, slices.shape[1:], probabilities=True, uncertainty=True)
    np.testing.assert_array_equal(np.moveaxis(result.label_map, 1, 0), expected.labels)
    np.testing.assert_array_equal(np.moveaxis(result.probabilities, 2, 0), expected.probabilities)
    np.testing.assert_array_equal(np.moveaxis(result.uncertainty, 1, 0), expected.uncertainty)


# -- kernels vs references (interpreter) --------------------------------------------------------------
HEAD_CASES = [
    # flips, classes, (h, w) at the patch, (H, W) of the slice, block
    pytest.param(1, 4, (8, 8), (13, 11), 16, id="1 flip, upsample, masked tail"),
    pytest.param(2, 3, (7, 9), (5, 17), 32, id="2 flips, odd classes, mixed resize"),
    pytest.param(4, 5, (6, 5), (6, 5), 16, id="4 flips, same size"),
    pytest.param(4, 2, (5, 7), (1, 4), 16, id="4 flips, single-row output"),
    pytest.param(1, 1, (5, 5), (3, 4), 16, id="1 class"),
]


@needs_triton
@pytest.mark.parametrize(("flips", "classes", "patch", "out_hw", "block"), HEAD_CASES)
def test_fused_head_matches_reference(kernels, flips, classes, patch, out_hw, block):
    import torch

    rng = np.random.default_rng(flips * 10 + classes)
    batch = 2
    logits = (rng.standard_normal((flips * batch, classes, *patch)) * 3).astype(np.float32)
    chosen = ALL_FLIPS[:flips]
    codes = kernels.head.flip_codes_tensor(chosen, "cpu")
    labels, probabilities, entropy = kernels.head.fused_head(
        torch.from_numpy(logits), codes, out_hw, probabilities=True, uncertainty=True, block=block
    )
    expected = reference.head_reference(logits, chosen, out_hw, probabilities=True, uncertainty=True)
    assert labels.dtype == torch.uint8 and tuple(labels.shape) == (batch, *out_hw)
    np.testing.assert_allclose(probabilities.numpy(), expected.probabilities, rtol=0, atol=1e-5)
    np.testing.assert_allclose(entropy.numpy(), expected.uncertainty, rtol=0, atol=1e-5)
    _assert_labels_match(labels.numpy(), expected.probabilities, expected.labels)


@needs_triton
def test_fused_head_reads_half_precision_and_flipped_codes_out_of_order(kernels):
    import torch

    rng = np.random.default_rng(5)
    flips = ((-2, -1), (), (-2,))  # any order of flips, not only the Segmenter's
    logits = (rng.standard_normal((3 * 2, 4, 6, 7)) * 2).astype(np.float16)
    codes = kernels.head.flip_codes_tensor(flips, "cpu")
    labels, _, entropy = kernels.head.fused_head(
        torch.from_numpy(logits), codes, (9, 5), uncertainty=True, block=32
    )
    expected = reference.head_reference(logits.astype(np.float32), flips, (9, 5), True, True)
    np.testing.assert_allclose(entropy.numpy(), expected.uncertainty, rtol=0, atol=1e-5)
    _assert_labels_match(labels.numpy(), expected.probabilities, expected.labels)


@needs_triton
def test_fused_head_refuses_bad_input(kernels):
    import torch

    codes = kernels.head.flip_codes_tensor(ALL_FLIPS, "cpu")
    with pytest.raises(InputError, match="cannot be split into 4"):
        kernels.head.fused_head(torch.zeros(6, 3, 4, 4), codes, (4, 4))
    with pytest.raises(InputError, match="contiguous"):
        kernels.head.fused_head(torch.zeros(4, 3, 4, 4).transpose(2, 3), codes, (4, 4))


@needs_triton
@pytest.mark.parametrize("scheme", NORMALIZATION_SCHEMES)
@pytest.mark.parametrize(
    ("shape", "patch"), [((2, 13, 17), (8, 9)), ((3, 5, 6), (11, 7)), ((1, 1, 9), (4, 4))], ids=str
)
def test_fused_preprocess_matches_reference(kernels, scheme, shape, patch):
    import torch

    rng = np.random.default_rng(len(scheme) + shape[1])
    volume = (rng.standard_normal(shape) * 100 + 50).astype(np.float32)
    affine = reference.normalization_affine(volume, scheme)
    batch = kernels.preprocess.fused_preprocess(
        torch.from_numpy(volume), kernels.preprocess.affine_tensor(affine, "cpu"), patch, block=32
    )
    expected = reference.preprocess_reference(volume, affine, patch)
    assert tuple(batch.shape) == expected.shape == (shape[0], 1, *patch)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(batch.numpy(), expected, rtol=0, atol=1e-6 * scale)


@needs_triton
def test_fused_preprocess_follows_strides_and_integer_input(kernels):
    """Slices along y of a (z, y, x) volume are a strided view; raw CT is often int16."""
    import torch

    volume = (np.random.default_rng(3).standard_normal((6, 4, 10)) * 500).astype(np.int16)
    slices = np.moveaxis(volume, 1, 0)  # (y, z, x) view with non-contiguous strides
    affine = reference.normalization_affine(volume, "percentile")
    batch = kernels.preprocess.fused_preprocess(
        torch.from_numpy(volume).movedim(1, 0), kernels.preprocess.affine_tensor(affine, "cpu"), (7, 7)
    )
    expected = reference.preprocess_reference(slices, affine, (7, 7))
    np.testing.assert_allclose(batch.numpy(), expected, rtol=0, atol=1e-6)


# -- the Segmenter's fused path ------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("tta", [False, True])
def test_segmenter_fused_path_matches_numpy_path(kernels, package_dir, tta):
    from mpcl import Segmenter

    numpy_path = Segmenter.from_pretrained(package_dir, backend="torch", device="cpu", fused_kernels="off")
    fused_path = Segmenter.from_pretrained(package_dir, backend="torch", device="cpu", fused_kernels="on")
    assert (numpy_path.fused, fused_path.fused) == (False, True)
    volume, spacing = phantom_volume((2, 9, 12)), GEOMETRY.spacing  # 2 thick slices along z
    image = (volume, spacing)
    expected = numpy_path(image, tta=tta, probabilities=True, uncertainty=True)
    result = fused_path(image, tta=tta, probabilities=True, uncertainty=True)
    np.testing.assert_allclose(result.probabilities, expected.probabilities, rtol=0, atol=1e-5)
    np.testing.assert_allclose(result.uncertainty, expected.uncertainty, rtol=0, atol=1e-5)
    probabilities = np.moveaxis(expected.probabilities, 0, 1)  # (z, C, y, x)
    _assert_labels_match(result.label_map, probabilities, expected.label_map)
    assert result.label_map.dtype == np.uint8 and result.geometry == expected.geometry
    assert result.to_sitk().GetSpacing() == tuple(spacing)


def test_fused_kernels_switch(package_dir, monkeypatch):
    from mpcl import Segmenter
    from mpcl.backends import torch_backend

    with pytest.raises(InputError, match="fused_kernels must be one of"):
        Segmenter.from_pretrained(package_dir, device="cpu", fused_kernels="yes")
    with pytest.raises(ConfigError, match="fused_kernels='on' needs the torch backend"):
        Segmenter.from_pretrained(package_dir, backend="onnxruntime", device="cpu", fused_kernels="on")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch_backend, "module_available", lambda name: True)  # as if triton were installed
    assert not Segmenter.from_pretrained(package_dir, backend="torch", device="cpu").fused  # auto: CUDA only
    assert "need CUDA" in torch_backend.fused_kernels_reason("cpu")
    assert torch_backend.fused_kernels_reason("cuda:1") is None
    monkeypatch.setattr(torch_backend, "module_available", lambda name: name != "triton")
    assert "triton is not installed" in torch_backend.fused_kernels_reason("cuda")
    with pytest.raises(ConfigError, match="triton is not installed"):
        Segmenter.from_pretrained(package_dir, backend="torch", device="cpu", fused_kernels="on")


# -- TensorRT plugins --------------------------------------------------------------------------------
def _clean_env() -> dict:
    return {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


@pytest.mark.slow
@needs_triton
def test_kernels_compile_ahead_of_time_for_tensorrt():
    """The plugins' AOT step compiles the real (not interpreted) kernels to PTX for a named GPU."""
    code = textwrap.dedent(
        """
        import json
        from triton.backends.compiler import GPUTarget
        from mpcl.kernels import tensorrt_plugins as plugins

        target = GPUTarget("cuda", 80, 32)
        preprocess = plugins.compile_preprocess(target)
        head, block = plugins.compile_head(num_flips=2, num_classes=3, target=target)
        print(json.dumps([[k.name, k.num_warps, ".entry " + k.name in k.ptx] for k in (preprocess, head)]
                         + [block]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
        env=_clean_env(),
    )
    assert result.returncode == 0, result.stderr
    preprocess, head, block = json.loads(result.stdout.strip().splitlines()[-1])
    assert preprocess == ["fused_preprocess_kernel", 4, True]
    assert head[0] == "fused_head_trt_kernel" and head[2] is True and block == 256


def test_aot_parameter_order_is_checked():
    from mpcl.kernels import tensorrt_plugins as plugins

    plugins.check_aot_order(plugins.HEAD_SIGNATURE, inputs=3, outputs=2)
    plugins.check_aot_order(plugins.PREPROCESS_SIGNATURE, inputs=2, outputs=1)
    with pytest.raises(ConfigError, match="only layout TensorRT AOT plugins can launch"):
        plugins.check_aot_order({"x": "*fp32", "scale": "fp32", "y": "*fp32"}, inputs=1, outputs=1)


def test_kernel_package_imports_without_gpu_libraries():
    """mpcl.kernels, its references and the plugin module import with torch, triton and tensorrt blocked;
    registering the plugins then says in one sentence what is missing."""
    code = textwrap.dedent(
        """
        import importlib.abc, json, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, fullname, path=None, target=None):
                if fullname.split(".")[0] in ("torch", "triton", "tensorrt"):
                    raise ImportError(f"{fullname} is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        import mpcl.kernels, mpcl.kernels.reference, mpcl.segmenter
        from mpcl.errors import ConfigError
        from mpcl.kernels import tensorrt_plugins
        try:
            tensorrt_plugins.register_plugins()
        except ConfigError as error:
            message = str(error)
        print(json.dumps([message, mpcl.kernels.triton_available()]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
    message, available = json.loads(result.stdout.strip().splitlines()[-1])
    assert "tensorrt" in message and "not installed" in message and available is False
