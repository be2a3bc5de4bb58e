"""One entry point from a data config to a SegmentationData, whatever the source."""

from __future__ import annotations

from mpcl.errors import InputError
from mpcl.training.config_schema import DataConfig
from mpcl.training.data.base import SegmentationData


def load_data(config: DataConfig) -> SegmentationData:
    if config.kind == "acdc":
        from mpcl.training.data.acdc import load_acdc

        data = load_acdc(config)
    elif config.kind == "nifti_folder":
        from mpcl.training.data.nifti_folder import load_nifti_folder

        data = load_nifti_folder(config)
    else:
        from mpcl.training.data.phantom import PhantomSpec, make_phantom_data

        phantom = config.phantom
        spec = PhantomSpec(size=tuple(phantom.size), slices_per_volume=phantom.slices_per_volume)
        data = make_phantom_data(
            seed=phantom.seed,
            n_labeled=phantom.n_labeled,
            n_unlabeled=phantom.n_unlabeled,
            n_val=phantom.n_val,
            n_test=phantom.n_test,
            spec=spec,
        )
    if config.class_names is not None and len(config.class_names) != data.num_classes:
        raise InputError(
            f"data.class_names lists {len(config.class_names)} classes, the data has {data.num_classes}"
        )
    if not data.val_volumes:
        raise InputError(f"{config.root or config.kind}: no validation volumes found")
    return data
