"""The prototype memory bank: C classes × K intensity groups × D, updated by EMA from the teacher.

Batch prototypes are noisy (a batch may hold a few pixels of a group); the bank averages them over
steps so that the contrastive targets move slowly, as a Mean Teacher's predictions do. It also keeps
the EMA mean input intensity of each group, which orders the groups dark→bright for inspection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class PrototypeBank:
    def __init__(self, groups_per_class: Sequence[int], dim: int, momentum: float = 0.99) -> None:
        self.groups_per_class = list(groups_per_class)
        num_classes, k = len(self.groups_per_class), max(self.groups_per_class)
        self.momentum = momentum
        self.prototypes = torch.zeros(num_classes, k, dim)
        self.valid = torch.zeros(num_classes, k, dtype=torch.bool)
        self.intensity = torch.zeros(num_classes, k)
        self.allowed = torch.arange(k)[None, :] < torch.tensor(self.groups_per_class)[:, None]

    @property
    def complete(self) -> bool:
        """Every class has at least one prototype (the prototype classifier needs all classes)."""
        return bool(self.valid.any(dim=1).all())

    def to(self, device: torch.device) -> PrototypeBank:
        for name in ("prototypes", "valid", "intensity", "allowed"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @torch.no_grad()
    def fill(self, prototypes: torch.Tensor) -> None:
        """Start every slot at ``prototypes`` (C × K × D, normalised here) and count it as seen: for a bank
        that begins from fixed vectors instead of its first sightings."""
        if prototypes.shape != self.prototypes.shape:
            raise ValueError(
                f"prototypes of shape {tuple(prototypes.shape)} do not fit the bank's "
                f"{tuple(self.prototypes.shape)}"
            )
        self.prototypes = F.normalize(prototypes.to(self.prototypes), dim=-1)
        self.valid = self.allowed.clone()

    @torch.no_grad()
    def update(
        self,
        means: torch.Tensor,
        mean_intensity: torch.Tensor | None,
        counts: torch.Tensor,
        n_min: int,
        momentum: float | None = None,
    ) -> None:
        """EMA towards the batch prototypes of the (class, group)s seen on ≥ ``n_min`` pixels; a slot's
        first sighting initialises it. ``momentum`` overrides the bank's own for this update;
        ``mean_intensity`` None leaves the groups' intensities as they are (a method that tracks none)."""
        seen = (counts >= n_min) & self.allowed
        m = self.momentum if momentum is None else momentum
        # the bank stays float32 whatever the step's precision: an EMA step of 1 % is below bf16's resolution
        means = means.to(self.prototypes.dtype)
        blended = F.normalize(m * self.prototypes + (1 - m) * means, dim=-1)
        updated = torch.where(self.valid[..., None], blended, means)
        self.prototypes = torch.where(seen[..., None], updated, self.prototypes)
        if mean_intensity is not None:
            mean_intensity = mean_intensity.to(self.intensity.dtype)
            blended_intensity = torch.where(
                self.valid, m * self.intensity + (1 - m) * mean_intensity, mean_intensity
            )
            self.intensity = torch.where(seen, blended_intensity, self.intensity)
        self.valid = self.valid | seen

    @torch.no_grad()
    def update_per_class(self, class_means: torch.Tensor, class_counts: torch.Tensor, n_min: int) -> None:
        """Every group of a class follows the class's one batch mean (``class_means`` C × 1 × D,
        ``class_counts`` C × 1): ``update`` with the mean repeated over the class's groups."""
        shape = self.prototypes.shape
        self.update(class_means.expand(shape), None, class_counts.expand(shape[:2]), n_min)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "prototypes": self.prototypes.cpu(),
            "valid": self.valid.cpu(),
            "intensity": self.intensity.cpu(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["prototypes"].shape != self.prototypes.shape:
            raise ValueError(
                f"prototype bank of shape {tuple(state['prototypes'].shape)} does not fit this run's "
                f"{tuple(self.prototypes.shape)} (classes × groups × embedding size)"
            )
        device = self.prototypes.device
        self.prototypes = state["prototypes"].to(device)
        self.valid = state["valid"].to(device)
        self.intensity = state["intensity"].to(device)
