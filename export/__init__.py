"""mpcl.export: from a trained checkpoint to a checked deployment model package (``mpcl-export``).

Modules, one step each: ``student`` (strip training-only parts, fold batch-norm), ``distill`` (compact
student), ``onnx_export`` (fp32 ONNX), ``quantize`` (int8 QDQ, fp16), ``tensorrt_build`` (engines),
``parity`` (the checks every artefact passes), ``package`` (staging and atomic publishing),
``pipeline`` (the steps in order) and ``cli``.
"""
