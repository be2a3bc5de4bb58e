"""Two-stream batch sampling that is a pure function of (seed, iteration).

Labelled indices are consumed one shuffled pass ("epoch") after another and so are unlabelled indices,
as SSL4MIS's two-stream sampler does. Because the indices of iteration t depend only on the seed and t,
a run resumed from a checkpoint sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


class ShuffledStream:
    """Endless concatenation of seeded permutations of ``range(size)``."""

    def __init__(self, size: int, seed: int, stream_id: int) -> None:
        if size <= 0:
            raise ValueError("cannot sample from an empty pool")
        self.size = size
        self.seed = seed
        self.stream_id = stream_id
        self._permutation = lru_cache(maxsize=4)(self._make_permutation)

    def _make_permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.stream_id, epoch])
        return rng.permutation(self.size)

    def take(self, start: int, count: int) -> list[int]:
        """Indices at stream positions [start, start + count)."""
        return [int(self._permutation(p // self.size)[p % self.size]) for p in range(start, start + count)]


class TwoStreamSampler:
    """Indices of the labelled and unlabelled samples used at iteration t."""

    def __init__(self, n_labeled: int, n_unlabeled: int, labeled_batch: int, unlabeled_batch: int, seed: int):
        self.labeled_batch = labeled_batch
        self.unlabeled_batch = unlabeled_batch
        self.labeled = ShuffledStream(n_labeled, seed, stream_id=0)
        self.unlabeled = ShuffledStream(n_unlabeled, seed, stream_id=1) if unlabeled_batch > 0 else None

    def indices(self, iteration: int) -> tuple[list[int], list[int]]:
        labeled = self.labeled.take(iteration * self.labeled_batch, self.labeled_batch)
        if self.unlabeled is None:
            return labeled, []
        return labeled, self.unlabeled.take(iteration * self.unlabeled_batch, self.unlabeled_batch)
