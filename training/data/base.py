"""The in-memory data model every dataset produces, so the trainer never knows where data came from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mpcl.planned_geometry import PlannedInput

IDENTITY_DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class Slice2D:
    """One training slice: image already intensity-normalised (per volume), label optional."""

    name: str
    image: np.ndarray  # (H, W) float32
    label: np.ndarray | None = None  # (H, W) uint8, values in [0, num_classes)


@dataclass(frozen=True)
class Volume:
    """One evaluation volume in SimpleITK axis order: arrays are (z, y, x), spacing/origin are (x, y, z)."""

    name: str
    image: np.ndarray  # (D, H, W) float32, intensity-normalised
    label: np.ndarray | None  # (D, H, W) uint8 or None for unlabelled volumes
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = IDENTITY_DIRECTION
    # a planned dataset's (mpcl.planned_geometry): its geometry and the crop box of the raw image
    planned: PlannedInput | None = None

    @property
    def array_spacing(self) -> tuple[float, float, float]:
        """Spacing in array axis order (z, y, x), as distance-based metrics need it."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])


@dataclass
class SegmentationData:
    """Everything a training run needs: labelled/unlabelled slices and validation/test volumes."""

    labeled: list[Slice2D]
    unlabeled: list[Slice2D]
    val_volumes: Sequence[Volume]
    test_volumes: Sequence[Volume]
    class_names: list[str]
    normalization: dict = field(default_factory=lambda: {"scheme": "minmax"})

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
