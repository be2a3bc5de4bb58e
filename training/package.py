"""Model packages from training checkpoints: kept as the trainer's (and README's) entry point.

The implementation is the export stage's (``mpcl.export``): ``write_model_package`` is its first two
steps (deployment student with BN folded, fp32 ONNX checked against torch) without reading data, and
``build_network_from_spec`` rebuilds the network a checkpoint or model.json describes.
"""

from __future__ import annotations

from mpcl.export.onnx_export import ONNX_OPSET, export_onnx
from mpcl.export.pipeline import write_model_package
from mpcl.export.student import build_network_from_spec

__all__ = ["ONNX_OPSET", "build_network_from_spec", "export_onnx", "write_model_package"]
