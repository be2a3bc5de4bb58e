"""OpenVINO backend (optional extra ``mpcl[openvino]``): the package's ONNX graphs on OpenVINO's CPU plugin.

Why a second CPU runtime: its convolutions are no faster than ONNX Runtime's, but it spends less around
them (layout reorders, transposed convolutions), and on CPUs with native bf16 arithmetic (AVX512_BF16,
AMX) it runs the fp32 graph in bf16. Measured latencies of both runtimes: docs/benchmarks.md.

Precisions, all from files already in the package (OpenVINO reads ONNX directly):

- ``fp32``: the fp32 graph with f32 inference precision (same labels as ONNX Runtime's fp32);
- ``bf16``: the same graph with bf16 inference precision. Lossy, so ``auto`` uses it only where
  ``mpcl-export --bf16`` recorded a passed Dice check (``files.onnx.openvino_bf16``) and this CPU has
  native bf16; asking for it on a CPU without is refused (OpenVINO would silently run f32);
- ``int8``: the QDQ graph ``mpcl-export --int8`` kept; ``fp16``: the fp16 graph, as its Cast nodes say.

``auto`` runs the first of bf16 (checked), int8 (kept), fp32 the package and CPU allow, the same order
of preference as the ONNX Runtime backend's int8-before-fp32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpcl.backends import Capabilities, check_io_shape, module_available, refuse_unsupported
from mpcl.errors import ModelPackageError
from mpcl.model_package import ModelPackage

PRECISIONS = ("auto", "fp32", "bf16", "int8", "fp16")
FUSED_KERNELS = False  # the per-batch pre/post-processing is the shared numpy code
NOT_INSTALLED = "openvino is not installed (pip install 'mpcl[openvino]')"
BF16_RECORD = "openvino_bf16"  # key of the export's bf16 check inside files.onnx
_ROLES = {"fp32": "onnx", "bf16": "onnx", "int8": "onnx_int8", "fp16": "onnx_fp16"}
# int8 and fp16 graphs run as their (De)Quantize / Cast nodes say
_INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32", "fp16": "f32"}


def cpu_has_bf16(core: Any | None = None) -> bool:
    """Whether OpenVINO's CPU plugin reports native bf16 arithmetic on this machine."""
    import openvino

    core = core or openvino.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def bf16_unavailable() -> str | None:
    """Why this machine cannot run OpenVINO in bf16 (so ``mpcl-export --bf16`` cannot check it), or None."""
    if not module_available("openvino"):
        return NOT_INSTALLED
    if not cpu_has_bf16():
        return "this CPU has no native bf16 arithmetic (AVX512_BF16 or AMX), so OpenVINO would run f32"
    return None


def measured_on() -> dict[str, str]:
    """The CPU and OpenVINO version a check ran with, for the record (empty without openvino)."""
    if not module_available("openvino"):
        return {}
    import openvino

    return {"cpu": openvino.Core().get_property("CPU", "FULL_DEVICE_NAME"), "openvino": openvino.__version__}


def bf16_checked(package: ModelPackage) -> bool:
    """Whether mpcl-export recorded that the bf16 run of the fp32 graph passed its Dice check."""
    onnx = package.files.get("onnx")
    record = onnx.info.get(BF16_RECORD) if onnx is not None else None
    return bool(isinstance(record, dict) and record.get("kept"))


def openvino_precision(package: ModelPackage, precision: str, bf16_native: bool) -> str:
    """The precision to run: the one asked for (refused if the package or CPU cannot), or ``auto``'s pick."""
    if precision not in PRECISIONS:
        raise ModelPackageError(f"unknown OpenVINO precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "auto":
        if bf16_native and bf16_checked(package):
            return "bf16"
        return "int8" if package.has("onnx_int8") else "fp32"
    role = _ROLES[precision]
    if not package.has(role):
        raise ModelPackageError(f"{package.root}: the package has no {role} file for {precision}")
    if precision == "bf16" and not bf16_native:
        raise ModelPackageError("bf16 needs a CPU with native bf16 arithmetic (AVX512_BF16 or AMX)")
    return precision


def unavailable_reason(package: ModelPackage, device: str) -> str | None:
    if not device.startswith("cpu"):
        return "mpcl runs OpenVINO on the CPU only"
    if not package.has("onnx"):
        return "the package has no ONNX file"
    if not module_available("openvino"):
        return NOT_INSTALLED
    return None


def compile_config(precision: str, threads: int | None = None) -> dict[str, Any]:
    """The CPU plugin settings every mpcl OpenVINO model is compiled with (benchmarks profile these same
    ones): one stream tuned for latency, the precision's inference type, ``threads`` if given."""
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": _INFERENCE_PRECISION[precision],
        "PERFORMANCE_HINT": "LATENCY",
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


# lines of OpenVINO's multi-line errors that say where in its sources it failed, not what is wrong
_SOURCE_LINES = ("Exception from ", "Check '", "FrontEnd API failed")


def _openvino_call(path, call):
    """``call()``, with OpenVINO's errors (multi-line RuntimeErrors) turned into one sentence on ``path``:
    the last line that says what is wrong, not where in OpenVINO's sources it was noticed."""
    try:
        return call()
    except Exception as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        telling = [line for line in lines if not line.startswith(_SOURCE_LINES)]
        reason = (telling or lines or [type(error).__name__])[-1]
        raise ModelPackageError(f"{path}: cannot be loaded by OpenVINO ({reason[:200]})") from None


def _read_onnx(path):
    """The ONNX file as an OpenVINO model, read by the ONNX frontend alone: ``Core.read_model`` would try
    every frontend on a file that is not valid ONNX (TensorFlow's prints parse errors to stderr) and then
    say only that no frontend could read it."""
    from openvino.frontend import FrontEndManager

    frontend = FrontEndManager().load_by_framework("onnx")
    return _openvino_call(path, lambda: frontend.convert(frontend.load(str(path))))


def _static_dims(partial_shape) -> list[int | None]:
    return [dim.get_length() if dim.is_static else None for dim in partial_shape]


class OpenVinoBackend:
    """One compiled model for the CPU, built once, tuned for latency; ``run`` feeds whole batches."""

    name = "openvino"

    def __init__(
        self, package: ModelPackage, device: str = "cpu", threads: int | None = None, precision: str = "auto"
    ) -> None:
        import openvino

        core = openvino.Core()
        self.precision = openvino_precision(package, precision, cpu_has_bf16(core))
        path = package.path_of(_ROLES[self.precision])
        model = _read_onnx(path)
        inputs, outputs = model.inputs, model.outputs
        if len(inputs) != 1 or not outputs:
            raise ModelPackageError(f"{path}: expected one input and a logits output")
        patch = package.patch_size
        check_io_shape(path, "input", _static_dims(inputs[0].partial_shape), package.in_channels, patch)
        check_io_shape(path, "output", _static_dims(outputs[0].partial_shape), package.num_classes, patch)
        config = compile_config(self.precision, threads)
        self.compiled = _openvino_call(path, lambda: core.compile_model(model, "CPU", config))
        self.request = self.compiled.create_infer_request()
        self.device = "cpu"
        self.capabilities = Capabilities(self.precision, False, "the openvino backend has none")
        self.version = openvino.__version__.split("-")[0]

    def run(self, batch: np.ndarray) -> np.ndarray:
        logits = self.request.infer({0: batch})[0]  # a copy: the next call does not overwrite it
        return np.asarray(logits, dtype=np.float32)

    def describe(self) -> str:
        return f"openvino {self.version}, CPU, {self.precision}"


def create(
    package: ModelPackage,
    device: str,
    *,
    threads: int | None = None,
    fused_kernels: str = "auto",
    precision: str = "auto",
) -> OpenVinoBackend:
    """The backend for ``select_backend``; precisions are checked (and refused) by
    :func:`openvino_precision`."""
    reason = "the openvino backend has none"
    refuse_unsupported("openvino", device, ("cpu",), "auto", PRECISIONS, fused_kernels, reason)
    return OpenVinoBackend(package, device, threads, precision)
