"""The fused kernels as TensorRT plugins (``tensorrt.plugin``, TensorRT 10 "quickly deployable plugins"),
with an ahead-of-time implementation: the Triton kernel is compiled to PTX when the engine is built and
embedded in it, so the engine runs the kernels without Python, torch or triton at inference time.

``register_plugins()`` registers two plugins (call it before building or loading an engine that uses them):

* ``mpcl::fused_preprocess(slices (b, H, W) fp32, affine (4,) fp32; patch_h, patch_w)`` -> batch
  (b, 1, patch_h, patch_w) fp32: normalisation (the affine of ``reference.normalization_affine``, an engine
  input because it is per volume) + corner-aligned bilinear resize.
* ``mpcl::fused_head(logits (F*b, C, h, w) fp32, slices (b, H, W) fp32, flip_codes (F,) int32)`` ->
  labels (b, H, W) int32, uncertainty (b, H, W) fp32. ``slices`` only gives the output size; the flip
  codes are those of ``reference.flip_code`` (a constant input; F and C must be build-time constants).

Both have a JIT ``impl`` too (torch launches the same kernel on TensorRT's stream) for engines built
without ``aot=True``. The AOT compile step (``compile_ptx``) needs only triton, and is tested on a CPU by
compiling to PTX for a named GPU architecture; registering, building and running engines needs TensorRT
and a GPU and has not been run here.

TensorRT calls an AOT kernel with (input pointers, int32 scalars, output pointers) and null for the
scratch pointers Triton appends, so the kernels keep that parameter order and must need no scratch.
"""

# No ``from __future__ import annotations``: tensorrt.plugin reads the decorated functions' annotations
# as objects (TensorDesc, typing.Tuple) to check them against the registered signature.

from dataclasses import dataclass
from typing import Any, Tuple  # noqa: UP035 - tensorrt.plugin expects typing.Tuple annotations

from mpcl.errors import ConfigError
from mpcl.optional import module_available

PREPROCESS_ID = "mpcl::fused_preprocess"
HEAD_ID = "mpcl::fused_head"
PREPROCESS_BLOCK = 256

# Runtime parameters of the kernels, in declaration order (constexpr ones are added by compile_ptx).
PREPROCESS_SIGNATURE = {
    "slices_ptr": "*fp32",
    "affine_ptr": "*fp32",
    "in_h": "i32",
    "in_w": "i32",
    "stride_b": "i32",
    "stride_h": "i32",
    "stride_w": "i32",
    "out_h": "i32",
    "out_w": "i32",
    "out_ptr": "*fp32",
}
HEAD_SIGNATURE = {
    "logits_ptr": "*fp32",
    "slices_ptr": "*fp32",
    "codes_ptr": "*i32",
    "batch": "i32",
    "num_classes": "i32",
    "in_h": "i32",
    "in_w": "i32",
    "out_h": "i32",
    "out_w": "i32",
    "labels_ptr": "*i32",
    "entropy_ptr": "*fp32",
}

_registered = False


@dataclass(frozen=True)
class CompiledKernel:
    """What an AOT plugin hands TensorRT: the kernel's name, its PTX and its launch needs."""

    name: str
    ptx: str
    num_warps: int
    shared: int


def check_aot_order(signature: dict[str, str], inputs: int, outputs: int) -> None:
    """TensorRT binds (inputs, int32 scalars, outputs) by position; refuse any other layout."""
    kinds = list(signature.values())
    pointers = [kind.startswith("*") for kind in kinds]
    scalars = kinds[inputs : len(kinds) - outputs]
    ends_are_pointers = all(pointers[:inputs]) and all(pointers[len(kinds) - outputs :])
    if not (ends_are_pointers and all(kind == "i32" for kind in scalars)):
        raise ConfigError(
            f"kernel signature {signature} is not (input pointers x{inputs}, int32 scalars, output "
            f"pointers x{outputs}), the only layout TensorRT AOT plugins can launch"
        )


def compile_ptx(kernel: Any, signature: dict[str, str], constexprs: dict[str, Any], target: Any = None):
    """Compile a @triton.jit kernel to PTX for ``target`` (a ``triton.backends.compiler.GPUTarget``;
    default: the current GPU) and check it needs no scratch memory (TensorRT passes null for it)."""
    import triton

    unknown = sorted(set(signature) - set(kernel.arg_names))
    if unknown:
        raise ConfigError(f"{kernel.__name__}: signature names unknown parameters {unknown}")
    full = {name: signature.get(name, "constexpr") for name in kernel.arg_names}
    compiled = triton.compile(
        triton.compiler.ASTSource(fn=kernel, signature=full, constexprs=constexprs), target=target
    )
    metadata = compiled.metadata
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(metadata, field, 0):
            raise ConfigError(
                f"{kernel.__name__}: the compiled kernel needs {field}={getattr(metadata, field)} bytes; "
                "TensorRT AOT plugins cannot provide Triton scratch memory"
            )
    return CompiledKernel(metadata.name, compiled.asm["ptx"], int(metadata.num_warps), int(metadata.shared))


def compile_preprocess(target: Any = None) -> CompiledKernel:
    from mpcl.kernels.triton_preprocess import fused_preprocess_kernel

    check_aot_order(PREPROCESS_SIGNATURE, inputs=2, outputs=1)
    return compile_ptx(fused_preprocess_kernel, PREPROCESS_SIGNATURE, {"BLOCK": PREPROCESS_BLOCK}, target)


def compile_head(num_flips: int, num_classes: int, target: Any = None) -> tuple[CompiledKernel, int]:
    """The head kernel for F flips and C classes, and its BLOCK (pixels per program)."""
    from mpcl.kernels.triton_head import default_block, fused_head_trt_kernel, padded_classes

    check_aot_order(HEAD_SIGNATURE, inputs=3, outputs=2)
    block = default_block(num_classes)
    constexprs = {"NUM_FLIPS": int(num_flips), "C_PAD": padded_classes(num_classes), "BLOCK": block}
    return compile_ptx(fused_head_trt_kernel, HEAD_SIGNATURE, constexprs, target), block


def unavailable_reason() -> str | None:
    """Why the plugins cannot be registered here, in one sentence, or None."""
    if not module_available("tensorrt"):
        return "the TensorRT plugins need tensorrt (pip install 'mpcl[trt]'), which is not installed"
    if not module_available("triton"):
        return "the TensorRT plugins are Triton kernels; triton is not installed (pip install 'mpcl[gpu]')"
    try:
        import tensorrt.plugin as trtp
    except ImportError as error:
        return f"tensorrt.plugin cannot be imported ({error}); the plugins need TensorRT 10.x"
    if not hasattr(trtp, "aot_impl"):
        return "this TensorRT's tensorrt.plugin has no aot_impl; a newer TensorRT 10.x is needed"
    return None


def _constant(expr: Any, what: str) -> int:
    if not expr.is_constant:
        raise ConfigError(f"{what} must be fixed when the engine is built (it is dynamic in this network)")
    return int(expr.constant_value())


def register_plugins() -> None:
    """Register both plugins with TensorRT's plugin registry (once per process)."""
    global _registered
    if _registered:
        return
    reason = unavailable_reason()
    if reason is not None:
        raise ConfigError(reason)
    import tensorrt as trt
    import tensorrt.plugin as trtp

    # -- mpcl::fused_preprocess --------------------------------------------------------------------
    @trtp.register(PREPROCESS_ID)
    def preprocess_desc(
        slices: trtp.TensorDesc, affine: trtp.TensorDesc, patch_h: int, patch_w: int
    ) -> trtp.TensorDesc:
        return trtp.from_shape_expr((slices.shape_expr[0], 1, patch_h, patch_w), dtype=trt.float32)

    @trtp.autotune(PREPROCESS_ID)
    def preprocess_autotune(slices, affine, outputs):
        return [trtp.AutoTuneCombination("FP32, FP32, FP32")]

    @trtp.aot_impl(PREPROCESS_ID)
    def preprocess_aot(
        slices: trtp.TensorDesc,
        affine: trtp.TensorDesc,
        patch_h: int,
        patch_w: int,
        outputs: Tuple[trtp.TensorDesc],  # noqa: UP006
        tactic: int,
    ):
        kernel = compile_preprocess()
        in_h, in_w = slices.shape_expr[1], slices.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = -(-(patch_h * patch_w) // PREPROCESS_BLOCK)
        launch.grid_y = slices.shape_expr[0]
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared
        scalars = (in_h, in_w, in_h * in_w, in_w, 1, patch_h, patch_w)  # contiguous (b, H, W) strides
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(value) for value in scalars])
        return kernel.name, kernel.ptx, launch, extra

    @trtp.impl(PREPROCESS_ID)
    def preprocess_impl(
        slices: trtp.Tensor,
        affine: trtp.Tensor,
        patch_h: int,
        patch_w: int,
        outputs: Tuple[trtp.Tensor],  # noqa: UP006
        stream: int,
    ):
        import torch

        from mpcl.kernels.triton_preprocess import fused_preprocess_kernel

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            x = torch.as_tensor(slices, device="cuda")
            out = torch.as_tensor(outputs[0], device="cuda")
            grid = (-(-(patch_h * patch_w) // PREPROCESS_BLOCK), x.shape[0])
            fused_preprocess_kernel[grid](
                x, torch.as_tensor(affine, device="cuda"), x.shape[1], x.shape[2], *x.stride(),
                patch_h, patch_w, out, BLOCK=PREPROCESS_BLOCK,
            )

    # -- mpcl::fused_head --------------------------------------------------------------------------
    @trtp.register(HEAD_ID)
    def head_desc(
        logits: trtp.TensorDesc, slices: trtp.TensorDesc, flip_codes: trtp.TensorDesc
    ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:  # noqa: UP006
        shape = (slices.shape_expr[0], slices.shape_expr[1], slices.shape_expr[2])
        return trtp.from_shape_expr(shape, dtype=trt.int32), trtp.from_shape_expr(shape, dtype=trt.float32)

    @trtp.autotune(HEAD_ID)
    def head_autotune(logits, slices, flip_codes, outputs):
        return [trtp.AutoTuneCombination("FP32, FP32, INT32, INT32, FP32")]

    @trtp.aot_impl(HEAD_ID)
    def head_aot(
        logits: trtp.TensorDesc,
        slices: trtp.TensorDesc,
        flip_codes: trtp.TensorDesc,
        outputs: Tuple[trtp.TensorDesc],  # noqa: UP006
        tactic: int,
    ):
        num_classes = _constant(logits.shape_expr[1], "the number of classes (logits dimension 1)")
        num_flips = _constant(flip_codes.shape_expr[0], "the number of flips (flip_codes length)")
        kernel, block = compile_head(num_flips, num_classes)
        batch, out_h, out_w = slices.shape_expr[0], slices.shape_expr[1], slices.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(out_h * out_w, block)
        launch.grid_y = batch
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared
        scalars = (batch, num_classes, logits.shape_expr[2], logits.shape_expr[3], out_h, out_w)
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(value) for value in scalars])
        return kernel.name, kernel.ptx, launch, extra

    @trtp.impl(HEAD_ID)
    def head_impl(
        logits: trtp.Tensor,
        slices: trtp.Tensor,
        flip_codes: trtp.Tensor,
        outputs: Tuple[trtp.Tensor, trtp.Tensor],  # noqa: UP006
        stream: int,
    ):
        import torch
        import triton

        from mpcl.kernels.triton_head import default_block, fused_head_trt_kernel, padded_classes

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            x = torch.as_tensor(logits, device="cuda")
            shape = torch.as_tensor(slices, device="cuda")
            codes = torch.as_tensor(flip_codes, device="cuda")
            labels = torch.as_tensor(outputs[0], device="cuda")
            entropy = torch.as_tensor(outputs[1], device="cuda")
            batch, out_h, out_w = shape.shape
            num_classes, block = x.shape[1], default_block(x.shape[1])
            grid = (triton.cdiv(out_h * out_w, block), batch)
            fused_head_trt_kernel[grid](
                x, shape, codes, batch, num_classes, x.shape[2], x.shape[3], out_h, out_w, labels, entropy,
                NUM_FLIPS=codes.numel(), C_PAD=padded_classes(num_classes), BLOCK=block,
            )

    _registered = True
