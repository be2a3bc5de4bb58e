"""mpcl-plan: the dataset fingerprint and the plan drawn from it, on small datasets written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mpcl.errors import InputError
from mpcl.training.config import load_config
from mpcl.training.dataset_fingerprint import dataset_fingerprint
from mpcl.training.dataset_plan import PRESETS, _batches, choose_slicing_axis, make_plan
from mpcl.training.plan_cli import plan_main
from tests.plan_helpers import (
    I_ALONG_SI,
    Case,
    ct_dataset,
    mr_case,
    mr_dataset,
    train_slim,
    write_dataset,
    write_volume,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mr(tmp_path_factory):
    root, cases = mr_dataset(tmp_path_factory.mktemp("plan") / "Dataset001_MR")
    return root, cases, dataset_fingerprint(root, progress=False)


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    root, cases = ct_dataset(tmp_path_factory.mktemp("plan") / "Dataset002_CT")
    return root, cases, dataset_fingerprint(root, progress=False)


# -- the fingerprint -------------------------------------------------------------------------------


def test_fingerprint_per_case_geometry_and_labels(mr):
    _, cases, fingerprint = mr
    assert fingerprint["cases"] == 4
    assert fingerprint["class_names"] == ["background", "heart", "liver"]
    first = fingerprint["per_case"][0]
    assert first["case"] == "case_000"
    assert first["image"] == "imagesTr/case_000_0000.nii.gz"
    assert first["shape_zyx"] == [6, 40, 50]
    assert first["spacing_xyz"] == pytest.approx([0.8, 0.8, 4.0])
    assert first["spacing_zyx"] == pytest.approx([4.0, 0.8, 0.8])
    assert first["orientation"] == "LPS"
    assert first["coarsest_axes"] == [0] and first["coarsest_axis"] == 0
    assert first["acquisition_plane"] == "axial"
    assert first["label_voxels"] == {"0": 6 * 40 * 50 - 46, "1": 40, "2": 6}
    assert first["label_volumes_mm3"]["1"] == pytest.approx(40 * 0.8 * 0.8 * 4.0)
    assert fingerprint["label_voxels"]["1"] == 160 and fingerprint["cases_with_class"] == {
        "0": 4,
        "1": 4,
        "2": 4,
    }


def test_fingerprint_foreground_intensities_match_numpy(mr):
    _, cases, fingerprint = mr
    image, label = cases[0].image, cases[0].label
    values = image[label > 0].astype(np.float64)
    stats = fingerprint["per_case"][0]["foreground_intensity"]
    assert stats["voxels"] == 46
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-6)
    assert stats["std"] == pytest.approx(values.std(), rel=1e-6)
    low, mid, high = np.percentile(values, [0.5, 50, 99.5])
    assert (stats["percentile_00_5"], stats["percentile_50_0"], stats["percentile_99_5"]) == pytest.approx(
        (low, mid, high), rel=1e-6
    )


def test_fingerprint_crop_box_and_dataset_medians(mr):
    _, _, fingerprint = mr
    cropped = fingerprint["per_case"][2]
    assert cropped["nonzero_box_zyx"] == [[1, 5], [2, 38], [3, 45]]
    assert cropped["cropped_shape_zyx"] == [4, 36, 42]
    assert fingerprint["per_case"][0]["cropped_shape_zyx"] == [6, 40, 50]  # nothing to crop
    assert fingerprint["spacing_median_zyx"] == pytest.approx([4.25, 0.8, 0.8])
    assert fingerprint["coarsest_axis_counts"] == {"z": 4, "y": 0, "x": 0, "tie": 0}
    assert fingerprint["orientation_counts"] == {"LPS": 4}


def test_ct_dataset_statistics_pool_every_foreground_voxel(ct):
    _, cases, fingerprint = ct
    pooled = np.concatenate([c.image[c.label > 0] for c in cases]).astype(np.float64)
    stats = fingerprint["foreground_intensity"]
    assert stats["voxels"] == pooled.size == 3 * 816
    assert stats["mean"] == pytest.approx(pooled.mean(), rel=1e-6)
    assert stats["std"] == pytest.approx(pooled.std(), rel=1e-6)
    assert stats["percentile_00_5"] == pytest.approx(np.percentile(pooled, 0.5), rel=1e-6)
    assert stats["percentile_99_5"] == pytest.approx(np.percentile(pooled, 99.5), rel=1e-6)
    assert stats["max"] == 3000.0


# -- the plan --------------------------------------------------------------------------------------


def test_mr_plan_axis_spacing_patch_normalisation_batches(mr):
    _, _, fingerprint = mr
    plan = make_plan(fingerprint, "cpu")
    slicing = plan["slicing_axis"]
    assert (slicing["axis"], slicing["name"], slicing["tie"]) == (0, "z", None)
    assert slicing["applied_by_training"] and slicing["cases_coarsest_along_it"] == 4
    assert slicing["unplanned_slices_otherwise"] == []
    assert plan["resampling"]["target_spacing_mm"] == pytest.approx([0.8, 0.8])
    assert plan["resampling"]["cases_off_target"] == ["case_003"]
    # median extents at 0.8 mm after cropping: y (40, 44, 36, 40.5) -> 40.25, x (50, 48, 42, 45) -> 46.5
    assert plan["patch_size"]["median_extent_px"] == pytest.approx([40.25, 46.5])
    assert plan["patch_size"]["size"] == [48, 48] and plan["patch_size"]["covers_median_extent"]
    assert plan["cropping"]["cases_cropped"] == 1
    assert plan["normalization"]["scheme"] == "zscore" and plan["normalization"]["applied_by_training"]
    keys = plan["config_keys"]
    assert keys["data.normalization"] == "zscore" and keys["data.patch_size"] == [48, 48]
    # 8 x 128² / 48² = 56.9 -> capped at 16; pixels per step 16 x 48² = 0.56 of the reference -> x2 cap
    assert (keys["train.labeled_batch"], keys["train.unlabeled_batch"], keys["train.iterations"]) == (
        16,
        16,
        3000,
    )
    # every decision has a config key now: training applies them all
    assert (keys["data.slicing_axis"], keys["data.crop_to_nonzero"]) == ("z", True)
    assert keys["data.target_spacing"] == pytest.approx([0.8, 0.8]) and keys["evaluation.resize"] == "linear"
    assert "data.ct_normalization" not in keys
    assert plan["not_applied_by_training"] == []
    for section in ("slicing_axis", "resampling", "cropping", "normalization"):
        assert plan[section]["applied_by_training"], section


def test_ct_plan_clips_to_foreground_percentiles_and_uses_dataset_statistics(ct):
    _, cases, fingerprint = ct
    plan = make_plan(fingerprint, "cpu")
    norm = plan["normalization"]
    pooled = np.concatenate([c.image[c.label > 0] for c in cases]).astype(np.float64)
    assert norm["scheme"] == "ct" and norm["modality"] == "CT"
    assert norm["clip"] == pytest.approx(list(np.percentile(pooled, [0.5, 99.5])), rel=1e-6)
    assert norm["clip"][1] < 3000.0  # the outlier is clipped away
    assert (norm["mean"], norm["std"]) == pytest.approx((pooled.mean(), pooled.std()), rel=1e-6)
    assert norm["applied_by_training"] and plan["not_applied_by_training"] == []
    keys = plan["config_keys"]
    assert keys["data.normalization"] == "ct"
    lower, upper = norm["clip"]
    assert keys["data.ct_normalization"] == {
        "clip_lower": lower,
        "clip_upper": upper,
        "mean": norm["mean"],
        "std": norm["std"],
    }


def _case(name: str, spacing_xyz, direction=None) -> Case:
    case = mr_case(name, (4, 12, 14), spacing_xyz, seed=len(name))
    if direction is not None:
        case.direction = direction
    return case


def test_tie_is_resolved_by_the_most_common_acquisition_plane(tmp_path):
    # median spacing z 2.0 = x 2.0 (a tie); x is the single thick axis in 2 cases, z in 1
    spacings = [(2, 1, 2), (2, 1, 2), (1.5, 1, 2), (2, 1, 1.5), (2, 1, 1.8)]
    root = write_dataset(tmp_path / "tie", [_case(f"c{i}", s) for i, s in enumerate(spacings)])
    slicing = choose_slicing_axis(dataset_fingerprint(root, progress=False))
    assert (slicing["axis"], slicing["name"]) == (2, "x")
    assert slicing["tie"]["axes"] == ["z", "x"]
    assert "most common acquisition plane" in slicing["tie"]["resolved_by"]
    assert "2 of 5" in slicing["tie"]["resolved_by"]
    # unplanned, mpcl-train would slice the tied cases (to z) and c2 (thick z) otherwise: stated, and the
    # planned axis goes into the config, so every case is sliced across x
    assert slicing["unplanned_slices_otherwise"] == ["c0", "c1", "c2"]
    assert slicing["applied_by_training"] and slicing["config_key"] == "data.slicing_axis"


def test_isotropic_tie_goes_to_the_axial_plane_from_the_direction(tmp_path):
    root = write_dataset(tmp_path / "iso", [_case(f"c{i}", (1, 1, 1), I_ALONG_SI) for i in range(3)])
    plan = make_plan(dataset_fingerprint(root, progress=False))
    slicing = plan["slicing_axis"]
    assert slicing["name"] == "x" and slicing["tie"]["axes"] == ["z", "y", "x"]
    assert "axial" in slicing["tie"]["resolved_by"] and slicing["planes"] == {"axial": 3}
    assert plan["config_keys"]["data.slicing_axis"] == "x" and plan["not_applied_by_training"] == []
    identity = write_dataset(tmp_path / "iso_identity", [_case(f"c{i}", (1, 1, 1)) for i in range(3)])
    slicing = choose_slicing_axis(dataset_fingerprint(identity, progress=False))
    assert slicing["name"] == "z" and slicing["tie"] is not None and slicing["applied_by_training"]


def test_patch_is_capped_by_the_preset(tmp_path):
    cases = [mr_case(f"wide_{i}", (2, 300, 24), (1.0, 1.0, 3.0), seed=i) for i in range(2)]
    fingerprint = dataset_fingerprint(write_dataset(tmp_path / "wide", cases), progress=False)
    cpu, gpu = make_plan(fingerprint, "cpu"), make_plan(fingerprint, "gpu")
    assert cpu["patch_size"]["size"] == [256, 32] and not cpu["patch_size"]["covers_median_extent"]
    assert "capped at 256" in cpu["patch_size"]["rule"]
    assert gpu["patch_size"]["size"] == [304, 32] and gpu["patch_size"]["covers_median_extent"]


def test_batches_and_iterations_scale_with_the_patch():
    cpu, gpu = PRESETS["cpu"], PRESETS["gpu"]
    assert _batches((128, 128), cpu)["labeled_batch"] == 8 and _batches((128, 128), cpu)["iterations"] == 1500
    big = _batches((256, 256), cpu)  # 4x the pixels: a quarter of the batch, same work per step
    assert (big["labeled_batch"], big["iterations"]) == (2, 1500)
    # 12 x 256² / 512² = 3 -> 2 (even, rounded down for memory): 2/3 of the pixels per step -> x1.5 steps
    huge = _batches((512, 512), gpu)
    assert (huge["labeled_batch"], huge["unlabeled_batch"], huge["iterations"]) == (2, 2, 45000)
    tiny = _batches((32, 32), cpu)  # batch capped at 16: a 32nd of the work per step, iterations capped x2
    assert (tiny["labeled_batch"], tiny["iterations"]) == (16, 3000)
    assert _batches((256, 256), gpu)["labeled_batch"] == 12


def test_plan_refuses_a_single_case(tmp_path):
    root = write_dataset(tmp_path / "one", [mr_case("only", (3, 10, 10), (1, 1, 3))])
    with pytest.raises(InputError, match="at least 2"):
        make_plan(dataset_fingerprint(root, progress=False))


# -- the command -----------------------------------------------------------------------------------


def test_cli_writes_plans_json_and_a_config_mpcl_train_accepts(mr, tmp_path):
    root, _, _ = mr
    plans = tmp_path / "out" / "plans.json"
    config_path = tmp_path / "mr.yaml"
    result = CliRunner().invoke(
        plan_main, [str(root), "--output", str(plans), "--config-out", str(config_path), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "Slicing axis   z" in result.output and "Applied by training: every planned value" in result.output
    assert "Not applied" not in result.output
    document = json.loads(plans.read_text())
    assert document["format"] == "mpcl-plans" and document["plan"]["patch_size"]["size"] == [48, 48]
    assert len(document["fingerprint"]["per_case"]) == 4
    config = load_config(config_path)
    assert config.data.kind == "nifti_folder" and Path(config.data.root) == root.resolve()
    assert config.data.patch_size == (48, 48) and config.data.normalization == "zscore"
    assert (config.data.slicing_axis, config.data.crop_to_nonzero) == ("z", True)
    assert config.data.target_spacing == pytest.approx((0.8, 0.8))
    assert config.evaluation.resize == "linear"
    assert (config.train.labeled_batch, config.train.iterations) == (16, 3000)
    assert config.method.name == "supervised"  # no unlabelled images: a semi-supervised method would stop
    header = config_path.read_text()
    assert "data.target_spacing: [0.8" in header and "Segmenter apply them" in header
    assert "not applied" not in header
    assert not list(plans.parent.glob(".mpcl-partial-*"))


def test_cli_default_output_is_next_to_the_data_and_keeps_a_base_configs_method(mr, tmp_path):
    root, _, _ = mr
    config_path = tmp_path / "bcp.yaml"
    base = REPO / "configs" / "acdc_bcp_3labeled.yaml"
    arguments = [str(root), "--preset", "gpu", "--base-config", str(base), "--config-out", str(config_path)]
    result = CliRunner().invoke(plan_main, [*arguments, "--no-progress"])
    assert result.exit_code == 2  # bcp needs unlabelled images and every training case is labelled
    assert "method bcp learns from unlabelled images" in result.output and "--labeled-cases" in result.output
    assert not config_path.exists()
    result = CliRunner().invoke(plan_main, [*arguments, "--labeled-cases", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (root / "plans.json").is_file()
    config = load_config(config_path)
    assert config.method.name == "bcp" and config.train.poly_power == 0.0  # kept from the base
    assert config.train.labeled_batch == config.train.unlabeled_batch and config.train.labeled_batch % 2 == 0
    assert config.data.kind == "nifti_folder" and config.data.labeled_patients is None
    assert config.data.labeled_cases == 1


@pytest.mark.slow  # trains two iterations
def test_unlabelled_images_make_the_default_semi_supervised_and_the_config_trains(tmp_path):

    root, cases = mr_dataset(tmp_path / "Dataset003_MR")
    write_volume(cases[0].image, root / "imagesUnlabelled" / "extra_0000.nii.gz", cases[0].spacing)
    config_path = tmp_path / "mt.yaml"
    result = CliRunner().invoke(plan_main, [str(root), "--config-out", str(config_path), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "1 unlabelled image(s)" in result.output
    config = yaml.safe_load(config_path.read_text())
    assert config["method"]["name"] == "mean_teacher"
    # ready to run: two iterations of the written config with a slim network
    result = train_slim(config, config_path, tmp_path / "run", iterations=2)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "best.pt").is_file()


def test_cli_ct_summary_puts_the_dataset_statistics_in_the_config(ct, tmp_path):
    root, _, _ = ct
    result = CliRunner().invoke(plan_main, [str(root), "--output", str(tmp_path)])  # with the progress bar
    assert result.exit_code == 0, result.output
    assert "Normalisation  CT: clip to the foreground 0.5-99.5 percentiles" in result.output
    assert "data.normalization=ct" in result.output and "data.ct_normalization={'clip_lower'" in result.output
    assert (tmp_path / "plans.json").is_file()


def test_cli_errors_are_one_sentence_with_exit_code_2(mr, tmp_path):
    result = CliRunner().invoke(plan_main, [str(tmp_path / "nowhere"), "--no-progress"])
    assert result.exit_code == 2 and "dataset folder does not exist" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "nowhere").exists()
    broken = write_dataset(tmp_path / "broken", [_case(f"c{i}", (1, 1, 3)) for i in range(3)])
    (broken / "labelsTr" / "c1.nii.gz").unlink()
    result = CliRunner().invoke(plan_main, [str(broken), "--no-progress"])
    assert result.exit_code == 2
    assert "imagesTr/c1_0000.nii.gz" in result.output and "--verify" in result.output
    assert not (broken / "plans.json").exists()


# -- the example dataset and the README's own-data commands --------------------------------------------
def test_write_example_refuses_a_folder_that_holds_files(tmp_path):
    (tmp_path / "mine.nii.gz").write_bytes(b"not to be overwritten")
    result = CliRunner().invoke(plan_main, [str(tmp_path), "--write-example"])
    assert result.exit_code == 2 and "is not an empty folder" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["mine.nii.gz"]


def _readme_own_data_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text[text.index("Your own data") :]
    block = block[block.index("```bash") + len("```bash") : block.index("```", block.index("```bash") + 7)]
    return [line.split("  #")[0].strip() for line in block.strip().splitlines()]


@pytest.mark.slow
def test_readme_own_data_commands_run_as_written_and_outputs_keep_each_scans_grid(tmp_path):
    """The README's four own-data lines, in a fresh folder; mpcl-train gets 2 iterations instead of the
    plan's budget. The outputs are named like labelsTs and lie on their scans' grids."""
    import os
    import shutil
    import subprocess
    import sys

    import SimpleITK as sitk

    commands = _readme_own_data_commands()
    assert [c.split()[0] for c in commands] == ["mpcl-plan", "mpcl-plan", "mpcl-plan", "mpcl-segment"]
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    for command in commands:
        command = command.replace(
            "--config runs/example.yaml", "--config runs/example.yaml --iterations 2 --threads 1"
        )
        assert shutil.which(command.split()[0], path=env["PATH"])
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            encoding="utf-8",
            errors="replace",
        )
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    data = tmp_path / "runs" / "example_data"
    outputs = sorted(p.name for p in (tmp_path / "runs" / "example_seg").iterdir())
    assert outputs == sorted(p.name for p in (data / "labelsTs").iterdir())  # the _0000 tag dropped
    for name in outputs:
        scan = sitk.ReadImage(str(data / "imagesTs" / name.replace(".nii.gz", "_0000.nii.gz")))
        labels = sitk.ReadImage(str(tmp_path / "runs" / "example_seg" / name))
        assert labels.GetSize() == scan.GetSize()
        assert np.allclose(labels.GetSpacing(), scan.GetSpacing())
        assert np.allclose(labels.GetOrigin(), scan.GetOrigin())
        assert np.allclose(labels.GetDirection(), scan.GetDirection())
