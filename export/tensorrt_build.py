"""TensorRT engines built from the package's ONNX graph with the TensorRT Python API (10.x and 11.x).

Precision comes from the graph, not from builder flags: TensorRT 11 only builds strongly typed networks
(the FP16/INT8 builder flags are gone), so an fp16 engine is built from the fp16 ONNX copy
(``mpcl.export.quantize.convert_fp16``), whose float32 interface Casts keep the engine's inputs and
outputs float32. TensorRT 10 gets the same network through its STRONGLY_TYPED creation flag, so both
versions build the same engine. One optimisation profile covers the package's patch size and batches
``min_batch..max_batch`` (the runtime splits larger batches).

An engine runs only on the GPU model and TensorRT version it was built with; both are recorded in
model.json with the same functions the runtime backend (``mpcl.backends.tensorrt_backend``) compares
them with before it deserialises an engine. TensorRT is an optional extra (``mpcl[trt]``): without it
:func:`tensorrt_unavailable` gives the one sentence ``mpcl-export --trt`` stops with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpcl.backends import module_available
from mpcl.export.onnx_export import INPUT_NAME, OUTPUT_NAME
from mpcl.export.parity import CheckFailed
from mpcl.io import write_atomically

TRT_PRECISIONS = ("fp16", "fp32")


@dataclass(frozen=True)
class EngineProfile:
    """The input shapes one optimisation profile covers: (batch, channels, *patch) from min to max batch."""

    in_channels: int
    patch_size: tuple[int, int]
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 16

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"engine batch range must satisfy 1 <= min <= opt <= max, got {self}")
        return tuple(
            (batch, self.in_channels, *self.patch_size)
            for batch in (self.min_batch, self.opt_batch, self.max_batch)
        )  # type: ignore[return-value]

    def record(self) -> dict[str, Any]:
        minimum, optimum, maximum = self.shapes()
        return {"input": INPUT_NAME, "min": list(minimum), "opt": list(optimum), "max": list(maximum)}


def tensorrt_unavailable() -> str | None:
    """One sentence saying why no engine can be built on this machine, or None if one can."""
    if not module_available("tensorrt"):
        return (
            "--trt needs TensorRT, which is not installed here (it is the optional extra mpcl[trt] and "
            "needs an NVIDIA GPU); nothing was written"
        )
    import torch

    if not torch.cuda.is_available():
        return "--trt needs a CUDA GPU visible to torch to build an engine, and none is; nothing was written"
    return None


def _strongly_typed_flags(trt) -> int:
    """Creation flags for a strongly typed network: explicit in TensorRT 10, the only kind in 11."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    profile: EngineProfile,
    precision: str,
    device: str = "cuda",
    workspace_gib: int = 4,
) -> dict[str, Any]:
    """Build and serialise an engine for ``onnx_path``; returns the model.json entry fields.

    ``precision`` only documents what the graph holds (fp16 graphs come from ``convert_fp16``).
    """
    import tensorrt as trt
    import torch

    from mpcl.backends.tensorrt_backend import current_gpu_name

    if precision not in TRT_PRECISIONS:
        raise ValueError(f"engine precision {precision!r}; expected one of {TRT_PRECISIONS}")
    logger = trt.Logger(trt.Logger.WARNING)
    with torch.cuda.device(device if ":" in device else "cuda:0"):
        builder = trt.Builder(logger)
        network = builder.create_network(_strongly_typed_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["unknown error"]
            raise CheckFailed(
                f"{onnx_path.name}: TensorRT {trt.__version__} cannot parse the graph ({errors[0][:200]})"
            )
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
        optimisation = builder.create_optimization_profile()
        optimisation.set_shape(INPUT_NAME, *profile.shapes())
        config.add_optimization_profile(optimisation)
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CheckFailed(f"TensorRT {trt.__version__} could not build an engine from {onnx_path.name}")
    payload = bytes(memoryview(serialized))
    write_atomically(engine_path, lambda temporary: temporary.write_bytes(payload))
    return {
        "tensorrt_version": trt.__version__,
        "gpu_name": current_gpu_name(device),
        "precision": precision,
        "strongly_typed": True,
        "profile": profile.record(),
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "built_from": onnx_path.name,
    }
