"""Faults and bad input at the five entry points: one sentence, a non-zero exit, nothing half-written.

Each case states what a careful user does wrong (or what the machine does to them) and asserts three
things: the exit code or exception, the sentence (it names the file or key), and the disk afterwards
(nothing under a final name that should not be there, no temporaries of ours left behind).

A full disk is made with a per-process file-size limit (``RLIMIT_FSIZE``, SIGXFSZ ignored so writes fail
with EFBIG as on a full disk) in a child process. The tests run as root in CI, which ignores permission
bits, so a read-only folder is simulated where our code first touches it (creating a file there fails
with EROFS).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from mpcl import Segmenter
from mpcl.cli_segment import segment_main
from mpcl.errors import InputError, ModelPackageError, OutputError
from mpcl.io import TEMPORARY_PREFIX, ImageGeometry, write_image
from mpcl.model_package import MODEL_JSON, sha256_of
from mpcl.training.cli import eval_main, train_main
from tests.conftest import write_tiny_config
from tests.segment_helpers import GEOMETRY, phantom_volume, sitk_image, write_dicom_series

REPO = Path(__file__).resolve().parents[1]
SHAPE = (6, 40, 48)


# --------------------------------------------------------------------------------------------- helpers
def _segment(capsys, *args) -> tuple[int, list[str], str]:
    code = segment_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(f"{TEMPORARY_PREFIX}*"))


def _child(code: str, *, file_size_limit: int | None = None, timeout: float = 300):
    """Run python ``code`` in a child process (one thread), optionally with a file-size limit."""
    prelude = "import resource, signal\n"
    if file_size_limit is not None:
        prelude += (
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit}, {file_size_limit}))\n"
        )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )


def _segment_in_child(argv: list, file_size_limit: int | None = None):
    argv = [str(a) for a in argv]
    code = f"from mpcl.cli_segment import segment_main\nraise SystemExit(segment_main({argv!r}))\n"
    return _child(code, file_size_limit=file_size_limit)


@pytest.fixture
def scan(tmp_path) -> Path:
    return write_image(phantom_volume(SHAPE), GEOMETRY, tmp_path / "scan.nii.gz")


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: creating any file under ``folder`` fails with EROFS from then on."""

    def make(folder: Path) -> None:
        real = tempfile.mkstemp
        blocked = Path(folder).resolve()

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve().is_relative_to(blocked):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refuse)

    return make


def _nifti_bytes(array: np.ndarray) -> bytes:
    """An uncompressed NIfTI file of ``array`` (float32), as bytes."""
    import nibabel

    image = nibabel.Nifti1Image(np.transpose(array, (2, 1, 0)).astype(np.float32), np.diag([1, 1, 2, 1.0]))
    return image.to_bytes()


# ----------------------------------------------------------------- mpcl-segment: writes on a full disk
@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd"])
def test_a_full_disk_fails_the_case_and_leaves_nothing(package_dir, scan, tmp_path, suffix):
    """ITK's NIfTI writer only prints 'NWAD: wrote only 0 of … bytes' on a full disk; the file is
    checked after writing, so the case fails instead of leaving a truncated file under its name."""
    out = tmp_path / "out"
    out.mkdir()
    target = out / f"seg{suffix}"
    result = _segment_in_child([scan, "-o", target, "--model", package_dir], file_size_limit=64)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{target}: cannot be written" in result.stderr
    assert "failed" in result.stdout and "Traceback" not in result.stderr
    assert list(out.iterdir()) == []


def test_a_full_disk_in_a_batch_goes_on_with_the_next_case(package_dir, scan, tmp_path):
    """Probabilities (large) do not fit, the label map alone does: case 1 fails whole, case 2 is written."""
    other = write_image(phantom_volume(SHAPE, seed=1), GEOMETRY, tmp_path / "other.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    result = _segment_in_child(
        [scan, other, "-o", out, "--model", package_dir, "--probabilities", "--format", "nii"],
        file_size_limit=80_000,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.count("failed") == 2  # both cases' probabilities exceed the limit
    assert list(out.iterdir()) == []  # label maps were not renamed without their probabilities


# ------------------------------------------------------------------------ mpcl-segment: damaged inputs
def test_a_truncated_nii_gz_is_refused(package_dir, scan, tmp_path, capsys):
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(scan.read_bytes()[: len(scan.read_bytes()) // 2])
    code, lines, err = _segment(capsys, cut, "-o", tmp_path / "seg.nii.gz", "--model", package_dir)
    assert code == 1 and "truncated" in lines[0] and str(cut) in lines[0]
    assert not (tmp_path / "seg.nii.gz").exists()


def test_a_header_only_nii_is_refused(package_dir, tmp_path, capsys):
    header_only = tmp_path / "header.nii"
    header_only.write_bytes(_nifti_bytes(phantom_volume(SHAPE))[:352])
    code, lines, _ = _segment(capsys, header_only, "-o", tmp_path / "seg.nii.gz", "--model", package_dir)
    assert code == 1 and str(header_only) in lines[0]
    assert "truncated" in lines[0] or "cannot be read" in lines[0]
    assert not (tmp_path / "seg.nii.gz").exists()


def test_a_nii_cut_inside_its_voxel_data_names_the_missing_bytes(package_dir, tmp_path, capsys):
    data = _nifti_bytes(phantom_volume(SHAPE))
    cut = tmp_path / "cut.nii"
    cut.write_bytes(data[: len(data) - 4000])
    code, lines, _ = _segment(capsys, cut, "-o", tmp_path / "seg.nii.gz", "--model", package_dir)
    expected = int(np.prod(SHAPE)) * 4
    assert code == 1 and f"expected {expected} bytes of voxel data" in lines[0]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_non_finite_voxels_are_refused_in_every_format(package_dir, tmp_path, capsys, bad, suffix):
    """SimpleITK reads NaN/inf in NIfTI as 0; every format now gets the same refusal."""
    volume = phantom_volume(SHAPE)
    volume[2, 10, 10] = bad
    path = tmp_path / f"bad{suffix}"
    sitk.WriteImage(sitk_image(volume), str(path))
    code, lines, _ = _segment(capsys, path, "-o", tmp_path / "seg.nii.gz", "--model", package_dir)
    assert code == 1 and f"{path}: contains non-finite voxel values" in lines[0]


def _dicom(tmp_path: Path, name: str = "dicom") -> Path:
    folder = tmp_path / name
    geometry = ImageGeometry((0.9, 0.9, 4.0), (0.0, 0.0, 0.0))
    write_dicom_series(phantom_volume(SHAPE), geometry, folder, "1.2.826.0.1.3680043.2.1125.7")
    return folder


def test_a_dicom_series_with_a_missing_slice_is_refused_naming_the_gap(package_dir, tmp_path, capsys):
    folder = _dicom(tmp_path)
    sorted(folder.iterdir())[3].unlink()
    code, lines, _ = _segment(capsys, folder, "-o", tmp_path / "seg.nii.gz", "--model", package_dir)
    assert code == 1 and "not evenly spaced" in lines[0]
    assert "8.00 mm apart where the series steps 4.00 mm" in lines[0]
    assert not (tmp_path / "seg.nii.gz").exists()


def test_a_dicom_gap_is_accepted_when_the_user_opts_in(package_dir, tmp_path, capsys):
    folder = _dicom(tmp_path)
    sorted(folder.iterdir())[3].unlink()
    out = tmp_path / "seg.nii.gz"
    code, lines, _ = _segment(capsys, folder, "-o", out, "--model", package_dir, "--allow-slice-gaps")
    assert code == 0 and lines[0].startswith("[1/1] done dicom -> ")
    assert sitk.ReadImage(str(out)).GetSize() == (48, 40, 5)


def test_a_dicom_series_with_mixed_slice_sizes_is_refused(package_dir, tmp_path, capsys):
    folder = _dicom(tmp_path)
    odd = sorted(folder.iterdir())[2]
    image = sitk.ReadImage(str(odd))
    small = sitk.Resample(image, [30, 30, 1], sitk.Transform(), sitk.sitkNearestNeighbor, image.GetOrigin(),
                          image.GetSpacing(), image.GetDirection())  # fmt: skip
    for key in image.GetMetaDataKeys():
        small.SetMetaData(key, image.GetMetaData(key))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(odd))
    writer.Execute(small)
    code, lines, _ = _segment(capsys, folder, "-o", tmp_path / "seg.nii.gz", "--model", package_dir)
    assert code == 1 and "mixes slice sizes" in lines[0], lines


# -------------------------------------------------------------- mpcl-segment: arguments and outputs
def test_overwrite_never_replaces_the_input_scan(package_dir, scan, capsys):
    before = scan.read_bytes()
    code, _, err = _segment(capsys, scan, "-o", scan, "--model", package_dir, "--overwrite")
    assert code == 2 and f"{scan}: is the input scan itself" in err
    assert scan.read_bytes() == before


def test_overwrite_never_replaces_the_input_through_another_spelling(package_dir, scan, capsys):
    alias = scan.parent / "." / scan.name
    code, _, err = _segment(capsys, scan, "-o", alias, "--model", package_dir, "--overwrite")
    assert code == 2 and "is the input scan itself" in err


def test_an_output_with_a_foreign_suffix_is_refused_not_made_a_folder(package_dir, scan, tmp_path, capsys):
    code, _, err = _segment(capsys, scan, "-o", tmp_path / "out.png", "--model", package_dir)
    assert code == 2 and "out.png: is not an output format" in err
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("option", ["--threads", "--batch-size"])
@pytest.mark.parametrize("value", ["-2", "0", "two"])
def test_counts_must_be_positive(package_dir, scan, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as stop:
        segment_main(
            [str(scan), "-o", str(tmp_path / "s.nii.gz"), "--model", str(package_dir), option, value]
        )
    assert stop.value.code == 2
    assert "expected a positive whole number" in capsys.readouterr().err


def test_a_read_only_output_fails_the_case_and_the_batch_goes_on(
    package_dir, scan, tmp_path, capsys, read_only
):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    read_only(blocked)
    code, lines, err = _segment(
        capsys, scan, scan, "-o", blocked, "--model", package_dir
    )  # two cases, same name: refused first
    assert code == 2 and "same output" in err
    other = write_image(phantom_volume(SHAPE, seed=2), GEOMETRY, tmp_path / "other.nii.gz")
    code, lines, err = _segment(capsys, scan, other, "-o", blocked, "--model", package_dir)
    assert code == 1 and len(lines) == 2 and all("failed" in line for line in lines)
    assert "the file system is read-only" in lines[0] and "Traceback" not in err
    assert list(blocked.iterdir()) == []


@pytest.mark.slow
def test_sigterm_mid_batch_stops_cleanly(package_dir, tmp_path):
    """SIGTERM is handled like Ctrl-C: finished cases stay, the case in progress leaves nothing."""
    cases = [
        write_image(phantom_volume(SHAPE, seed=i), GEOMETRY, tmp_path / f"c{i:02d}.nii.gz") for i in range(40)
    ]
    out = tmp_path / "out"
    argv = [str(a) for a in (*cases, "-o", out, "--model", package_dir, "--probabilities", "--tta")]
    code = f"from mpcl.cli_segment import segment_main\nraise SystemExit(segment_main({argv!r}))\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = child.stdout.readline()
    assert "done" in first, first + child.stderr.read()
    child.send_signal(signal.SIGTERM)
    rest, err = child.communicate(timeout=120)
    assert child.returncode == 143, err
    assert ("interrupted" in rest or "Interrupted." in err) and "Traceback" not in err
    assert _temporaries(out) == []
    done = [line.split(" -> ")[1].split(",")[0] for line in (first + rest).splitlines() if " done " in line]
    written = sorted(p.name for p in out.iterdir() if "_probabilities" not in p.name)
    assert written == sorted(Path(path).name for path in done) and len(written) < len(cases)


def test_temporaries_of_a_killed_run_are_cleaned_by_the_next_write(package_dir, scan, tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f"{TEMPORARY_PREFIX}{gone.pid}-abc123-scan.nii.gz"
    stale.write_bytes(b"half a file")
    alive = out / f"{TEMPORARY_PREFIX}{os.getppid()}-def456-scan.nii.gz"  # a running process's: kept
    alive.write_bytes(b"being written")
    code, _, _ = _segment(capsys, scan, "-o", out, "--model", package_dir, "--format", "nii.gz")
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([alive.name, "scan.nii.gz"])


def test_each_output_has_exactly_one_temporary(package_dir, scan, tmp_path, monkeypatch):
    """The label map, probabilities and uncertainty are renamed together, each from one temporary
    (no `.tmp-x-.tmp-y-` names from a temporary inside a temporary)."""
    import mpcl.io

    seen = []
    real = mpcl.io.save_sitk_image
    monkeypatch.setattr(
        mpcl.io, "save_sitk_image", lambda image, path: (seen.append(Path(path).name), real(image, path))
    )
    segmenter = Segmenter.from_pretrained(package_dir, device="cpu")
    segmenter.segment_to_files(scan, tmp_path / "out" / "s.nii.gz", probabilities=True, uncertainty=True)
    assert len(seen) == 3 and all(name.count(TEMPORARY_PREFIX) == 1 for name in seen), seen
    assert _temporaries(tmp_path / "out") == []


# ----------------------------------------------------------------------------- Segmenter: geometry
def test_a_sheared_direction_is_refused(package_dir):
    image = sitk_image(phantom_volume(SHAPE))
    image.SetDirection((1.0, 0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(InputError, match="direction matrix .* is not orthonormal"):
        Segmenter.from_pretrained(package_dir, device="cpu")(image)


def test_a_singular_direction_is_refused(package_dir):
    geometry = ImageGeometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 0, 0, 0, 0, 1.0))
    with pytest.raises(InputError, match="array: its direction matrix .* is not orthonormal"):
        Segmenter.from_pretrained(package_dir, device="cpu")((phantom_volume(SHAPE), geometry))


def test_a_nibabel_image_with_a_zero_axis_is_refused(package_dir):
    import nibabel

    affine = np.diag([1.0, 0.0, 2.0, 1.0])
    image = nibabel.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.eye(4))
    image._affine = affine  # as a hand-built image object can carry; nibabel would refuse to save it
    with pytest.raises(InputError, match="has a zero or non-finite axis"):
        Segmenter.from_pretrained(package_dir, device="cpu")(image)


def test_an_nrrd_with_a_zero_direction_says_so(package_dir, tmp_path):
    path = tmp_path / "zero.nrrd"
    sitk.WriteImage(sitk_image(phantom_volume(SHAPE), ImageGeometry()), str(path))
    text = path.read_bytes()
    start = text.index(b"space directions")
    end = text.index(b"\n", start)
    path.write_bytes(text[:start] + b"space directions: (1,0,0) (0,0,0) (0,0,1)" + text[end:])
    with pytest.raises(InputError) as info:
        Segmenter.from_pretrained(package_dir, device="cpu")(path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot be read as an image (") and "Zero-valued spacing" in message
    assert "\n" not in message and "0x" not in message


# ------------------------------------------------------------------- Segmenter: tampered packages
def _edit(package: Path, change) -> None:
    data = json.loads((package / MODEL_JSON).read_text())
    change(data)
    (package / MODEL_JSON).write_text(json.dumps(data))


@pytest.fixture
def package_copy(package_dir, tmp_path):
    import shutil

    return Path(shutil.copytree(package_dir, tmp_path / "model"))


@pytest.mark.parametrize(
    ("change", "sentence"),
    [
        (lambda d: d.update(patch_size=[100000, 100000]), "patch_size must be two integers from 1 to 4096"),
        (lambda d: d.update(patch_size=["32", 32]), "patch_size must be two integers"),
        (lambda d: d.update(patch_size=[True, 32]), "patch_size must be two integers"),
        (
            lambda d: d.update(normalization={"scheme": "percentile", "lower": 99, "upper": 1}),
            r"normalization.lower \(99.0\) must be below normalization.upper \(1.0\)",
        ),
        (
            lambda d: d.update(normalization={"scheme": "percentile", "lower": "0.5"}),
            "normalization.lower must be a number from 0 to 100",
        ),
        (
            lambda d: d.update(normalization={"scheme": "percentile", "upper": 250}),
            "normalization.upper must be a number from 0 to 100",
        ),
        (lambda d: d.update(normalization={"scheme": "zscore", "mean": 3}), "unknown key"),
        (lambda d: d["files"]["onnx"].pop("sha256"), "files.onnx.sha256 must be the file's SHA-256"),
        (lambda d: d["files"]["onnx"].update(sha256="abc"), "files.onnx.sha256 must be the file's SHA-256"),
        (lambda d: d["files"]["onnx"].update(external_data={"w.bin": "0" * 64}), "w.bin but .* is missing"),
    ],
)
def test_a_tampered_model_json_is_one_sentence_naming_the_key(package_copy, change, sentence):
    _edit(package_copy, change)
    with pytest.raises(ModelPackageError, match=f"{MODEL_JSON}: .*{sentence}"):
        Segmenter.from_pretrained(package_copy, device="cpu")


def test_a_swapped_network_file_is_refused(package_copy):
    onnx = package_copy / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelPackageError, match="does not match the SHA-256"):
        Segmenter.from_pretrained(package_copy, backend="onnxruntime", device="cpu")


def _externalise(package: Path) -> Path:
    """Rewrite the package's ONNX with its weights in an external data file; returns that file."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(package / "model.onnx"))
    onnx.save(model, str(package / "model.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=0)  # fmt: skip
    return package / "weights.bin"


def test_undeclared_onnx_external_weights_do_not_load(package_copy):
    """An ONNX file pointing to weights model.json does not list (so does not hash) is refused."""
    _externalise(package_copy)
    _edit(package_copy, lambda d: d["files"]["onnx"].update(sha256=sha256_of(package_copy / "model.onnx")))
    with pytest.raises(ModelPackageError, match="model.onnx: cannot be loaded by onnxruntime"):
        Segmenter.from_pretrained(package_copy, backend="onnxruntime", device="cpu")


def test_swapped_onnx_external_weights_are_refused(package_copy, scan):
    weights = _externalise(package_copy)
    digest = sha256_of(package_copy / "model.onnx")
    _edit(
        package_copy,
        lambda d: d["files"]["onnx"].update(sha256=digest, external_data={"weights.bin": sha256_of(weights)}),
    )
    Segmenter.from_pretrained(package_copy, backend="onnxruntime", device="cpu")(scan)  # declared: runs
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match="weights.bin: does not match the SHA-256"):
        Segmenter.from_pretrained(package_copy, backend="onnxruntime", device="cpu")


def test_saving_into_a_read_only_folder_is_one_sentence(package_dir, scan, tmp_path, read_only):
    result = Segmenter.from_pretrained(package_dir, device="cpu")(scan)
    read_only(tmp_path / "ro")
    (tmp_path / "ro").mkdir()
    with pytest.raises(OutputError, match=r"seg.nrrd: cannot be written \(the file system is read-only\)"):
        result.save(tmp_path / "ro" / "seg.nrrd")


# ------------------------------------------------------------------------------------- mpcl-train
@pytest.mark.parametrize(
    ("changes", "sentence"),
    [
        ({"train.lr": float("inf")}, "config.train.lr must be a finite number"),
        ({"train.lr": float("nan")}, "config.train.lr must be a finite number"),
        ({"model.channels": [4, -8, 8, 16, 16]}, "model.channels must all be > 0"),
        (
            {"model.dropout": [0.0, 0.1, 1.5, 0.1, 0.1]},
            r"model.dropout and model.decoder_dropout must be in \[0, 1\)",
        ),
        ({"train.momentum": 1.2}, r"train.momentum must be in \[0, 1\)"),
        ({"train.weight_decay": -1e-4}, "train.weight_decay must be >= 0"),
        ({"train.num_threads": 0}, "train.num_threads must be > 0"),
    ],
)
def test_bad_config_values_are_one_sentence(tmp_path, changes, sentence):
    config = write_tiny_config(tmp_path, **changes)
    result = CliRunner().invoke(train_main, ["--config", str(config), "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith(f"Error: {config}: ") and len(result.output.strip().splitlines()) == 1
    assert __import__("re").search(sentence, result.output), result.output
    assert not (tmp_path / "run").exists()


def test_a_yaml_float_inf_spelling_is_refused(tmp_path):
    config = write_tiny_config(tmp_path, **{"train.lr": 0.01})
    text = config.read_text().replace("lr: 0.01", "lr: .inf")
    assert "lr: .inf" in text
    config.write_text(text)
    result = CliRunner().invoke(train_main, ["--config", str(config), "--no-progress"])
    assert result.exit_code == 2 and "train.lr must be a finite number" in result.output


def test_a_non_utf8_config_is_one_sentence(tmp_path):
    config = write_tiny_config(tmp_path)
    config.write_bytes(config.read_bytes() + b"# caf\xe9\n")
    result = CliRunner().invoke(train_main, ["--config", str(config), "--no-progress"])
    assert result.exit_code == 2 and f"{config}: is not UTF-8 text (byte 0xe9" in result.output


def test_data_root_on_phantom_data_is_refused_not_ignored(tmp_path):
    config = write_tiny_config(tmp_path)
    result = CliRunner().invoke(train_main, ["--config", str(config), "--data-root", str(tmp_path)])
    assert result.exit_code == 2 and "data.kind is phantom" in result.output
    assert not (tmp_path / "run").exists()


def test_an_output_dir_that_is_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    result = CliRunner().invoke(train_main, ["--config", str(write_tiny_config(tmp_path)), "--no-progress"])
    assert result.exit_code == 2 and f"{tmp_path / 'run'}: cannot write into this folder" in result.output
    assert (tmp_path / "run").read_text() == "not a folder"


def test_a_read_only_output_dir_is_refused_before_training(tmp_path, read_only):
    (tmp_path / "run").mkdir()
    read_only(tmp_path / "run")
    result = CliRunner().invoke(train_main, ["--config", str(write_tiny_config(tmp_path)), "--no-progress"])
    assert result.exit_code == 2 and "(the file system is read-only)" in result.output
    assert list((tmp_path / "run").iterdir()) == []


@pytest.mark.slow
def test_a_full_disk_during_training_is_one_sentence_and_no_partial_checkpoint(tmp_path):
    config = write_tiny_config(tmp_path)
    code = (
        "import sys\nfrom mpcl.training.cli import train_main\n"
        f"sys.argv = ['mpcl-train', '--config', {str(config)!r}, '--no-progress']\ntrain_main()\n"
    )
    result = _child(code, file_size_limit=40_000)
    assert result.returncode == 2, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "cannot be written" in last and "Traceback" not in result.stderr
    assert not list((tmp_path / "run").glob("*.pt")) and _temporaries(tmp_path / "run") == []


# -------------------------------------------------------------------------------------- mpcl-eval
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trained")
    config = write_tiny_config(folder)
    result = CliRunner().invoke(train_main, ["--config", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    return folder / "run" / "best.pt"


def _eval(*args) -> tuple[int, str, float]:
    started = time.perf_counter()
    result = CliRunner().invoke(eval_main, [str(a) for a in args])
    return result.exit_code, result.output, time.perf_counter() - started


@pytest.mark.slow
def test_eval_output_that_is_a_folder_is_refused_before_evaluating(trained, tmp_path):
    code, output, _ = _eval("--checkpoint", trained, "--output", tmp_path, "--device", "cpu")
    assert code == 2 and f"{tmp_path}: is a folder; give a file name" in output
    assert "Dice" not in output  # refused before any volume was scored


@pytest.mark.slow
def test_eval_output_in_a_read_only_folder_is_refused_before_evaluating(trained, tmp_path, read_only):
    read_only(tmp_path)
    code, output, _ = _eval("--checkpoint", trained, "--output", tmp_path / "m.json", "--device", "cpu")
    assert code == 2 and "cannot write into this folder (the file system is read-only)" in output
    assert "Dice" not in output


@pytest.mark.slow
def test_eval_predictions_folder_that_is_a_file_is_refused(trained, tmp_path):
    (tmp_path / "preds").write_text("x")
    code, output, _ = _eval(
        "--checkpoint", trained, "--save-predictions", tmp_path / "preds", "--device", "cpu"
    )
    assert code == 2 and "it is a file, not a folder" in output


# ------------------------------------------------------------------------------------ mpcl-export
@pytest.mark.slow
def test_export_into_a_file_is_one_sentence(trained, tmp_path):
    from mpcl.export.cli import export_main

    (tmp_path / "pkg").write_text("x")
    result = CliRunner().invoke(
        export_main, [str(trained), "-o", str(tmp_path / "pkg"), "--onnx", "--no-progress"]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and "pkg" in result.output
    assert (tmp_path / "pkg").read_text() == "x"


@pytest.mark.slow
def test_export_on_a_full_disk_leaves_no_package(trained, tmp_path):
    code = (
        "import sys\nfrom mpcl.export.cli import export_main\n"
        f"sys.argv = ['mpcl-export', {str(trained)!r}, '-o', {str(tmp_path / 'pkg')!r}, '--onnx',"
        " '--no-progress']\n"
        "export_main()\n"
    )
    result = _child(code, file_size_limit=20_000)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "cannot be written" in result.stderr
    assert not (tmp_path / "pkg" / MODEL_JSON).exists()


@pytest.mark.slow
def test_a_checkpoint_cut_short_is_one_sentence(trained, tmp_path):
    from mpcl.export.cli import export_main

    cut = tmp_path / "cut.pt"
    cut.write_bytes(trained.read_bytes()[:5000])
    result = CliRunner().invoke(
        export_main, [str(cut), "-o", str(tmp_path / "pkg"), "--onnx", "--no-progress"]
    )
    assert result.exit_code == 2 and str(cut) in result.output and "Traceback" not in result.output
