"""mpcl-train / mpcl-eval as a user runs them, including the one-sentence errors."""

import json
import shutil

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from mpcl.cli_segment import segment_main
from mpcl.training.cli import eval_main, train_main
from tests.conftest import write_tiny_config


def test_train_then_eval_then_resume(tmp_path):
    runner = CliRunner()
    config = write_tiny_config(tmp_path)
    result = runner.invoke(train_main, ["--config", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "best checkpoint:" in result.output
    run = tmp_path / "run"
    assert "validation mean Dice" in (run / "train.log").read_text()

    metrics = tmp_path / "metrics.json"
    predictions = tmp_path / "predictions"
    images = tmp_path / "images"
    result = runner.invoke(
        eval_main,
        [
            "--checkpoint",
            str(run / "best.pt"),
            "--output",
            str(metrics),
            "--save-predictions",
            str(predictions),
            "--save-images",
            str(images),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Dice" in result.output and "mean" in result.output
    report = json.loads(metrics.read_text())
    assert report["split"] == "test" and len(report["cases"]) == 1
    assert len(list(predictions.glob("*.nii.gz"))) == 1

    # The model package written at the end of training scores the same through mpcl-eval --model (it
    # holds best.pt's network with batch norm folded), on the data the experiment YAML names.
    package_metrics = tmp_path / "package_metrics.json"
    args = ["--model", str(run / "model"), "--config", str(config), "--output", str(package_metrics)]
    result = runner.invoke(eval_main, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "model package" in result.output
    package_report = json.loads(package_metrics.read_text())
    assert package_report["backend"]
    mean = lambda r: r["summary"]["mean"]["dice"]["mean"]  # noqa: E731
    assert mean(package_report) == pytest.approx(mean(report), abs=1e-3)
    renamed = tmp_path / "renamed_model"
    shutil.copytree(run / "model", renamed)
    model_json = json.loads((renamed / "model.json").read_text())
    model_json["classes"][1]["name"] = "something else"
    (renamed / "model.json").write_text(json.dumps(model_json))
    result = runner.invoke(eval_main, ["--model", str(renamed), "--config", str(config)])
    assert result.exit_code == 2 and "are not the data's" in result.output, result.output

    # The model package written at the end of training segments the saved image file through the CLI,
    # on the image's grid, with the labels mpcl-eval predicted.
    (image_file,) = images.glob("*.nii.gz")
    segmented = tmp_path / "segmented.nii.gz"
    code = segment_main(
        [str(image_file), "-o", str(segmented), "--model", str(run / "model"), "--no-postprocess", "-q"]
    )
    assert code == 0
    source, written = sitk.ReadImage(str(image_file)), sitk.ReadImage(str(segmented))
    assert written.GetSize() == source.GetSize()
    assert written.GetSpacing() == source.GetSpacing() and written.GetOrigin() == source.GetOrigin()
    assert written.GetDirection() == source.GetDirection()
    evaluated = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / image_file.name)))
    assert np.mean(sitk.GetArrayFromImage(written) == evaluated) > 0.999

    result = runner.invoke(train_main, ["--resume", str(run / "latest.pt"), "--no-progress"])
    assert result.exit_code == 0, result.output  # already complete: resumes at 3 of 3 and finishes


@pytest.mark.parametrize(
    "args_or_changes, expected",
    [
        ({"train.iteratons": 3}, "unknown key 'config.train.iteratons' (did you mean 'iterations'?)"),
        (
            {"data.kind": "acdc", "data.root": "/nonexistent/acdc"},
            "/nonexistent/acdc: ACDC data root does not exist",
        ),
    ],
)
def test_train_errors_are_one_sentence(tmp_path, args_or_changes, expected):
    config = write_tiny_config(tmp_path, **args_or_changes)
    result = CliRunner().invoke(train_main, ["--config", str(config), "--no-progress"])
    assert result.exit_code == 2
    assert expected in result.output
    assert "Traceback" not in result.output


def _fake_acdc(root, label_value=1, drop_label=False, missing_slice=False):
    (root / "data" / "slices").mkdir(parents=True)
    names = [f"patient001_frame01_slice_{i}" for i in range(4)]
    for i, name in enumerate(names):
        if missing_slice and i == 3:
            continue
        with h5py.File(root / "data" / "slices" / f"{name}.h5", "w") as handle:
            handle["image"] = np.random.rand(40, 36).astype(np.float32)
            if not (drop_label and i == 0):
                label = np.zeros((40, 36), np.uint8)
                label[10:20, 10:20] = label_value
                handle["label"] = label
    with h5py.File(root / "data" / "patient002_frame01.h5", "w") as handle:
        handle["image"] = np.random.rand(3, 40, 36).astype(np.float32)
        handle["label"] = np.zeros((3, 40, 36), np.uint8)
    (root / "train_slices.list").write_text("\n".join(names) + "\n")
    (root / "val.list").write_text("patient002_frame01\n")
    (root / "test.list").write_text("patient002_frame01\n")


@pytest.mark.parametrize(
    "fake, expected",
    [
        ({"drop_label": True}, "patient001_frame01_slice_0.h5: missing key(s) ['label']"),
        ({"label_value": 7}, "label values [0, 7] outside the class range 0..3"),
        (
            {"missing_slice": True},
            "patient001_frame01_slice_3.h5: file named in the split list does not exist",
        ),
    ],
)
def test_bad_acdc_data_stops_with_the_file_named(tmp_path, fake, expected):
    root = tmp_path / "acdc"
    _fake_acdc(root, **fake)
    config = write_tiny_config(
        tmp_path, **{"data.kind": "acdc", "data.root": str(root), "data.labeled_slices": 4}
    )
    result = CliRunner().invoke(train_main, ["--config", str(config), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert expected in result.output


def test_eval_rejects_a_non_checkpoint(tmp_path):
    junk = tmp_path / "model.pt"
    junk.write_text("hello")
    result = CliRunner().invoke(eval_main, ["--checkpoint", str(junk)])
    assert result.exit_code == 2 and "model.pt: not a loadable MPCL checkpoint" in result.output


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], "give either --checkpoint or --model"),
        (["--checkpoint", "a.pt", "--model", "m"], "give either --checkpoint or --model"),
        (["--model", "m"], "--model needs --config"),
        (["--checkpoint", "a.pt", "--config", "c.yaml"], "--config goes with --model"),
    ],
)
def test_eval_takes_one_source(args, expected):
    result = CliRunner().invoke(eval_main, args)
    assert result.exit_code == 2 and expected in result.output
