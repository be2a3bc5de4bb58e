"""torch eager backend: the package's checkpoint (model.pt) loaded into the training U-Net.

On CUDA with triton installed it can also run a whole batch of slices on the device
(``segment_slices``): the fused Triton kernels of ``mpcl.kernels`` normalise and resize the raw slices,
and turn the logits into labels, so neither the patch batch nor the logits cross to the host.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence

import numpy as np

from mpcl.backends import module_available
from mpcl.errors import ConfigError, InputError, ModelPackageError
from mpcl.kernels import FUSED_KERNEL_MODES
from mpcl.kernels.reference import Flip, HeadOutputs, NormalizationAffine
from mpcl.model_package import ModelPackage


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


class TorchBackend:
    """Eager torch, in ``inference_mode``; the checkpoint is the student network of training."""

    name = "torch"

    def __init__(
        self,
        package: ModelPackage,
        device: str = "cpu",
        threads: int | None = None,
        fused_kernels: str = "auto",
    ) -> None:
        if fused_kernels not in FUSED_KERNEL_MODES:
            raise ConfigError(f"fused_kernels must be one of {FUSED_KERNEL_MODES}, got {fused_kernels!r}")
        reason = fused_kernels_reason(device)
        if fused_kernels == "on" and reason is not None:
            raise ConfigError(f"fused_kernels='on' cannot run: {reason}")
        if fused_kernels == "off":
            reason = "fused_kernels='off'"
        elif fused_kernels == "auto" and reason is None and not device.startswith("cuda"):
            reason = "'auto' uses them on CUDA only (the interpreter is for tests)"
        self.fused_kernels = reason is None
        self.fused_reason = reason
        import torch

        from mpcl.export.student import build_network_from_spec
        from mpcl.training.checkpoint import load_checkpoint

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
        self.torch = torch
        self.device = device
        self.model = model.to(torch.device(device)).eval()

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(batch).to(self.device))
            return logits.float().cpu().numpy()

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
        if not self.fused_kernels:
            raise ConfigError(f"segment_slices needs the fused kernels, which are off: {self.fused_reason}")
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
        fused = "fused Triton pre/post-processing" if self.fused_kernels else "numpy pre/post-processing"
        return f"torch {self.torch.__version__} eager, {fused}"


def create(
    package: ModelPackage, device: str, threads: int | None = None, fused_kernels: str = "auto", **_ignored
) -> TorchBackend:
    return TorchBackend(package, device, threads, fused_kernels)
