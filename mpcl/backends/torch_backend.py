"""torch eager backend: the package's checkpoint (model.pt) loaded into the network its spec describes
(the model core, ``mpcl.nn``, imported only here and only when a package is loaded), or any torch
network handed over by training (``TorchBackend.from_module``).

``from_module`` is how training scores its networks through the same inference code as deployment
(``mpcl.inference``): validation, ``mpcl-eval --checkpoint`` and the export's Dice gate run the numpy
slice loop with this backend instead of wrapping a runtime backend as a torch module. torch is imported
only when a backend is built, so importing this module costs nothing where torch is absent.

On CUDA with triton installed the package backend can also run a whole batch of slices on the device
(``segment_slices``, declared by ``capabilities.fused_kernels``): the fused Triton kernels of
``mpcl.kernels`` normalise and resize the raw slices, and turn the logits into labels, so neither the
patch batch nor the logits cross to the host. The checkpoint runs in fp32 only; other precisions are
refused (they are ONNX variants, run by the onnxruntime and openvino backends).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from mpcl.backends import Capabilities, module_available, refuse_unsupported
from mpcl.errors import ConfigError, InputError, ModelPackageError
from mpcl.kernels import FUSED_KERNEL_MODES
from mpcl.kernels.reference import Flip, HeadOutputs, NormalizationAffine
from mpcl.model_package import ModelPackage

PRECISIONS = ("auto", "fp32")
FUSED_KERNELS = True  # on CUDA with triton installed; see fused_kernels_reason


def unavailable_reason(package: ModelPackage, device: str) -> str | None:
    if not package.has("torch"):
        return "the package has no torch checkpoint"
    if not module_available("torch"):
        return "torch is not installed"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return "torch sees no CUDA GPU"
    return None


def fused_kernels_reason(device: str) -> str | None:
    """Why the fused Triton kernels cannot run on ``device``, or None. A CPU device is accepted only under
    Triton's interpreter (TRITON_INTERPRET=1), which is how CI runs this path without a GPU."""
    if not module_available("triton"):
        return "triton is not installed (pip install 'mpcl[gpu]')"
    if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the device is {device}; the kernels need CUDA"
    return None


def _fused_capability(device: str, fused_kernels: str) -> tuple[bool, str]:
    """Whether the fused kernels run for ``fused_kernels`` (auto/on/off) on ``device``, and why not."""
    if fused_kernels not in FUSED_KERNEL_MODES:
        raise ConfigError(f"fused_kernels must be one of {FUSED_KERNEL_MODES}, got {fused_kernels!r}")
    reason = fused_kernels_reason(device)
    if fused_kernels == "on" and reason is not None:
        raise ConfigError(f"fused_kernels='on' cannot run: {reason}")
    if fused_kernels == "off":
        reason = "fused_kernels='off'"
    elif fused_kernels == "auto" and reason is None and not device.startswith("cuda"):
        reason = "'auto' uses them on CUDA only (the interpreter is for tests)"
    return reason is None, reason or ""


class TorchBackend:
    """Eager torch on a loaded network: :meth:`from_package` (deployment, in ``inference_mode``) or
    :meth:`from_module` (a network training is still using, evaluated in eval mode under ``no_grad``)."""

    name = "torch"

    def __init__(
        self, model: Any, device: str, capabilities: Capabilities, *, restore_mode: bool = False
    ) -> None:
        """Prefer the two constructors; ``model`` is a torch module already on ``device``."""
        import torch

        self.torch = torch
        self.model = model
        self.device = str(device)
        self.capabilities = capabilities
        self.precision = capabilities.precision
        self.restore_mode = restore_mode

    @classmethod
    def from_package(
        cls,
        package: ModelPackage,
        device: str = "cpu",
        threads: int | None = None,
        fused_kernels: str = "auto",
    ) -> TorchBackend:
        """The package's checkpoint in the network model.json describes, on ``device``."""
        fused, reason = _fused_capability(device, fused_kernels)
        import torch

        from mpcl.nn.checkpoint import load_checkpoint
        from mpcl.nn.spec import build_network_from_spec

        path = package.path_of("torch")
        try:
            state = load_checkpoint(path)
        except InputError as error:
            raise ModelPackageError(str(error)) from None
        stored = state["metadata"].get("class_names")
        if stored is not None and list(stored) != package.class_names:
            raise ModelPackageError(
                f"{path}: checkpoint classes {list(stored)} do not match model.json {package.class_names}"
            )
        try:
            model = build_network_from_spec(package.network, package.in_channels, package.num_classes)
        except InputError as error:
            raise ModelPackageError(f"{package.root}: {error}") from None
        try:
            model.load_state_dict(state["student"])
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0]
            raise ModelPackageError(
                f"{path}: weights do not fit the network in model.json ({first})"
            ) from None
        if threads:
            torch.set_num_threads(int(threads))
        model = model.to(torch.device(device)).eval()
        return cls(model, device, Capabilities("fp32", fused, reason))

    @classmethod
    def from_module(cls, net: Any, device: Any = None) -> TorchBackend:
        """A torch network as a backend, without copying or moving it: ``run`` feeds batches to
        ``device`` (default: where the network's weights are), in eval mode under ``no_grad``, and puts
        the network back in the train/eval mode it was in, so training can go on using it."""
        import torch

        if not isinstance(net, torch.nn.Module):
            raise InputError(f"TorchBackend.from_module needs a torch.nn.Module, got {type(net).__name__}")
        if device is None:
            parameter = next(net.parameters(), None)
            device = parameter.device if parameter is not None else torch.device("cpu")
        reason = "a network handed over by training runs the numpy pre/post-processing"
        return cls(net, str(torch.device(device)), Capabilities("fp32", False, reason), restore_mode=True)

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        inputs = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        if not self.restore_mode:
            with torch.inference_mode():
                return self.model(inputs).float().cpu().numpy()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self.model(inputs).float().cpu().numpy()
        finally:
            self.model.train(was_training)

    def segment_slices(
        self,
        slices: np.ndarray,
        affine: NormalizationAffine,
        patch_hw: Sequence[int],
        flips: Sequence[Flip],
        probabilities: bool,
        uncertainty: bool,
        timings: dict[str, float],
    ) -> HeadOutputs:
        """Raw (b, H, W) slices to labels (and maps) on their own grid, entirely on the device.

        Timings are per stage (the device is synchronised after each): upload + fused preprocessing in
        ``resize_to_patch``, the network in ``network``, fused head + download in ``argmax_entropy``.
        """
        if not self.capabilities.fused_kernels:
            reason = self.capabilities.fused_reason
            raise ConfigError(f"segment_slices needs the fused kernels, which are off: {reason}")
        from mpcl.kernels.triton_head import flip_codes_tensor, fused_head
        from mpcl.kernels.triton_preprocess import affine_tensor, fused_preprocess

        torch = self.torch
        out_hw = (int(slices.shape[1]), int(slices.shape[2]))
        # Triton launches on the current CUDA device, so make it the model's (cuda:N)
        cuda = self.device.startswith("cuda")
        on_device = torch.cuda.device(self.device) if cuda else contextlib.nullcontext()
        with torch.inference_mode(), on_device:
            clock = time.perf_counter()
            raw = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32)).to(self.device)
            batch = fused_preprocess(raw, affine_tensor(affine, self.device), tuple(patch_hw))
            if len(flips) > 1:
                batch = torch.cat([batch.flip(flip) if flip else batch for flip in flips])
            self._synchronize()
            timings["resize_to_patch"] += time.perf_counter() - clock
            clock = time.perf_counter()
            logits = self.model(batch).contiguous()
            self._synchronize()
            timings["network"] += time.perf_counter() - clock
            clock = time.perf_counter()
            labels, probs, entropy = fused_head(
                logits, flip_codes_tensor(flips, self.device), out_hw, probabilities, uncertainty
            )
            result = HeadOutputs(
                labels.cpu().numpy(),
                None if probs is None else probs.cpu().numpy(),
                None if entropy is None else entropy.cpu().numpy(),
            )
            timings["argmax_entropy"] += time.perf_counter() - clock
        return result

    def _synchronize(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize(self.device)

    def describe(self) -> str:
        fused = "fused Triton" if self.capabilities.fused_kernels else "numpy"
        fused += " pre/post-processing"
        return f"torch {self.torch.__version__} eager, {fused}"


def create(
    package: ModelPackage,
    device: str,
    *,
    threads: int | None = None,
    fused_kernels: str = "auto",
    precision: str = "auto",
) -> TorchBackend:
    """The backend for ``select_backend``: the fp32 checkpoint on CPU or CUDA."""
    refuse_unsupported("torch", device, ("cpu", "cuda"), precision, PRECISIONS, fused_kernels, None)
    return TorchBackend.from_package(package, device, threads, fused_kernels)
