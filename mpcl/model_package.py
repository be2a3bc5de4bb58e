"""Model packages: a folder holding ``model.json`` plus the network as ONNX and/or a torch checkpoint.

``model.json`` is the contract between training and every runtime. It names the classes (value, colour),
the intensity normalisation and patch size the network was trained with, the in-plane resampling policy,
the optional post-processing, and every network file with its SHA-256, so that a swapped or truncated
file is caught before it silently produces a wrong segmentation. Unknown format versions are refused
rather than guessed at. Reading a package needs neither torch nor onnxruntime.

A model trained on a planned dataset (``mpcl-plan``) also records its planned geometry in ``resampling``
(``slice_axis`` z/y/x, ``in_plane: target_spacing`` with ``target_spacing_mm``, ``crop: nonzero``; see
``mpcl.planned_geometry``) and may normalise with the ``ct`` scheme's fixed dataset statistics. Packages
without them load and segment exactly as before; a runtime that predates them refuses such a package
(an unknown resampling policy or scheme) rather than segmenting at the wrong scale.

``mpcl-export`` adds optional files within format version 1 (older packages stay valid): int8 and fp16
ONNX variants (roles ``onnx_int8``, ``onnx_fp16``) and a TensorRT engine whose entry records the GPU name
and TensorRT version it was built for; each entry also records the check it passed (parity, Dice).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpcl.errors import InputError, ModelPackageError
from mpcl.io import write_atomically
from mpcl.planned_geometry import SLICING_AXES, PlannedGeometry
from mpcl.preprocessing import ALL_SCHEMES, CT_PARAMETERS, ct_statistics_problem

PACKAGE_FORMAT = "mpcl-model-package"
PACKAGE_VERSION = 1
MODEL_JSON = "model.json"
FILE_ROLES = ("onnx", "onnx_int8", "onnx_fp16", "torch", "tensorrt")
# Which ONNX file holds each precision: fp32 is the reference graph, the others are derived from it by
# ``mpcl-export`` and kept only when they pass its parity / Dice checks (recorded in their entries).
ONNX_ROLES = {"fp32": "onnx", "int8": "onnx_int8", "fp16": "onnx_fp16"}
# What a TensorRT entry must record: an engine only runs on the GPU model and TensorRT version it was
# built with, so the backend compares these before deserialising anything.
TENSORRT_REQUIRED_INFO = ("gpu_name", "tensorrt_version")

# The default in-plane policy, run by mpcl.inference for training evaluation and the Segmenter alike:
# slices along the coarsest-spaced axis, each resized (corner-aligned bilinear) to the patch,
# probabilities resized back before the argmax.
RESAMPLING_POLICY: dict[str, Any] = {
    "slice_axis": "coarsest_spacing",
    "in_plane": "resize_to_patch",
    "image_interpolation": "linear",
    "probability_interpolation": "linear",
    "align_corners": True,
}
# The SSL4MIS/BCP test scripts' policy (``evaluation.resize: nearest``): scipy's order-0 zoom of each
# slice to the patch and of the predicted labels back (mpcl.preprocessing.zoom_nearest).
NEAREST_RESAMPLING_POLICY: dict[str, Any] = {
    **RESAMPLING_POLICY,
    "image_interpolation": "nearest_zoom",
    "probability_interpolation": "nearest_zoom",
}
RESAMPLING_POLICIES: dict[str, dict[str, Any]] = {
    "linear": RESAMPLING_POLICY,
    "nearest": NEAREST_RESAMPLING_POLICY,
}
# Keys of ``resampling`` that a planned geometry adds or changes (PlannedGeometry.resampling_entries).
PLANNED_RESAMPLING_KEYS = ("slice_axis", "in_plane", "target_spacing_mm", "crop")

# 3D Slicer's generic anatomy colours, so segments look familiar there; background is black.
DEFAULT_COLORS: tuple[tuple[int, int, int], ...] = (
    (128, 174, 128),
    (241, 214, 145),
    (177, 122, 101),
    (111, 184, 210),
    (216, 101, 79),
    (221, 130, 101),
    (144, 238, 144),
    (192, 104, 88),
    (220, 245, 20),
    (78, 63, 0),
    (255, 250, 220),
    (230, 220, 70),
    (200, 200, 235),
    (250, 250, 210),
    (244, 214, 49),
    (0, 151, 206),
    (216, 101, 79),
    (183, 156, 220),
    (183, 214, 211),
    (152, 189, 207),
)


@dataclass(frozen=True)
class ClassLabel:
    """One output class: its name, the voxel value written for it, and its display colour (0-255 RGB)."""

    name: str
    value: int
    color: tuple[int, int, int]


@dataclass(frozen=True)
class PackageFile:
    """A network file of the package, with the checksum recorded when it was written.

    ``external`` holds the files an ONNX graph keeps its weights in (ONNX external data), each hashed
    too: a package is trusted only as a whole.
    """

    role: str
    path: Path
    sha256: str
    info: dict[str, Any] = field(default_factory=dict)
    external: dict[Path, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Postprocessing:
    """Class values whose mask keeps only its largest 3D component / gets its in-slice holes filled."""

    largest_component: tuple[int, ...] = ()
    fill_holes: tuple[int, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.largest_component or self.fill_holes)


@dataclass(frozen=True)
class ModelPackage:
    """A validated model package; construct it with :func:`load_model_package`."""

    root: Path
    classes: tuple[ClassLabel, ...]
    in_channels: int
    normalization: dict[str, Any]
    patch_size: tuple[int, int]
    resampling: dict[str, Any]
    postprocessing: Postprocessing
    method: str
    network: dict[str, Any]
    files: dict[str, PackageFile]
    mpcl_version: str
    name: str = ""
    planned: PlannedGeometry = field(default_factory=PlannedGeometry)  # unplanned unless model.json says

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def resize(self) -> str:
        """``linear`` or ``nearest``: the key of :data:`RESAMPLING_POLICIES` this package uses."""
        return _policy_key(self.resampling)

    @property
    def class_names(self) -> list[str]:
        return [label.name for label in self.classes]

    @property
    def labels(self) -> dict[str, ClassLabel]:
        """Class name -> ClassLabel (name, value, colour), in value order."""
        return {label.name: label for label in self.classes}

    @property
    def normalization_scheme(self) -> str:
        return str(self.normalization["scheme"])

    @property
    def normalization_params(self) -> dict[str, Any]:
        return {key: value for key, value in self.normalization.items() if key != "scheme"}

    def has(self, role: str) -> bool:
        return role in self.files

    def path_of(self, role: str, verify: bool = True) -> Path:
        """Path of the file with this role, checked to exist and (``verify``) to match its checksum."""
        if role not in self.files:
            raise ModelPackageError(f"{self.root / MODEL_JSON}: the package has no {role} file")
        entry = self.files[role]
        for path, expected in ((entry.path, entry.sha256), *entry.external.items()):
            if not path.is_file():
                raise ModelPackageError(
                    f"{self.root / MODEL_JSON}: lists {path.name} (part of its {role} file) but it is missing"
                )
            if verify and sha256_of(path) != expected:
                raise _mismatch(path)
        return entry.path

    def read_verified(self, role: str) -> bytes:
        """The bytes of the file with this role, checked against its SHA-256 (and its external data
        files): what is checked is exactly what is loaded, with no window to swap the file in between."""
        path = self.path_of(role, verify=False)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.files[role].sha256:
            raise _mismatch(path)
        self.path_of(role)  # the external data files
        return data


def _mismatch(path: Path) -> ModelPackageError:
    return ModelPackageError(
        f"{path}: does not match the SHA-256 recorded in {MODEL_JSON} "
        "(the file was replaced or corrupted; re-export the package)"
    )


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_color(value: int) -> tuple[int, int, int]:
    return (0, 0, 0) if value == 0 else DEFAULT_COLORS[(value - 1) % len(DEFAULT_COLORS)]


def build_model_json(
    metadata: Mapping[str, Any],
    files: Mapping[str, Mapping[str, Any]],
    *,
    name: str = "",
    colors: Mapping[str, tuple[int, int, int]] | None = None,
    postprocessing: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """model.json content from checkpoint metadata (``mpcl.nn.checkpoint.build_metadata``).

    ``files`` maps a role (``FILE_ROLES``) to ``{"path": relative name, "sha256": ..., ...}``;
    ``postprocessing`` is ``{"largest_component": [class names] or true, "fill_holes": [...] or true}``.
    """
    colors = dict(colors or {})
    class_names = list(metadata["class_names"])
    return {
        "format": PACKAGE_FORMAT,
        "format_version": PACKAGE_VERSION,
        "name": name,
        "mpcl_version": str(metadata.get("mpcl_version", "")),
        "method": str(metadata.get("method", "")),
        "classes": [
            {"name": class_name, "value": value, "color": list(colors.get(class_name, default_color(value)))}
            for value, class_name in enumerate(class_names)
        ],
        "in_channels": int(metadata.get("in_channels", 1)),
        "normalization": dict(metadata["normalization"]),
        "patch_size": [int(v) for v in metadata["patch_size"]],
        "resampling": {
            **RESAMPLING_POLICIES[str(metadata.get("resize", "linear"))],
            **PlannedGeometry.from_dict(metadata.get("planned_geometry")).resampling_entries(),
        },
        "postprocessing": dict(postprocessing or {"largest_component": [], "fill_holes": []}),
        "network": dict(metadata.get("network", {})),
        "files": {role: dict(entry) for role, entry in files.items()},
    }


def _fail(where: Path, message: str) -> ModelPackageError:
    return ModelPackageError(f"{where}: {message}")


MAX_PATCH_SIDE = 4096  # a larger network input is a typo or tampering, not a model (4096² fp32 = 64 MiB)


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _package_path(where: Path, root: Path, key: str, name: Any) -> Path:
    """A file named by model.json: relative, inside the package, and present."""
    if not isinstance(name, str) or not name:
        raise _fail(where, f"{key} must be a file name inside the package, got {name!r}")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise _fail(where, f"{key} must be a name inside the package, got {name!r}")
    path = root / relative
    if not path.is_file():
        raise _fail(where, f"{key} names {name} but {path} is missing")
    return path


def _check_number(where: Path, key: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _fail(where, f"{key} must be a number from {low} to {high}, got {value!r}")
    return float(value)


MAX_INTENSITY = 1e7  # a CT statistic beyond this is a unit mix-up or tampering, not Hounsfield units


def _check_normalization(where: Path, normalization: Any) -> None:
    if not isinstance(normalization, dict) or normalization.get("scheme") not in ALL_SCHEMES:
        raise _fail(where, f"normalization.scheme must be one of {list(ALL_SCHEMES)}, got {normalization!r}")
    if normalization["scheme"] == "percentile":
        lower = _check_number(where, "normalization.lower", normalization.get("lower", 0.5), 0, 100)
        upper = _check_number(where, "normalization.upper", normalization.get("upper", 99.5), 0, 100)
        if lower >= upper:
            raise _fail(where, f"normalization.lower ({lower}) must be below normalization.upper ({upper})")
    allowed = {"scheme", "lower", "upper"}
    if normalization["scheme"] == "ct":
        allowed = {"scheme", *CT_PARAMETERS}
        missing = [key for key in CT_PARAMETERS if key not in normalization]
        if missing:
            raise _fail(where, f"the ct normalization needs {list(CT_PARAMETERS)}; missing {missing}")
        statistics = (
            _check_number(where, f"normalization.{key}", normalization[key], -MAX_INTENSITY, MAX_INTENSITY)
            for key in CT_PARAMETERS
        )
        problem = ct_statistics_problem(*statistics)
        if problem:
            raise _fail(where, f"the ct normalization {problem}")
    unknown = set(normalization) - allowed
    if unknown:
        raise _fail(where, f"normalization holds unknown key(s) {sorted(unknown)}")


def _policy_key(resampling: dict[str, Any]) -> str:
    """The interpolation policy (key of RESAMPLING_POLICIES) of a resampling entry, planned keys aside."""
    base = {key: value for key, value in resampling.items() if key not in PLANNED_RESAMPLING_KEYS}
    base.update(slice_axis=RESAMPLING_POLICY["slice_axis"], in_plane=RESAMPLING_POLICY["in_plane"])
    return next(key for key, policy in RESAMPLING_POLICIES.items() if policy == base)


def _parse_resampling(where: Path, raw: Any) -> tuple[dict[str, Any], PlannedGeometry]:
    """model.json's ``resampling``: one of RESAMPLING_POLICIES, optionally with a planned geometry."""
    if not isinstance(raw, dict):
        raise _fail(where, f"resampling must be an object, got {raw!r}")
    resampling = {**RESAMPLING_POLICY, **raw}

    def refuse(reason: str) -> ModelPackageError:
        return _fail(
            where,
            f"resampling policy {raw!r} is not supported ({reason}); this runtime implements "
            f"{list(RESAMPLING_POLICIES.values())}, optionally with slice_axis {list(SLICING_AXES[1:])}, "
            "in_plane 'target_spacing' with target_spacing_mm, and crop 'nonzero'",
        )

    axis = resampling["slice_axis"]
    if axis != "coarsest_spacing" and axis not in SLICING_AXES[1:]:
        raise refuse(f"slice_axis {axis!r}")
    target = None
    if resampling["in_plane"] == "target_spacing":
        target = resampling.get("target_spacing_mm")
    elif resampling["in_plane"] != "resize_to_patch" or "target_spacing_mm" in resampling:
        raise refuse(f"in_plane {resampling['in_plane']!r}")
    crop = resampling.get("crop", "none")
    if crop not in ("none", "nonzero"):
        raise refuse(f"crop {crop!r}")
    try:
        planned = PlannedGeometry("auto" if axis == "coarsest_spacing" else axis, target, crop == "nonzero")
        if resampling["in_plane"] == "target_spacing" and target is None:
            raise InputError("in_plane 'target_spacing' without target_spacing_mm")
        key = _policy_key(resampling)
    except InputError as error:
        raise refuse(str(error)) from None
    except StopIteration:
        raise refuse("unknown interpolation") from None
    return {**RESAMPLING_POLICIES[key], **planned.resampling_entries()}, planned


def _class_values(where: Path, key: str, spec: Any, classes: tuple[ClassLabel, ...]) -> tuple[int, ...]:
    foreground = [label for label in classes if label.value != 0]
    if spec is True:
        return tuple(label.value for label in foreground)
    if spec in (False, None):
        return ()
    if not isinstance(spec, list):
        raise _fail(where, f"postprocessing.{key} must be true, false or a list of class names")
    by_name = {label.name: label.value for label in classes}
    unknown = [item for item in spec if item not in by_name]
    if unknown:
        raise _fail(
            where, f"postprocessing.{key} names unknown class(es) {unknown}; classes are {list(by_name)}"
        )
    return tuple(sorted({by_name[item] for item in spec} - {0}))


def parse_model_json(data: Any, root: Path) -> ModelPackage:
    """Validate model.json content (already parsed) and resolve its files relative to ``root``."""
    where = root / MODEL_JSON
    if not isinstance(data, dict) or data.get("format") != PACKAGE_FORMAT:
        raise _fail(where, f'not an MPCL model package (no "format": "{PACKAGE_FORMAT}")')
    version = data.get("format_version")
    if version != PACKAGE_VERSION:
        from mpcl import __version__

        raise _fail(
            where,
            f"model package format version {version!r} is not supported by mpcl {__version__}, which reads "
            f"version {PACKAGE_VERSION} (update mpcl, or re-export the model with this version)",
        )
    required = ("classes", "normalization", "patch_size", "files")
    missing = [key for key in required if key not in data]
    if missing:
        raise _fail(where, f"missing key(s) {missing}")

    raw_classes = data["classes"]
    if not isinstance(raw_classes, list) or not 2 <= len(raw_classes) <= 256:
        raise _fail(where, "'classes' must list 2 to 256 classes (background first)")
    classes = []
    for index, entry in enumerate(raw_classes):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise _fail(where, f"classes[{index}] must be an object with a non-empty 'name'")
        if not entry["name"].isprintable():
            raise _fail(where, f"classes[{index}].name {entry['name']!r} holds control characters")
        if entry.get("value", index) != index:
            raise _fail(where, f"classes[{index}] has value {entry.get('value')!r}; expected {index}")
        color = entry.get("color", default_color(index))
        if (
            not isinstance(color, list | tuple)
            or len(color) != 3
            or not all(isinstance(c, int) and 0 <= c <= 255 for c in color)
        ):
            raise _fail(where, f"classes[{index}].color must be three integers 0-255, got {color!r}")
        classes.append(ClassLabel(entry["name"], index, (int(color[0]), int(color[1]), int(color[2]))))
    names = [label.name for label in classes]
    if len(set(names)) != len(names):
        raise _fail(where, f"class names must be unique, got {names}")

    normalization = data["normalization"]
    _check_normalization(where, normalization)
    patch = data["patch_size"]
    if not (
        isinstance(patch, list)
        and len(patch) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_PATCH_SIDE for v in patch)
    ):
        raise _fail(where, f"patch_size must be two integers from 1 to {MAX_PATCH_SIDE}, got {patch!r}")
    in_channels = data.get("in_channels", 1)
    if in_channels != 1:
        raise _fail(where, f"in_channels {in_channels!r} is not supported (single-channel images only)")
    resampling, planned = _parse_resampling(where, data.get("resampling", {}))
    raw_post = data.get("postprocessing") or {}
    if not isinstance(raw_post, dict) or set(raw_post) - {"largest_component", "fill_holes"}:
        raise _fail(where, "postprocessing may only hold 'largest_component' and 'fill_holes'")
    class_tuple = tuple(classes)
    postprocessing = Postprocessing(
        _class_values(where, "largest_component", raw_post.get("largest_component"), class_tuple),
        _class_values(where, "fill_holes", raw_post.get("fill_holes"), class_tuple),
    )

    raw_files = data["files"]
    if not isinstance(raw_files, dict) or not raw_files:
        raise _fail(where, "'files' must name at least one network file (onnx or torch)")
    files = {}
    for role, entry in raw_files.items():
        if role not in FILE_ROLES:
            raise _fail(where, f"unknown file role {role!r}; expected one of {list(FILE_ROLES)}")
        if not isinstance(entry, dict):
            raise _fail(where, f"files.{role} must be an object with a 'path' and a 'sha256'")
        path = _package_path(where, root, f"files.{role}.path", entry.get("path"))
        if not _is_sha256(entry.get("sha256")):
            raise _fail(
                where,
                f"files.{role}.sha256 must be the file's SHA-256 (64 hex digits); every file is checked",
            )
        raw_external = entry.get("external_data", {})
        if not isinstance(raw_external, dict) or not all(_is_sha256(v) for v in raw_external.values()):
            raise _fail(where, f"files.{role}.external_data must map file names to their SHA-256")
        external = {
            _package_path(where, root, f"files.{role}.external_data", name): digest
            for name, digest in raw_external.items()
        }
        info = {key: value for key, value in entry.items() if key not in ("path", "sha256", "external_data")}
        files[role] = PackageFile(role, path, entry["sha256"], info, external)
    if not ({"onnx", "torch"} & set(files)):
        raise _fail(where, "the package holds no onnx or torch network file")
    if ({"onnx_int8", "onnx_fp16"} & set(files)) and "onnx" not in files:
        raise _fail(where, "an int8/fp16 ONNX file is listed without the fp32 ONNX file it was derived from")

    return ModelPackage(
        root=root,
        classes=class_tuple,
        in_channels=1,
        normalization=dict(normalization),
        patch_size=(patch[0], patch[1]),
        resampling=resampling,
        postprocessing=postprocessing,
        method=str(data.get("method", "")),
        network=dict(data.get("network", {})),
        files=files,
        mpcl_version=str(data.get("mpcl_version", "")),
        name=str(data.get("name", "")),
        planned=planned,
    )


def read_model_json(root: str | os.PathLike) -> dict[str, Any]:
    """The raw model.json of a package folder (or of the model.json path itself)."""
    root = Path(root)
    where = root if root.name == MODEL_JSON else root / MODEL_JSON
    if not where.parent.is_dir():
        raise ModelPackageError(f"{where.parent}: model package folder does not exist")
    if not where.is_file():
        raise ModelPackageError(f"{where.parent}: not a model package (no {MODEL_JSON} in it)")
    try:
        return json.loads(where.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelPackageError(f"{where}: not valid JSON ({error})") from None


def load_model_package(path: str | os.PathLike) -> ModelPackage:
    """Read and validate a model package folder (or its model.json); refuses unknown versions."""
    path = Path(path)
    root = path.parent if path.name == MODEL_JSON else path
    return parse_model_json(read_model_json(root), root)


def write_model_json(root: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    """Validate and write model.json atomically (a reader never sees half a file)."""
    root = Path(root)
    parse_model_json(json.loads(json.dumps(data)), root)
    text = json.dumps(data, indent=2) + "\n"
    return write_atomically(root / MODEL_JSON, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def register_file(root: str | os.PathLike, role: str, filename: str, **info: Any) -> ModelPackage:
    """Add (or replace) a network file already copied into the package, recording its SHA-256.

    This is how ``mpcl-export`` adds ONNX variants or TensorRT engines to a package after training.
    """
    root = Path(root)
    data = read_model_json(root)
    entry = {"path": filename, "sha256": sha256_of(root / filename), **info}
    data.setdefault("files", {})[role] = entry
    write_model_json(root, data)
    return load_model_package(root)
