"""``train.compile``: the training step's networks through ``torch.compile``.

Only the step's view of the student and teacher is compiled (extra modules, e.g. projection heads and
BARL's second branch, stay eager). Validation, batch-norm recalibration, checkpoints and the model
package use the eager modules, which share their parameters and buffers: state-dict keys do not change,
and validation's varying slice shapes never trigger recompilation. Each network's ``__call__`` and
``forward_features`` are compiled with static shapes: a method feeds its networks a few fixed batch
shapes (labelled, unlabelled, mixed), each compiled on first use.

Compiling costs a minute or more before the first step on a CPU, and inductor draws dropout masks from
its own random stream, not eager torch's (same distribution, other masks); a compiled run resumes exactly.
``benchmarks/train_speed.py --compile off on`` measures whether it pays on a machine.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

BACKEND = "inductor"  # tests swap in "eager" to check the plumbing without compile time


class CompiledNetwork:
    """A network as the methods see it in a compiled step: called or ``forward_features`` through
    ``torch.compile``; every other attribute is the eager network's."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self._call = torch.compile(network, backend=BACKEND, dynamic=False)
        self._forward_features = torch.compile(network.forward_features, backend=BACKEND, dynamic=False)

    def __call__(self, images: torch.Tensor) -> Any:
        return self._call(images)

    def forward_features(self, images: torch.Tensor) -> Any:
        return self._forward_features(images)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.network, name)


def compiled(network: nn.Module | None) -> CompiledNetwork | None:
    """``network``'s compiled step view (None stays None)."""
    return None if network is None else CompiledNetwork(network)
