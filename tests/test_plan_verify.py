"""mpcl-plan --verify: every defect gives exit code 1 and a line naming the file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mpcl.training.dataset_verify import verify_dataset
from mpcl.training.plan_cli import plan_main
from tests.plan_helpers import I_ALONG_SI, mr_case, write_dataset, write_volume

SPACING = (0.8, 0.8, 4.0)


def _dataset(root: Path, n: int = 3) -> Path:
    return write_dataset(root, [mr_case(f"case_{i:03d}", (4, 16, 18), SPACING, seed=i) for i in range(n)])


def _verify(root: Path):
    result = CliRunner().invoke(plan_main, [str(root), "--verify", "--no-progress"])
    return result.exit_code, result.output


def _problem_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.match(r"\s+(defect|warning)\s", line)]


def test_a_clean_dataset_passes(tmp_path):
    code, output = _verify(_dataset(tmp_path / "ok"))
    assert code == 0, output
    assert "No defects" in output and not _problem_lines(output)


def _missing_label(root):
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    return "imagesTr/case_001_0000.nii.gz", "image without a label"


def _missing_image(root):
    (root / "imagesTr" / "case_002_0000.nii.gz").unlink()
    return "labelsTr/case_002.nii.gz", "label without an image"


def _size_mismatch(root):
    write_volume(np.zeros((4, 16, 17), np.uint8), root / "labelsTr" / "case_001.nii.gz", SPACING)
    return "labelsTr/case_001.nii.gz", "size 17x16x4 differs from its image"


def _spacing_mismatch(root):
    write_volume(np.zeros((4, 16, 18), np.uint8), root / "labelsTr" / "case_001.nii.gz", (0.8, 0.8, 5.0))
    return "labelsTr/case_001.nii.gz", "spacing (0.8, 0.8, 5.0) differs from its image"


def _origin_mismatch(root):
    write_volume(
        np.zeros((4, 16, 18), np.uint8), root / "labelsTr" / "case_001.nii.gz", SPACING, origin=(0, 0, 12)
    )
    return "labelsTr/case_001.nii.gz", "origin"


def _label_out_of_range(root):
    label = np.zeros((4, 16, 18), np.uint8)
    label[0, 0, 0] = 5
    write_volume(label, root / "labelsTr" / "case_000.nii.gz", SPACING)
    return "labelsTr/case_000.nii.gz", "label value(s) [5] outside dataset.json's classes 0..2"


def _nan_voxel(root):
    image = np.ones((4, 16, 18), np.float32)
    image[1, 2, 3] = np.nan
    write_volume(image, root / "imagesTr" / "case_002_0000.nii.gz", SPACING)
    return "imagesTr/case_002_0000.nii.gz", "non-finite"


def _truncated(root):
    path = root / "imagesTr" / "case_000_0000.nii"
    (root / "imagesTr" / "case_000_0000.nii.gz").unlink()
    write_volume(np.ones((4, 16, 18), np.float32), path, SPACING)
    path.write_bytes(path.read_bytes()[:-500])
    json_path = root / "dataset.json"  # keep file_ending from flagging the .nii file itself
    description = json.loads(json_path.read_text())
    description.pop("file_ending")
    json_path.write_text(json.dumps(description))
    return "imagesTr/case_000_0000.nii", "truncated"


def _absurd_spacing(root):
    for name in ("imagesTr/case_001_0000.nii.gz", "labelsTr/case_001.nii.gz"):
        write_volume(np.zeros((4, 16, 18), np.float32), root / name, (0.8, 0.8, 400.0))
    return "imagesTr/case_001_0000.nii.gz", "implausible"


def _duplicate_case(root):
    write_volume(np.ones((4, 16, 18), np.float32), root / "imagesTr" / "case_001.nii.gz", SPACING)
    return "imagesTr/case_001_0000.nii.gz", "names the same case 'case_001'"


def _edit_json(change):
    def edit(root):
        path = root / "dataset.json"
        description = json.loads(path.read_text())
        expected = change(description)
        path.write_text(json.dumps(description))
        return "dataset.json", expected

    return edit


DEFECTS = {
    "missing label": _missing_label,
    "missing image": _missing_image,
    "size mismatch": _size_mismatch,
    "spacing mismatch": _spacing_mismatch,
    "origin mismatch": _origin_mismatch,
    "label value out of range": _label_out_of_range,
    "NaN voxel": _nan_voxel,
    "truncated NIfTI": _truncated,
    "absurd spacing": _absurd_spacing,
    "two files for one case": _duplicate_case,
    "no dataset.json numTraining": _edit_json(
        lambda d: d.pop("numTraining") and "incomplete: no 'numTraining'"
    ),
    "no file_ending": _edit_json(lambda d: d.pop("file_ending") and "incomplete: no 'file_ending'"),
    "no channel_names": _edit_json(lambda d: d.pop("channel_names") and "incomplete: no 'channel_names'"),
    "no background": _edit_json(
        lambda d: d.update(labels={"heart": 1, "liver": 2}) or "no background class with value 0"
    ),
    "numTraining wrong": _edit_json(
        lambda d: d.update(numTraining=7) or "numTraining is 7 but imagesTr holds 3 case(s)"
    ),
    "two channels": _edit_json(
        lambda d: d.update(channel_names={"0": "T1", "1": "T2"}) or "mpcl-train reads one channel"
    ),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_each_defect_fails_with_a_line_naming_the_file(tmp_path, defect):
    root = _dataset(tmp_path / "data")
    file, words = DEFECTS[defect](root)
    code, output = _verify(root)
    assert code == 1, output
    lines = [line for line in _problem_lines(output) if "defect" in line]
    matching = [line for line in lines if file in line and words in line]
    assert matching, f"no defect line naming {file} with {words!r}:\n{output}"
    assert "defect(s)" in output.splitlines()[-1]


def test_missing_dataset_json_and_folders(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    code, output = _verify(root)
    assert code == 1
    assert any("dataset.json" in line and "missing" in line for line in _problem_lines(output))
    assert any("imagesTr" in line and "folder missing" in line for line in _problem_lines(output))


def test_orientation_outliers_are_warnings(tmp_path):
    root = _dataset(tmp_path / "data")
    for name, array in (
        ("imagesTr/case_002_0000.nii.gz", np.ones((4, 16, 18), np.float32)),
        ("labelsTr/case_002.nii.gz", np.zeros((4, 16, 18), np.uint8)),
    ):
        write_volume(array, root / name, SPACING, direction=I_ALONG_SI)
    code, output = _verify(root)
    assert code == 0, output
    warnings = [line for line in _problem_lines(output) if "warning" in line]
    assert len(warnings) == 1 and "imagesTr/case_002_0000.nii.gz" in warnings[0]
    assert "differs from the dataset's usual LPS (2 of 3 images)" in warnings[0]


def test_test_and_unlabelled_images_are_checked_too(tmp_path):
    root = _dataset(tmp_path / "data")
    image = np.ones((4, 16, 18), np.float32)
    image[0, 0, 0] = np.inf
    write_volume(image, root / "imagesUnlabelled" / "extra_0000.nii.gz", SPACING)
    write_volume(np.ones((4, 16, 18), np.float32), root / "imagesTs" / "test_0000.nii.gz", SPACING)
    write_volume(np.zeros((3, 16, 18), np.uint8), root / "labelsTs" / "test.nii.gz", SPACING)
    report = verify_dataset(root, progress=False)
    files = {(p.file, p.severity) for p in report.problems}
    assert ("imagesUnlabelled/extra_0000.nii.gz", "defect") in files
    assert ("labelsTs/test.nii.gz", "defect") in files
    assert report.cases == 3


def test_verify_of_a_missing_folder_is_one_sentence(tmp_path):
    result = CliRunner().invoke(plan_main, [str(tmp_path / "nope"), "--verify"])
    assert result.exit_code == 2 and "dataset folder does not exist" in result.output
