"""mpcl.export: deployment of trained models (ONNX, TensorRT). Not implemented yet (see the export issue)."""
