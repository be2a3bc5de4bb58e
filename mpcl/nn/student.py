"""The deployment student: the network a model package ships, with everything training-only removed.

A training checkpoint holds the student U-Net next to parts that only training uses: the EMA teacher,
projection heads (``extra``), prototype banks (``method_state``), the optimiser and, with deep
supervision, auxiliary decoder heads inside the U-Net; a co-training method keeps its second branch in
the same place. Deployment keeps the student's segmentation path only and folds every batch-norm into
the convolution before it (:func:`mpcl.nn.folding.fold_batch_norm`).

A folded network is recorded as ``network.batch_norm: folded`` in model.json / checkpoint metadata, so
:func:`mpcl.nn.spec.build_network_from_spec` rebuilds the same structure (BN replaced by identities) to
load it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mpcl.errors import InputError
from mpcl.nn.spec import build_network_from_spec
from mpcl.nn.unet import UNet

TRAINING_ONLY_PREFIXES = ("deep_heads.",)  # auxiliary decoder heads: used by deep-supervision losses only


def stripped_student(state: Mapping[str, Any]) -> tuple[UNet, dict[str, Any]]:
    """The checkpoint's student with training-only parts removed (eval mode, BN not yet folded).

    Only ``state["student"]`` is read (teacher, projection heads, banks, optimiser and any second branch
    are left behind); deep-supervision heads are dropped because ``forward`` never uses them.
    Returns the network and its spec.
    """
    metadata = state["metadata"]
    spec = {**dict(metadata.get("network", {})), "deep_supervision": False}
    weights = {
        key: value for key, value in state["student"].items() if not key.startswith(TRAINING_ONLY_PREFIXES)
    }
    model = build_network_from_spec(spec, int(metadata.get("in_channels", 1)), int(metadata["num_classes"]))
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise InputError(f"the checkpoint's student weights do not fit its network spec ({first})") from None
    return model.eval(), spec
