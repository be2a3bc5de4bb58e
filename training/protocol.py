"""Training/evaluation protocols: which published code path a run reproduces, and where it deviates.

``protocol: published`` (the default of every key below) is the code path of the SSL4MIS and BCP ACDC
scripts: bilinear-upsampling U-Net, their augmentation (rot90+flip, or an integer rotation in [-20, 20)
degrees, or nothing; then a nearest-neighbour zoom to the patch), BCP's region-wise ``mix_loss``, stage
switch from the best pre-training checkpoint, 8-connected largest components, one forward pass per mixed
half, the consistency ramp in 150-iteration steps, nearest-neighbour resizing at test time and BCP's
"empty prediction scores 0" metric convention.

``protocol: legacy`` is this project's earlier choices (transposed-convolution decoder, one affine
bilinear resampling with random scaling, pixel-weighted loss, teacher reset to the last pre-training
step, 4-connectivity, joint forward passes, a ramp moved every iteration, bilinear test resizing, HD95
undefined for empty predictions). A preset only fills keys the config leaves out, so each choice is also
a named option on its own; a run records every key whose value differs from the published one as a
deviation.
"""

from __future__ import annotations

from typing import Any

# dotted config key -> (value under the published protocol, value under the legacy one)
SETTINGS: dict[str, tuple[Any, Any]] = {
    "model.upsampling": ("bilinear", "transposed"),
    "augment.policy": ("published", "affine"),
    "evaluation.resize": ("nearest", "linear"),
    "evaluation.empty_prediction": ("zero", "undefined"),
}
# keys of the copy-paste base, relative to where the method keeps them (bcp: params, others: params.base)
COPY_PASTE_SETTINGS: dict[str, tuple[Any, Any]] = {
    "loss": ("published", "pixel_weighted"),
    "stage_switch": ("best", "last"),
    "connectivity": (8, 4),
    "forward_passes": ("separate", "joint"),
}
# keys of the Mean Teacher base, relative to where the method keeps them
MEAN_TEACHER_SETTINGS: dict[str, tuple[Any, Any]] = {"rampup_step": (150, 1)}
PROTOCOLS = ("published", "legacy")


def copy_paste_prefix(method: dict) -> str | None:
    """Where a method config keeps the copy-paste base's keys, or None if it has no copy-paste base."""
    name = method.get("name")
    params = method.get("params") or {}
    if name == "bcp":
        return "method.params"
    if name in ("mpcl", "pccs", "barl") and (params.get("base") or {}).get("mix") == "bcp":
        return "method.params.base"
    return None


def _get(data: dict, dotted: str) -> Any:
    node: Any = data
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _setdefault(data: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
        if node is None:
            return
    node.setdefault(leaf, value)


def mean_teacher_prefix(method: dict) -> str | None:
    """Where a method config keeps the Mean Teacher base's keys, or None if it has no such base."""
    params = method.get("params") or {}
    if method.get("name") == "mean_teacher":
        return "method.params"
    if method.get("name") == "mpcl" and (params.get("base") or {}).get("mix", "none") == "none":
        return "method.params.base"
    return None


def presets(data: dict) -> dict[str, Any]:
    """The protocol's value for every key it governs in this config (dotted key -> value)."""
    column = 1 if data.get("protocol") == "legacy" else 0
    method = data.get("method") or {}
    values = {key: pair[column] for key, pair in SETTINGS.items()}
    for prefix, settings in (
        (copy_paste_prefix(method), COPY_PASTE_SETTINGS),
        (mean_teacher_prefix(method), MEAN_TEACHER_SETTINGS),
    ):
        if prefix is not None:
            values.update({f"{prefix}.{key}": pair[column] for key, pair in settings.items()})
    return values


def apply_protocol(data: dict) -> dict:
    """Fill the keys a raw config leaves out with its protocol's values (mutates and returns ``data``)."""
    for dotted, value in presets(data).items():
        _setdefault(data, dotted, value)
    return data


def describe_protocol(config: dict) -> dict[str, Any]:
    """``{"name", "deviations"}`` of a validated config (as ``ExperimentConfig.to_dict()``): deviations
    are the governed keys whose value differs from the published code path, as ``key=value``."""
    published = presets({**config, "protocol": "published"})
    deviations = [
        f"{key}={_get(config, key)}" for key, value in published.items() if _get(config, key) != value
    ]
    return {"name": config.get("protocol", "published"), "deviations": deviations}
