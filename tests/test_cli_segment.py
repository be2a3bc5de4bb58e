"""mpcl-segment as a user (or the Slicer module, through a subprocess) runs it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from mpcl import Segmenter
from mpcl.cli_segment import segment_main
from mpcl.io import write_image
from tests.segment_helpers import CLASS_NAMES, GEOMETRY, auto_cpu_backend, phantom_volume


@pytest.fixture
def cases(tmp_path):
    return [write_image(phantom_volume(seed=i), GEOMETRY, tmp_path / f"case_{i}.nii.gz") for i in range(2)]


def _run(capsys, *args):
    code = segment_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err


def test_single_file_keeps_geometry_and_matches_the_api(package_dir, cases, tmp_path, capsys):
    out = tmp_path / "seg.mha"
    code, lines, _ = _run(capsys, cases[0], "-o", out, "--model", package_dir, "--device", "cpu")
    assert code == 0
    assert len(lines) == 1 and lines[0].startswith("[1/1] done case_0 -> ") and auto_cpu_backend() in lines[0]
    image = sitk.ReadImage(str(out))
    assert image.GetSize() == (48, 40, 6)
    source = sitk.ReadImage(str(cases[0]))  # NIfTI geometry is float32; the .mha output keeps it exactly
    assert (image.GetSpacing(), image.GetOrigin(), image.GetDirection()) == (
        source.GetSpacing(),
        source.GetOrigin(),
        source.GetDirection(),
    )
    np.testing.assert_allclose(image.GetDirection(), GEOMETRY.direction, atol=1e-6)
    expected = Segmenter.from_pretrained(package_dir)(cases[0]).label_map
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)


def test_folder_mode_with_extra_outputs(package_dir, cases, tmp_path, capsys):
    out = tmp_path / "out"
    code, lines, _ = _run(
        capsys, *cases, "-o", out, "--model", package_dir, "--format", "seg.nrrd",
        "--probabilities", "--uncertainty", "--tta", "--backend", "torch",
    )  # fmt: skip
    assert code == 0
    assert [line.split(" ->")[0] for line in lines] == ["[1/2] done case_0", "[2/2] done case_1"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"case_{i}{suffix}"
        for i in range(2)
        for suffix in (".seg.nrrd", "_probabilities.nrrd", "_uncertainty.nrrd")
    )
    segmentation = sitk.ReadImage(str(out / "case_1.seg.nrrd"))
    assert [segmentation.GetMetaData(f"Segment{i}_Name") for i in range(3)] == CLASS_NAMES[1:]


def test_existing_output_needs_overwrite(package_dir, cases, tmp_path, capsys):
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"old")
    code, lines, err = _run(capsys, cases[0], "-o", out, "--model", package_dir)
    assert code == 2 and lines == []
    assert err.strip().splitlines()[-1] == f"Error: {out}: output already exists; pass overwrite=True " + (
        "(CLI: --overwrite) to replace it"
    )
    assert out.read_bytes() == b"old"
    code, lines, _ = _run(capsys, cases[0], "-o", out, "--model", package_dir, "--overwrite")
    assert code == 0 and sitk.ReadImage(str(out)).GetSize() == (48, 40, 6)


def test_a_failing_case_leaves_nothing_and_others_run(package_dir, cases, tmp_path, capsys):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x00" * 100)
    out = tmp_path / "out"
    code, lines, err = _run(capsys, bad, cases[1], "-o", out, "--model", package_dir, "--uncertainty")
    assert code == 1
    assert lines[0].startswith(f"[1/2] failed {bad}: {bad}: cannot be read as an image")
    assert lines[1].startswith("[2/2] done case_1")
    assert sorted(p.name for p in out.iterdir()) == ["case_1.nii.gz", "case_1_uncertainty.nii.gz"]
    assert "Error: " in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "{tmp}/no_model"], "model package folder does not exist"),
        (["--model", "{package}", "--backend", "tensorrt"], "no TensorRT engine"),
        (["--model", "{package}", "--device", "tpu"], "unknown device"),
    ],
)
def test_setup_errors_exit_2_before_any_work(package_dir, cases, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path, package=package_dir) for a in args]
    code, lines, err = _run(capsys, cases[0], "-o", tmp_path / "out.nii.gz", *args)
    assert code == 2 and lines == [] and message in err
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.slow
def test_cli_in_a_subprocess(package_dir, cases, tmp_path):
    """What the Slicer module does: a child process, one stdout line per case, exit code."""
    result = subprocess.run(
        [sys.executable, "-m", "mpcl.cli_segment", *map(str, cases), "-o", str(tmp_path / "out"),
         "--model", str(package_dir), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [line.split(" ->")[0] for line in result.stdout.splitlines()] == [
        "[1/2] done case_0",
        "[2/2] done case_1",
    ]
    missing = subprocess.run(
        [sys.executable, "-m", "mpcl.cli_segment", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "o"),
         "--model", str(package_dir), "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 1 and "file or folder does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_progress_lines_follow_the_slices_of_each_case(package_dir, cases, tmp_path, capsys):
    """``--progress-lines``: the '@mpcl progress' protocol lines the Slicer module turns into its bar,
    rising from 0.2 to 1 across the cases, between the unchanged per-case lines."""
    code, lines, _ = _run(
        capsys,
        *cases,
        "-o",
        tmp_path / "out",
        "--model",
        package_dir,
        "--progress-lines",
        "--batch-size",
        "2",
    )
    assert code == 0
    progress = [line for line in lines if line.startswith("@mpcl progress ")]
    fractions = [float(line.split()[2]) for line in progress]
    assert len(progress) > 2 * 3  # several batches per case (6 slices, 2 per batch)
    assert fractions == sorted(fractions) and fractions[0] >= 0.2 and fractions[-1] == 1.0
    assert any("[1/2]" in line for line in progress) and any("[2/2]" in line for line in progress)
    assert [line.split(" ->")[0] for line in lines if not line.startswith("@mpcl")] == [
        "[1/2] done case_0",
        "[2/2] done case_1",
    ]


def test_nnunet_channel_suffix_is_dropped_from_output_names(package_dir, tmp_path, capsys):
    """nnU-Net raw images are CASE_0000.nii.gz and their labels CASE.nii.gz: the segmentation is CASE."""
    source = write_image(phantom_volume(seed=3), GEOMETRY, tmp_path / "la_003_0000.nii.gz")
    code, lines, _ = _run(capsys, source, "-o", tmp_path / "out", "--model", package_dir)
    assert code == 0 and lines[-1].startswith("[1/1] done la_003 -> ")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["la_003.nii.gz"]
