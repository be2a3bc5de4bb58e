"""``mpcl-plan DATASET``: fingerprint a dataset in the nnU-Net v2 raw layout and plan training from it.

    mpcl-plan my_dataset --verify                      check it; exit 1 on any defect
    mpcl-plan my_dataset --config-out my_dataset.yaml  plans.json next to the data, plus a config
    mpcl-plan example_dataset --write-example          a small raw dataset to try the two steps on

Errors the user can fix are one sentence with exit code 2 (as mpcl-train); ``--verify`` prints one line
per problem and exits 1 when there is a defect.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from mpcl.cli_common import (
    CONTEXT_SETTINGS,
    friendly_errors,
    no_progress_option,
    version_option,
)
from mpcl.errors import InputError
from mpcl.io import check_writable_file, write_atomically

PRESET_NAMES = ("cpu", "gpu")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)


def _write_text(path: Path, text: str) -> Path:
    return write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _plans_path(dataset: Path, output: Path | None) -> Path:
    if output is None:
        return dataset / "plans.json"
    if output.is_dir() or output.suffix.lower() != ".json":
        return output / "plans.json"
    return output


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option(
    "--verify", is_flag=True, help="Only check the dataset: one line per problem, exit 1 on a defect."
)
@click.option(
    "--preset",
    type=click.Choice(PRESET_NAMES),
    default="cpu",
    show_default=True,
    help="Compute budget: patch side at most 256 (cpu) or 512 (gpu); batches and iterations follow.",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    help="Where plans.json goes: a .json file or a folder (default: the dataset folder).",
)
@click.option(
    "--config-out",
    type=click.Path(path_type=Path),
    help="Also write a ready-to-run mpcl-train YAML config with the planned values.",
)
@click.option(
    "--base-config",
    type=click.Path(path_type=Path),
    help="Config whose model, method and other keys the written config keeps (its data: is replaced).",
)
@click.option(
    "--method",
    help="Method of the written config (default: the base config's; else mean_teacher when there are "
    "unlabelled images, supervised when there are none).",
)
@click.option(
    "--labeled-cases",
    type=int,
    help="Written config: use only the first N training cases as labelled, the rest as unlabelled.",
)
@click.option(
    "--write-example",
    is_flag=True,
    help="Write a small example dataset into DATASET (a new folder) and stop: the cardiac phantom as an "
    "nnU-Net raw dataset at mixed in-plane spacings and fields of view, with a test set.",
)
@no_progress_option("Hide the progress bar.")
@version_option()
@friendly_errors
def plan_main(
    dataset,
    verify,
    preset,
    output,
    config_out,
    base_config,
    method,
    labeled_cases,
    write_example,
    no_progress,
) -> None:
    """Fingerprint DATASET (imagesTr/, labelsTr/, dataset.json) and plan training from it."""
    _setup_logging()
    if write_example:
        from mpcl.training.data.phantom_raw import write_phantom_raw_dataset

        write_phantom_raw_dataset(dataset)
        click.echo(f"Wrote an example dataset to {dataset}; next: mpcl-plan {dataset} --verify")
        return
    if not dataset.is_dir():
        raise InputError(f"{dataset}: dataset folder does not exist")
    if verify:
        from mpcl.training.dataset_verify import report_lines, verify_dataset

        report = verify_dataset(dataset, progress=not no_progress)
        for line in report_lines(report):
            click.echo(line)
        sys.exit(1 if report.defects else 0)

    from mpcl.training.config import config_from_dict, read_yaml
    from mpcl.training.dataset_fingerprint import dataset_fingerprint
    from mpcl.training.dataset_plan import (
        config_from_plan,
        config_header,
        make_plan,
        plans_document,
        summary_lines,
    )

    plans_path = check_writable_file(_plans_path(dataset, output))
    base = None
    if base_config is not None:
        base = read_yaml(base_config)
    if config_out is not None:
        check_writable_file(config_out)
    fingerprint = dataset_fingerprint(dataset, progress=not no_progress)
    plan = make_plan(fingerprint, preset)
    config_text = None
    if config_out is not None:
        import yaml

        config = config_from_plan(plan, dataset, method, base, labeled_cases)
        config_from_dict(config, str(config_out))  # refuse to write a config mpcl-train rejects

        class _Dumper(yaml.SafeDumper):  # block mappings, lists on one line ([256, 256])
            pass

        _Dumper.add_representer(
            list,
            lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True),
        )
        config_text = config_header(plan, dataset, plans_path) + yaml.dump(
            config, Dumper=_Dumper, sort_keys=False, default_flow_style=False
        )
    document = plans_document(fingerprint, plan)
    _write_text(plans_path, json.dumps(document, indent=2) + "\n")
    for line in summary_lines(fingerprint, plan):
        click.echo(line)
    click.echo(f"Wrote {plans_path}")
    if config_text is not None:
        _write_text(config_out, config_text)
        click.echo(f"Wrote {config_out}; train with: mpcl-train --config {config_out}")
    else:
        click.echo("Add --config-out FILE.yaml for a ready-to-run mpcl-train config.")


if __name__ == "__main__":
    plan_main()
