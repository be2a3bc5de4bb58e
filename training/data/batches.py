"""Turning slices into the two-stream tensors of one training step.

Every random choice of batch t is drawn from generators seeded by (seed, t, stream, position), so a
batch is reproducible on its own: resuming needs no data-loader state, a background thread can
prepare batch t+1 while the model trains on batch t, and each of N training processes can build just its
share of the positions (``shard``): the shares, put together in rank order, are the one-process batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mpcl.errors import ConfigError
from mpcl.training.config_schema import AugmentConfig
from mpcl.training.data.augment import strong_view, weak_view
from mpcl.training.data.base import Slice2D
from mpcl.training.data.sampler import TwoStreamSampler


@dataclass
class Batch:
    """One training step's data; images are (B, 1, H, W) float32, labels (B, H, W) int64."""

    labeled_image: torch.Tensor
    labeled_label: torch.Tensor
    unlabeled_image: torch.Tensor  # weak view; (0, 1, H, W) when the method uses no unlabelled data
    unlabeled_strong: torch.Tensor | None = None  # strong view of the same unlabelled patches, if asked
    labeled_strong: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        move = lambda tensor: None if tensor is None else tensor.to(device, non_blocking=True)  # noqa: E731
        return Batch(*(move(getattr(self, name)) for name in self.__dataclass_fields__))


class BatchFactory:
    """Builds batch t from the labelled and unlabelled slice pools."""

    def __init__(
        self,
        labeled: Sequence[Slice2D],
        unlabeled: Sequence[Slice2D],
        patch_size: tuple[int, int],
        labeled_batch: int,
        unlabeled_batch: int,
        augment: AugmentConfig,
        seed: int,
        strong_views: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        """``shard`` = (rank, processes): build only positions [rank·b/n, (rank+1)·b/n) of each stream's
        b positions (b a multiple of n)."""
        if not labeled:
            raise ValueError("no labelled slices to train on")
        if unlabeled_batch > 0 and not unlabeled:
            raise ValueError("the method needs unlabelled slices but the dataset has none")
        self.labeled = labeled
        self.unlabeled = unlabeled
        self.patch_size = tuple(patch_size)
        self.augment = augment
        self.seed = seed
        self.strong_views = strong_views
        rank, processes = shard
        for name, size in (("labeled_batch", labeled_batch), ("unlabeled_batch", unlabeled_batch)):
            if size % processes:
                raise ConfigError(
                    f"train.{name} is {size}, not a multiple of the {processes} processes: each builds an "
                    "equal share of the global batch"
                )
        self.shard = shard
        self.sampler = TwoStreamSampler(len(labeled), len(unlabeled), labeled_batch, unlabeled_batch, seed)

    def _rng(self, iteration: int, stream: int, position: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, iteration, stream, position])

    def _share(self, indices: list[int]) -> tuple[list[int], int]:
        """This process's part of a stream's indices, and the batch position of its first one."""
        rank, processes = self.shard
        share = len(indices) // processes
        return indices[rank * share : (rank + 1) * share], rank * share

    def _views(self, slices: Sequence[Slice2D], indices: list[int], iteration: int, stream: int):
        images, labels, strong = [], [], []
        indices, first = self._share(indices)
        for position, index in enumerate(indices, first):
            rng = self._rng(iteration, stream, position)
            item = slices[index]
            image, label = weak_view(rng, item.image, item.label, self.patch_size, self.augment)
            images.append(image)
            labels.append(label)
            if self.strong_views:
                strong.append(strong_view(rng, image, self.augment))
        height, width = self.patch_size
        as_images = lambda arrays: torch.from_numpy(  # noqa: E731
            np.stack(arrays)[:, None] if arrays else np.zeros((0, 1, height, width), np.float32)
        ).float()
        return as_images(images), labels, (as_images(strong) if self.strong_views else None)

    def __call__(self, iteration: int) -> Batch:
        labeled_indices, unlabeled_indices = self.sampler.indices(iteration)
        labeled_image, labels, labeled_strong = self._views(self.labeled, labeled_indices, iteration, 0)
        unlabeled_image, _, unlabeled_strong = self._views(self.unlabeled, unlabeled_indices, iteration, 1)
        labeled_label = torch.from_numpy(np.stack(labels).astype(np.int64))
        return Batch(labeled_image, labeled_label, unlabeled_image, unlabeled_strong, labeled_strong)


def prefetch(factory: BatchFactory, start: int, stop: int, depth: int = 2) -> Iterator[Batch]:
    """Yield factory(t) for t in [start, stop), built one or two steps ahead in a background thread."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop_event = threading.Event()

    def produce() -> None:
        for iteration in range(start, stop):
            if stop_event.is_set():
                return
            try:
                item = factory(iteration)
            except Exception as error:  # handed to the consumer, which re-raises it
                item = error
            while not stop_event.is_set():
                try:
                    slots.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue

    worker = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    worker.start()
    try:
        for _ in range(start, stop):
            item = slots.get()
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop_event.set()
        worker.join(timeout=5)
