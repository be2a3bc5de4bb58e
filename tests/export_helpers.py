"""A small model trained for a few seconds on the phantom, saved as a full training checkpoint.

The checkpoint carries what a real one does besides the student (EMA teacher, a projection head in
``extra``, a prototype bank in ``method_state``, deep-supervision heads, an optimiser), so export tests
can check that none of it reaches the package; its stored config reloads the same phantom data.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

TINY_CHANNELS = [4, 8, 8, 16, 16]
PATCH = (32, 32)


def tiny_export_config(output_dir: Path) -> dict:
    from tests.conftest import tiny_config_dict

    config = tiny_config_dict(output_dir, "mpcl", 60)
    config["data"]["phantom"].update(n_labeled=4, n_unlabeled=2, n_val=2, n_test=1)
    config["model"] = {"channels": list(TINY_CHANNELS), "deep_supervision": True}
    return config


def train_tiny_checkpoint(folder: Path, steps: int = 60, seed: int = 0) -> Path:
    """Full-batch Adam on the labelled phantom slices: a network with clearly non-zero Dice, quickly."""
    import torch

    from mpcl.nn.checkpoint import build_metadata, save_checkpoint
    from mpcl.nn.projection import ProjectionHead
    from mpcl.preprocessing import resize_2d
    from mpcl.training.config import config_from_dict
    from mpcl.training.data.loading import load_data
    from mpcl.training.losses.dice import ce_dice_loss
    from mpcl.training.trainer import build_network

    config = config_from_dict(tiny_export_config(folder))
    data = load_data(config.data)
    torch.manual_seed(seed)
    images = np.stack([resize_2d(s.image, PATCH, order=1) for s in data.labeled])[:, None]
    labels = np.stack([resize_2d(s.label, PATCH, order=0) for s in data.labeled])
    x, y = torch.from_numpy(images).float(), torch.from_numpy(labels).long()
    model = build_network(config, data.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for _ in range(steps):
        loss = ce_dice_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    projection = torch.nn.ModuleDict({"projection": ProjectionHead(TINY_CHANNELS[1], TINY_CHANNELS[0], 8)})
    metadata = build_metadata(config.to_dict(), data.class_names, data.normalization, "mpcl")
    state = {
        "iteration": steps,
        "student": model.state_dict(),
        "teacher": copy.deepcopy(model).state_dict(),
        "extra": projection.state_dict(),
        "teacher_extra": projection.state_dict(),
        "optimizer": optimizer.state_dict(),
        "method_state": {"bank": torch.randn(4, 2, 8)},
        "best": {"dice": 0.0, "iteration": steps},
        "metadata": metadata,
        "config": config.to_dict(),
    }
    return save_checkpoint(folder / "best.pt", state)
