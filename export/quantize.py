"""Reduced-precision copies of the fp32 ONNX graph: static int8 (QDQ) for CPU, fp16 for GPUs.

int8: weights per output channel (int8), activations per tensor (uint8, the U8S8 form ONNX Runtime's
CPU kernels run fastest), with activation ranges calibrated on training slices: the statistics the
network sees in deployment, and never the validation volumes that then judge the result.

fp16: a small graph pass rather than a converter dependency. Every float initializer and intermediate
becomes float16 (except Resize's roi and scales, which its schema keeps float32: the bilinear decoder) and
two Casts keep the interface float32, so callers (and TensorRT 11's strongly typed networks, which take
their precision from the graph) need no change. Written in topological order, which ``onnx.checker``
requires and ``onnxruntime.transformers.float16`` does not produce with ``keep_io_types``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from mpcl.export.onnx_export import INPUT_NAME, OUTPUT_NAME
from mpcl.preprocessing import resize_2d
from mpcl.training.data.base import Slice2D

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def calibration_slices(
    labeled: Sequence[Slice2D],
    unlabeled: Sequence[Slice2D],
    patch_size: tuple[int, int],
    count: int,
    seed: int = 0,
) -> np.ndarray:
    """(N, 1, H, W) float32: ``count`` training slices (labelled and unlabelled) resized to the patch."""
    pool = list(labeled) + list(unlabeled)
    if not pool:
        raise ValueError("no training slices to calibrate int8 activations on")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    images = [resize_2d(pool[int(i)].image, patch_size, order=1) for i in sorted(picks)]
    return np.ascontiguousarray(np.stack(images)[:, None], dtype=np.float32)


def _reader(batches: np.ndarray, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class SliceReader(CalibrationDataReader):
        """Feeds calibration slices in batches; ``rewind`` lets percentile/entropy passes reread them."""

        def __init__(self) -> None:
            self.rewind()

        def rewind(self) -> None:
            self._batches: Iterator[np.ndarray] = iter(
                [batches[i : i + batch_size] for i in range(0, len(batches), batch_size)]
            )

        def get_next(self) -> dict | None:
            batch = next(self._batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    return SliceReader()


def quantize_int8(
    fp32_path: Path,
    int8_path: Path,
    calibration: np.ndarray,
    method: str = "minmax",
    batch_size: int = 8,
) -> None:
    """Static QDQ int8 copy of ``fp32_path`` calibrated on ``calibration`` (N, 1, H, W) slices."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r}; expected one of {CALIBRATION_METHODS}")
    calibrate = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]
    scratch = Path(tempfile.mkdtemp(prefix=".quantize-", dir=int8_path.parent))
    try:
        prepared = scratch / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(int8_path),
            _reader(calibration, batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate,
            calibration_providers=["CPUExecutionProvider"],
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def convert_fp16(fp32_path: Path, fp16_path: Path) -> None:
    """fp16 copy of a float32 graph whose input and output stay float32 (see the module docstring)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(fp32_path))
    graph = model.graph
    # Resize's roi and scales inputs must stay float32 (the operator's schema; the bilinear decoder)
    keep_float = {
        name for node in graph.node if node.op_type == "Resize" for name in node.input[1:3] if name
    }
    for initializer in graph.initializer:
        if initializer.data_type == TensorProto.FLOAT and initializer.name not in keep_float:
            array = numpy_helper.to_array(initializer).astype(np.float16)
            initializer.CopyFrom(numpy_helper.from_array(array, initializer.name))
    for node in graph.node:
        if node.op_type == "Constant" and not keep_float & set(node.output):
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.t.data_type == TensorProto.FLOAT:
                    half = numpy_helper.to_array(attribute.t).astype(np.float16)
                    attribute.t.CopyFrom(numpy_helper.from_array(half, attribute.t.name))
        if node.op_type == "Cast" and any(
            a.name == "to" and a.i == TensorProto.FLOAT for a in node.attribute
        ):
            for attribute in node.attribute:
                if attribute.name == "to":
                    attribute.i = TensorProto.FLOAT16
    for value in graph.value_info:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT and value.name not in keep_float:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    half_in, half_out = f"{INPUT_NAME}_fp16", f"{OUTPUT_NAME}_fp16"
    for node in graph.node:
        node.input[:] = [half_in if name == INPUT_NAME else name for name in node.input]
        node.output[:] = [half_out if name == OUTPUT_NAME else name for name in node.output]
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], [half_in], name="cast_input_to_fp16", to=TensorProto.FLOAT16),
        *graph.node,
        helper.make_node("Cast", [half_out], [OUTPUT_NAME], name="cast_output_to_fp32", to=TensorProto.FLOAT),
    ]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(fp16_path))
