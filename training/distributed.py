"""Data-parallel training over several processes (``torchrun``), built so that N processes compute what
one process computes with the whole batch.

How a step is split. Every process builds its equal share of the global batch from the same pure
(seed, iteration) function and the shares are gathered, so every process holds the global batch. The
methods then run unchanged on it, with one difference: the student and the teacher are wrapped in
``ShardedNetwork``. A network pass over B rows runs only the process's B/N rows and gathers the outputs
of all processes, so the expensive part (the networks' forward and backward passes) is split N
ways while every loss — Dice over the whole batch, prototype and contrastive terms over all pixels,
copy-paste pairs, the teacher's pseudo-labels, prototype-bank updates — is computed from the global
tensors, identically on every process. Nothing a method keeps (EMA teacher, prototype banks, PCCS's Π,
its RNG draws) can then differ between processes, and nothing of it needs reducing.

Gradients. Every process computes the same loss, so the gradient that reaches a process's own rows of a
gathered output is already complete there: the gather sends nothing back, it keeps the process's rows.
Each process's student gradient is then its rows' share of the global gradient, and the shares are
summed across processes (``reduce_gradients``); extra modules (projection heads, BARL's branch B) run on
the gathered tensors on every process, so their gradients are whole already and are averaged only to
keep floating-point noise from separating the processes.

Batch norm. A shard's batch statistics are not the global batch's: ``train.sync_batchnorm`` replaces the
student's (and so the teacher's) batch norms by ``GlobalBatchNorm2d``, whose statistics (and their
gradients) are summed across processes during training steps, so a pass over N shards normalises as one
pass over the whole batch. Outside a step (validation, batch-norm recalibration on process 0) it is plain
batch norm. torch's ``SyncBatchNorm`` refuses CPU tensors, hence a module of our own.

Random draws. Network passes draw dropout masks from a stream of their own per process (seeded by the
run's seed, the iteration, the process and the pass), so the processes' masks differ and their global
torch RNG streams, which the methods draw from on the global tensors, stay equal. With dropout on, an
N-process run is therefore a different draw from one with a single process (same distribution).

Process 0 validates, logs and writes checkpoints and the model package; the others wait at a barrier.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mpcl.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 without ``torchrun``)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    """True when ``torchrun`` (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` for CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_env(device_name: str) -> World:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``); a no-op returning the one-process world without it. On
    CUDA each process takes GPU ``LOCAL_RANK``."""
    if not launched_distributed():
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        # validation runs on process 0 alone while the others wait: a generous timeout for that barrier
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return current()


def current() -> World:
    """The world of the initialised process group, or the one-process world."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (at the end of ``mpcl-train``), if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(value: Any) -> Any:
    """Process 0's ``value`` on every process (e.g. the best validation Dice that only it measured)."""
    if not current().distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# -- rows of a batch --------------------------------------------------------------------------------
def shard_bounds(rows: int, world: World) -> tuple[int, int]:
    """The rows [start, stop) of a pass over ``rows`` rows that this process runs."""
    if rows % world.size:
        raise ConfigError(
            f"a network pass over {rows} slices cannot be split evenly over {world.size} processes: make "
            f"train.labeled_batch and train.unlabeled_batch multiples of {world.size} (copy-paste methods "
            f"pass half batches: multiples of {2 * world.size})"
        )
    share = rows // world.size
    return world.rank * share, (world.rank + 1) * share


class _GatherRows(torch.autograd.Function):
    """All processes' rows, concatenated in rank order. Backwards it keeps this process's rows of the
    gradient: every process computes the same loss from the gathered tensor, so that gradient is
    complete here, and the student's gradients are summed across processes afterwards."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = current()
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(world.size)]
        dist.all_gather(parts, local)
        ctx.bounds = (world.rank * local.shape[0], (world.rank + 1) * local.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        start, stop = ctx.bounds
        return grad[start:stop]


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every process's equal-sized ``local`` rows, concatenated in rank order (differentiable)."""
    if not current().distributed:
        return local
    return _GatherRows.apply(local)


def _gather_tree(value: Any) -> Any:
    """``gather_rows`` on every tensor of a network output (a tensor, a list, or a NamedTuple of them)."""
    if isinstance(value, torch.Tensor):
        return gather_rows(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_gather_tree(item) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_gather_tree(item) for item in value)
    return value


def gather_batch(batch: Any) -> Any:
    """The global batch from every process's share (a dataclass of row-major tensors; None stays)."""
    world = current()
    if not world.distributed:
        return batch

    def gathered(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None or tensor.shape[0] == 0:  # e.g. no unlabelled stream: no rows anywhere
            return tensor
        return gather_rows(tensor)

    return type(batch)(**{f.name: gathered(getattr(batch, f.name)) for f in fields(batch)})


# -- networks ----------------------------------------------------------------------------------------
class ShardedNetwork:
    """A network as the methods see it during a distributed step: called (or ``forward_features``) on a
    global batch it runs this process's rows, with dropout drawn from the process's own stream, and
    returns every process's outputs gathered. Other attributes are the network's."""

    def __init__(self, network: nn.Module, seed: int) -> None:
        self.network = network
        self.seed = seed
        self.iteration = 0
        self.passes = 0

    def begin_step(self, iteration: int) -> None:
        """Reset the pass counter: the random streams of step ``iteration`` depend on nothing else."""
        self.iteration, self.passes = iteration, 0

    def _run(self, forward, images: torch.Tensor):
        world = current()
        start, stop = shard_bounds(images.shape[0], world)
        key = [self.seed, self.iteration, world.rank, self.passes]
        seed = int(np.random.SeedSequence(key).generate_state(1)[0])
        self.passes += 1
        device = images.device
        devices = []
        if device.type == "cuda":
            devices = [device.index if device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.random.default_generator.manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.manual_seed(seed)
            output = forward(images[start:stop])
        return _gather_tree(output)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(self.network, images)

    def forward_features(self, images: torch.Tensor):
        return self._run(self.network.forward_features, images)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.network, name)


def broadcast_module(module: nn.Module | None, buffers_only: bool = False) -> None:
    """Process 0's parameters (unless ``buffers_only``) and buffers on every process, as DDP does at its
    start and, for buffers, before each step (batch-norm running statistics measured on one shard)."""
    if module is None or not current().distributed:
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


def reduce_gradients(parameters: Iterable[nn.Parameter], average: bool) -> None:
    """Sum (the student's per-shard shares) or average (modules every process ran on the whole batch)
    the gradients across processes, in one flat buffer. A parameter without a gradient keeps none (the
    optimiser then skips it, as with one process): every process runs the same graph, so the same ones."""
    world = current()
    params = [p for p in parameters if p.grad is not None]
    if not world.distributed or not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    if average:
        flat /= world.size
    offset = 0
    for param in params:
        count = param.grad.numel()
        param.grad.copy_(flat[offset : offset + count].view_as(param.grad))
        offset += count


# -- batch norm over all processes -------------------------------------------------------------------
_SYNC = {"active": False}


@contextmanager
def synchronised_batch_norm(active: bool = True) -> Iterator[None]:
    """Within it ``GlobalBatchNorm2d`` layers in training mode normalise with global statistics."""
    previous = _SYNC["active"]
    _SYNC["active"] = active and current().distributed
    try:
        yield
    finally:
        _SYNC["active"] = previous


class _AllReduceSum(torch.autograd.Function):
    """Sum across processes; backwards the gradient is summed too (each process's loss depends on the
    sum through every process's rows)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = grad.clone()
        dist.all_reduce(total)
        return total


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch (all processes' rows)
    inside ``synchronised_batch_norm``; plain BatchNorm2d everywhere else. Same parameters, buffers and
    state-dict keys, so checkpoints load into the plain network. Statistics are computed in float32 in
    two passes (mean, then the centred sum of squares), as stable as torch's own."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (_SYNC["active"] and self.training):
            return super().forward(input)
        x = input.float()
        dims = [0, 2, 3]
        count = x.numel() // x.shape[1] * current().size  # every process runs an equal share
        mean = _AllReduceSum.apply(x.sum(dims)) / count
        centred = x - mean[None, :, None, None]
        variance = _AllReduceSum.apply((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), variance.detach(), count)
        output = centred * torch.rsqrt(variance + self.eps)[None, :, None, None]
        if self.affine:
            output = output * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return output.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, variance: torch.Tensor, count: int) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = variance * count / max(count - 1, 1)
        self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)


def convert_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d replaced, in place, by a ``GlobalBatchNorm2d`` sharing its
    parameters and buffers (no random draws: the run's RNG is untouched)."""
    if type(module) is nn.BatchNorm2d:
        converted = GlobalBatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_batch_norm(child))
    return module
