"""Training precision: ``train.precision`` (fp32, bf16, fp16, auto) and where float32 is kept anyway.

The trainer runs each method's step (student and teacher forward passes, losses) under
``torch.autocast`` with the chosen low-precision dtype; backward, the optimiser step and the EMA
teacher update run outside it. Autocast casts *on the fly*: parameters, optimiser state, the EMA
teacher's weights and prototype banks stay float32 (tested), only the activations of matrix-heavy ops
(convolutions, matmuls) are bf16/fp16.

Kept in float32 under autocast (``fp32`` below: autocast off, bf16/fp16 tensor arguments cast up):

* every loss (softmax, log-softmax, cross-entropy, Dice, KL, entropy): a loss is a mean over ~10⁵–10⁶
  pixels of small differences, and bf16 has an 8-bit mantissa (≈ 0.4 % relative error), so Dice ratios
  near 1 and CE of confident pixels would be rounded to a few distinct values;
* prototype and contrastive similarities (MPCL, PCCS, BARL): cosines of unit vectors divided by a
  temperature of 0.05–0.1 are logits, so a 0.4 % error of each cosine is a 0.04–0.08 error of a logit,
  comparable to the margins these losses learn; the projection heads that make those unit vectors run in
  float32 too (they are small 1x1 convolutions: little time to save);
* Sinkhorn (PCCS): iterated log-sum-exp of scores / ε with ε = 0.05 amplifies rounding 20×;
* teacher probabilities that are compared with confidence thresholds (0.9: bf16 cannot tell 0.9 from
  0.898 or 0.902) and prototype banks and their EMA updates (a momentum of 0.99 adds 1 % of a new value
  per step, below bf16's resolution of its running mean).

fp16 needs CUDA and a gradient scaler (its exponent range underflows small gradients); bf16 has fp32's
range and needs none. ``auto`` is bf16 on a CUDA GPU that supports it and fp32 elsewhere (fp16 is
never chosen for you).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from mpcl.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_HALF = (torch.bfloat16, torch.float16)
_AUTOCAST_DEVICES = ("cpu", "cuda")

Function = TypeVar("Function", bound=Callable[..., Any])


def resolve_precision(name: str, device: torch.device) -> str:
    """The precision a run on ``device`` trains in (``auto`` resolved), or a ConfigError sentence."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.precision: fp16 needs a CUDA GPU (this run trains on {device.type}); use bf16 or fp32"
        )
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision: bf16 is not supported by this GPU; use fp16 or fp32")
    if name not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {['auto', *PRECISIONS]}, got {name!r}")
    return name


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX), as oneDNN sees it: without it, torch
    runs bf16 convolutions in its slow reference kernels instead of oneDNN's."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or a differently built torch cannot tell
        return False


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a method's step runs in: nothing for fp32, ``torch.autocast`` otherwise."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device):
    """A gradient scaler for fp16 on CUDA (small gradients would underflow fp16), else None."""
    if precision != "fp16":
        return None
    try:
        return torch.amp.GradScaler(device.type)
    except (AttributeError, TypeError):  # torch < 2.3
        return torch.cuda.amp.GradScaler()


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has one query per device
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Autocast off inside (where it is on): float32 inputs then give float32 results. Outside autocast
    (every fp32 run) this is nothing at all."""
    active = [device for device in _AUTOCAST_DEVICES if _autocast_enabled(device)]
    if not active:
        yield
        return
    with contextlib.ExitStack() as stack:
        for device in active:
            stack.enter_context(torch.autocast(device_type=device, enabled=False))
        yield


def to_float32(value: Any) -> Any:
    """bf16/fp16 tensors (also inside lists, tuples and named tuples) as float32; anything else as is
    (float32 tensors are returned themselves, so fp32 runs are unchanged bit for bit)."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _HALF else value
    if isinstance(value, list):
        return [to_float32(item) for item in value]
    if isinstance(value, tuple):
        items = [to_float32(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def fp32(function: Function) -> Function:
    """Run ``function`` in float32: autocast off and its half-precision tensor arguments cast up (see the
    module docstring for where and why)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with full_precision():
            return function(*to_float32(list(args)), **{key: to_float32(v) for key, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


def run_fp32(module: Callable, *args: Any) -> Any:
    """``module(*args)`` in float32 (e.g. a projection head whose unit vectors become similarities)."""
    with full_precision():
        return module(*to_float32(list(args)))
