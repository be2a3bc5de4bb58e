"""ONNX Runtime backend: the default, on CPU or with the CUDA execution provider.

A package may hold the fp32 graph and, from ``mpcl-export``, int8 (QDQ) and fp16 variants that passed its
Dice check. ``precision="auto"`` runs int8 on CPU and fp16 on CUDA when the package has them (the variants
each hardware runs fastest), else fp32; the file used is named in ``describe()``.
"""

from __future__ import annotations

import numpy as np

from mpcl.backends import Capabilities, check_io_shape, module_available, refuse_unsupported
from mpcl.errors import ModelPackageError
from mpcl.model_package import ONNX_ROLES, ModelPackage

PRECISIONS = ("auto", *ONNX_ROLES)
FUSED_KERNELS = False  # the per-batch pre/post-processing is the shared numpy code


def onnx_role(package: ModelPackage, device: str, precision: str = "auto") -> str:
    """The package file role to run: the precision asked for, or the fastest one present for ``device``."""
    if precision == "bf16":
        raise ModelPackageError("bf16 runs on the OpenVINO backend only (pip install 'mpcl[openvino]')")
    if precision not in PRECISIONS:
        raise ModelPackageError(f"unknown ONNX precision {precision!r}; expected one of {list(PRECISIONS)}")
    if precision != "auto":
        role = ONNX_ROLES[precision]
        if not package.has(role):
            raise ModelPackageError(f"{package.root}: the package has no {precision} ONNX file ({role})")
        return role
    preferred = ONNX_ROLES["fp16"] if device.startswith("cuda") else ONNX_ROLES["int8"]
    return preferred if package.has(preferred) else ONNX_ROLES["fp32"]


def unavailable_reason(package: ModelPackage, device: str) -> str | None:
    if not package.has("onnx"):
        return "the package has no ONNX file"
    if not module_available("onnxruntime"):
        return "onnxruntime is not installed"
    if device.startswith("cuda"):
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return "this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu)"
    return None


def session_options(threads: int | None = None):
    """The session settings every mpcl ONNX Runtime session uses (benchmarks profile these same ones):
    all graph optimisations, which on CPU include the blocked-layout (NCHWc) convolution kernels."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = int(threads)
    return options


class OnnxRuntimeBackend:
    """One InferenceSession, built once; ``run`` feeds whole batches (the batch axis is dynamic)."""

    name = "onnxruntime"

    def __init__(
        self, package: ModelPackage, device: str = "cpu", threads: int | None = None, precision: str = "auto"
    ) -> None:
        import onnxruntime

        self.role = onnx_role(package, device, precision)
        self.precision = next(name for name, role in ONNX_ROLES.items() if role == self.role)
        path = package.path_of(self.role, verify=False)
        model_bytes = package.read_verified(self.role)
        options = session_options(threads)
        # Loaded from the verified bytes: external weights resolve only inside the package, and only
        # when model.json lists (and hashes) them; an unlisted reference then fails to load.
        external_folder = path.parent
        if not package.files[self.role].external:
            external_folder = path.parent / ".no-external-data"  # never created: nothing resolves
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(external_folder)
        )
        providers: list = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            index = int(device.split(":")[1]) if ":" in device else 0
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        try:
            self.session = onnxruntime.InferenceSession(model_bytes, options, providers=providers)
        except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph/... types
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelPackageError(f"{path}: cannot be loaded by onnxruntime ({first[:200]})") from None
        self.device = device
        self.capabilities = Capabilities(self.precision, False, "the onnxruntime backend has none")
        self.version = onnxruntime.__version__
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise ModelPackageError(f"{path}: expected one input and a logits output")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        check_io_shape(path, "input", inputs[0].shape, package.in_channels, package.patch_size)
        check_io_shape(path, "output", outputs[0].shape, package.num_classes, package.patch_size)

    def run(self, batch: np.ndarray) -> np.ndarray:
        logits = self.session.run([self.output_name], {self.input_name: batch})[0]
        return np.asarray(logits, dtype=np.float32)

    def describe(self) -> str:
        return f"onnxruntime {self.version}, {self.session.get_providers()[0]}, {self.precision}"


def create(
    package: ModelPackage,
    device: str,
    *,
    threads: int | None = None,
    fused_kernels: str = "auto",
    precision: str = "auto",
) -> OnnxRuntimeBackend:
    """The backend for ``select_backend``; precisions are checked (and refused) by :func:`onnx_role`."""
    reason = "the onnxruntime backend has none"
    refuse_unsupported("onnxruntime", device, ("cpu", "cuda"), "auto", PRECISIONS, fused_kernels, reason)
    return OnnxRuntimeBackend(package, device, threads, precision)
