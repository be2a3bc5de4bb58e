"""Method registry: ``method.name`` in a config picks one of these."""

from __future__ import annotations

from mpcl.errors import ConfigError
from mpcl.training.config_schema import MethodConfig, dataclass_from_dict
from mpcl.training.methods.barl import BARL
from mpcl.training.methods.base import Method, Models, StepInfo, TeacherUpdate
from mpcl.training.methods.bcp import BCP
from mpcl.training.methods.distill import Distill
from mpcl.training.methods.mean_teacher import MeanTeacher
from mpcl.training.methods.mpcl import MPCL
from mpcl.training.methods.pccs import PCCS
from mpcl.training.methods.supervised import Supervised

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Supervised, MeanTeacher, BCP, MPCL, BARL, PCCS, Distill)
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"method.name {name!r} is not a known method; choose one of {sorted(METHODS)}")
    return METHODS[name]


def method_params_from_config(config: MethodConfig):
    """Validate ``method.params`` against the chosen method's parameter dataclass."""
    return dataclass_from_dict(method_class(config.name).Params, config.params, "method.params")


def build_method(config: MethodConfig, num_classes: int) -> Method:
    return method_class(config.name)(method_params_from_config(config), num_classes)


__all__ = [
    "METHODS",
    "Method",
    "Models",
    "StepInfo",
    "TeacherUpdate",
    "build_method",
    "method_class",
    "method_params_from_config",
]
