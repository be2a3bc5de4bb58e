"""torch eager backend: the package's checkpoint (model.pt) loaded into the training U-Net."""

from __future__ import annotations

import numpy as np

from mpcl.backends import module_available
from mpcl.errors import InputError, ModelPackageError
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


class TorchBackend:
    """Eager torch, in ``inference_mode``; the checkpoint is the student network of training."""

    name = "torch"

    def __init__(self, package: ModelPackage, device: str = "cpu", threads: int | None = None) -> None:
        import torch

        from mpcl.training.checkpoint import load_checkpoint
        from mpcl.training.package import build_network_from_spec

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

    def describe(self) -> str:
        return f"torch {self.torch.__version__} eager"


def create(package: ModelPackage, device: str, threads: int | None = None, **_ignored) -> TorchBackend:
    return TorchBackend(package, device, threads)
