"""TensorRT backend: a serialized engine from the package (added by ``mpcl-export``), on a CUDA GPU.

Engines are specific to a GPU model and a TensorRT version, so this backend is only picked when the
package lists one, TensorRT is importable, a GPU is present, and the GPU name and TensorRT version that
``mpcl-export`` recorded in model.json match this machine (an engine is never deserialised elsewhere:
``auto`` then falls back to ONNX Runtime, and asking for ``tensorrt`` explicitly is refused with the
reason). Device buffers and the CUDA stream come from torch (always installed next to TensorRT in
practice), which keeps this module free of pycuda.

An engine's precision is fixed when it is built (model.json records it), so ``precision`` may only be
``auto`` or that precision; anything else is refused rather than silently running the engine.
"""

from __future__ import annotations

import logging

import numpy as np

from mpcl.backends import Capabilities, gpu_present, module_available, refuse_unsupported
from mpcl.errors import ConfigError, ModelPackageError
from mpcl.model_package import TENSORRT_REQUIRED_INFO, ModelPackage

log = logging.getLogger("mpcl.segment")
PRECISIONS = ("auto", "fp32", "fp16")  # what engines are built in (mpcl-export --trt-precision)
FUSED_KERNELS = False  # the per-batch pre/post-processing is the shared numpy code


def engine_precision(package: ModelPackage, precision: str = "auto") -> str:
    """The precision of the package's engine, checked against the one asked for."""
    built = str(package.files["tensorrt"].info.get("precision", "fp32"))
    if precision not in ("auto", built):
        raise ConfigError(
            f"{package.root}: the package's TensorRT engine was built in {built}, so it cannot run "
            f"precision {precision!r}; rebuild it with mpcl-export --trt, or use backend onnxruntime or "
            "openvino for the ONNX variants"
        )
    return built


def current_gpu_name(device: str = "cuda") -> str:
    """The name of the CUDA device as torch reports it; export records the same string it compares."""
    import torch

    index = int(device.split(":")[1]) if ":" in device else 0
    return str(torch.cuda.get_device_name(index))


def engine_mismatch(package: ModelPackage, device: str) -> str | None:
    """Why the package's engine cannot run here (GPU or TensorRT version differs), or None if it can."""
    import tensorrt

    info = package.files["tensorrt"].info
    missing = [key for key in TENSORRT_REQUIRED_INFO if not info.get(key)]
    if missing:
        return (
            f"model.json does not record the engine's {' and '.join(missing)}; "
            "rebuild it with mpcl-export --trt"
        )
    if str(info["tensorrt_version"]) != tensorrt.__version__:
        return (
            f"the engine was built with TensorRT {info['tensorrt_version']} and this is TensorRT "
            f"{tensorrt.__version__}; rebuild it with mpcl-export --trt"
        )
    gpu = current_gpu_name(device)
    if str(info["gpu_name"]) != gpu:
        return (
            f"the engine was built for a {info['gpu_name']} and this GPU is a {gpu}; "
            "rebuild it with mpcl-export --trt"
        )
    return None


def unavailable_reason(package: ModelPackage, device: str) -> str | None:
    if not package.has("tensorrt"):
        return "the package has no TensorRT engine"
    if not device.startswith("cuda"):
        return "TensorRT needs a CUDA GPU"
    if not module_available("tensorrt"):
        return "tensorrt is not installed (pip install 'mpcl[trt]')"
    if not module_available("torch"):
        return "the TensorRT backend needs torch (with CUDA) for its device buffers"
    if not gpu_present():
        return "no NVIDIA GPU found"
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    return engine_mismatch(package, device)


class TensorRTBackend:
    """Runs batches up to the engine profile's maximum, splitting larger ones."""

    name = "tensorrt"

    def __init__(self, package: ModelPackage, device: str = "cuda", precision: str = "auto") -> None:
        self.precision = engine_precision(package, precision)
        try:
            import tensorrt as trt
        except ImportError:
            raise ModelPackageError(
                "the TensorRT backend needs the tensorrt package (pip install 'mpcl[trt]')"
            ) from None
        import torch

        if not torch.cuda.is_available():
            raise ModelPackageError("the TensorRT backend needs a CUDA GPU visible to torch")
        path = package.path_of("tensorrt")
        mismatch = engine_mismatch(package, device)
        if mismatch is not None:
            raise ModelPackageError(f"{path}: {mismatch}")
        self.trt, self.torch = trt, torch
        self.device = device if ":" in device else "cuda:0"
        self.logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise ModelPackageError(
                    f"{path}: TensorRT {trt.__version__} cannot load this engine (built for another "
                    "TensorRT version or GPU; rebuild it with mpcl-export)"
                )
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise ModelPackageError(f"{path}: expected an engine with one input and a logits output")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.input_dtype = self._torch_dtype(self.engine.get_tensor_dtype(self.input_name))
        self.output_dtype = self._torch_dtype(self.engine.get_tensor_dtype(self.output_name))
        self.stream = torch.cuda.Stream(device=self.device)
        self.capabilities = Capabilities(self.precision, False, "the tensorrt backend has none")

    def _torch_dtype(self, trt_dtype):
        mapping = {self.trt.float32: self.torch.float32, self.trt.float16: self.torch.float16}
        if trt_dtype not in mapping:
            raise ModelPackageError(f"engine tensor type {trt_dtype} is not supported (float32/float16 only)")
        return mapping[trt_dtype]

    def _run_chunk(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            x = torch.from_numpy(batch).to(self.device, self.input_dtype, non_blocking=True).contiguous()
            self.context.set_input_shape(self.input_name, tuple(x.shape))
            out = torch.empty(
                tuple(self.context.get_tensor_shape(self.output_name)),
                dtype=self.output_dtype,
                device=self.device,
            )
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            self.context.set_tensor_address(self.output_name, out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            result = out.float().cpu().numpy()
        return result

    def run(self, batch: np.ndarray) -> np.ndarray:
        chunks = [
            self._run_chunk(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)
        ]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def describe(self) -> str:
        return f"TensorRT {self.trt.__version__}, {self.precision}, max batch {self.max_batch}"


def create(
    package: ModelPackage,
    device: str,
    *,
    threads: int | None = None,
    fused_kernels: str = "auto",
    precision: str = "auto",
) -> TensorRTBackend:
    """The backend for ``select_backend``: a CUDA device, the engine's own precision, no fused kernels.
    ``threads`` sets CPU threads, and the engine runs on the GPU, so it has nothing to set (logged)."""
    reason = "the tensorrt backend has none"
    refuse_unsupported(
        "tensorrt",
        device,
        ("cuda",),
        precision,
        PRECISIONS,
        fused_kernels,
        reason,
        "int8 and bf16 variants run on the onnxruntime and openvino backends",
    )
    if threads:
        log.info(
            "backend: threads=%s has no effect on the TensorRT backend (the engine runs on the GPU)", threads
        )
    return TensorRTBackend(package, device, precision)
