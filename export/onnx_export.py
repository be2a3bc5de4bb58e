"""ONNX export: the deployment network as one self-contained, checked, ONNX-Runtime-optimised graph.

The graph takes ``image`` (N, C, H, W) float32 and returns ``logits`` (N, classes, H, W) with batch and
spatial axes dynamic (any H, W divisible by 16 work; the package's patch size is what the runtime feeds).
ONNX Runtime's basic graph optimisations (constant folding, conv fusions with standard ops only) are
applied once here and saved, so the file stays portable to every execution provider and TensorRT.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from mpcl.export.parity import CheckFailed

ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "logits"
DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}


def export_onnx(model: torch.nn.Module, path: Path, in_channels: int, patch_size: tuple[int, int]) -> None:
    """Trace ``model`` (eval mode) into ``path`` with opset 17 and dynamic batch/height/width.

    torch >= 2.9 defaults to the torch.export-based exporter, which needs onnxscript and may write
    external weight files; the TorchScript exporter (``dynamo=False``) traces this static-graph CNN
    exactly and gives a single file that every ONNX Runtime and TensorRT version reads.
    """
    model = model.eval()
    example = torch.zeros(1, in_channels, *patch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: DYNAMIC_AXES, OUTPUT_NAME: DYNAMIC_AXES},
            do_constant_folding=True,
        )


def optimize_onnx(source: Path, target: Path) -> None:
    """Save ONNX Runtime's provider-independent (basic-level) optimisation of ``source`` as ``target``."""
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    onnxruntime.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(target))
    prune_opset_imports(model)
    onnx.save(model, str(target))


def prune_opset_imports(model) -> None:
    """Drop opset imports of domains no node uses (ONNX Runtime lists all of its own when saving)."""
    used = {node.domain or "" for node in model.graph.node}
    keep = [entry for entry in model.opset_import if (entry.domain or "") in used | {""}]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def check_onnx_file(path: Path, dynamic_spatial: bool = True) -> None:
    """onnx.checker (full, with shape inference) plus the interface the runtime expects, or CheckFailed."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckFailed(f"{path.name}: onnx.checker refuses the exported graph ({first[:200]})") from None
    model = onnx.load(str(path), load_external_data=False)
    opset = max((e.version for e in model.opset_import if (e.domain or "") == ""), default=0)
    if opset < ONNX_OPSET:
        raise CheckFailed(f"{path.name}: uses ONNX opset {opset}; at least {ONNX_OPSET} is required")
    inputs = [i for i in model.graph.input if i.name not in {init.name for init in model.graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in model.graph.output] != [OUTPUT_NAME]:
        raise CheckFailed(f"{path.name}: expected one input {INPUT_NAME!r} and one output {OUTPUT_NAME!r}")
    axes = (0, 2, 3) if dynamic_spatial else (0,)
    for value in (inputs[0], model.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        static = [axis for axis in axes if dims[axis].HasField("dim_value")]
        if static:
            raise CheckFailed(
                f"{path.name}: {value.name} axes {static} are static; batch and spatial must be dynamic"
            )


def opset_of(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max((e.version for e in model.opset_import if (e.domain or "") == ""), default=0)
