"""``mpcl-plan DATASET --verify``: is a raw dataset sane before a long training run starts?

Like nnU-Net's dataset integrity check: dataset.json complete (channel_names, labels with background 0,
numTraining matching the cases, file_ending), every image has its label and every label its image, each
label on its image's grid (size, spacing, origin, direction within mpcl-train's tolerances), label values
within the classes, every voxel finite, spacings plausible, and the orientation the same across cases
(outliers are reported as warnings: slicing follows the spacing, not the orientation). Every file is read
with :func:`mpcl.io.read_image`, so a truncated or NaN-holding NIfTI is named in that reader's words.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mpcl.errors import InputError
from mpcl.training.dataset_layout import (
    CaseFiles,
    Problem,
    check_case,
    image_files,
    orientation_code,
    pair_cases,
    read_checked,
    read_dataset_json,
    relative,
)

log = logging.getLogger("mpcl.plan")


@dataclass
class VerifyReport:
    root: Path
    cases: int = 0  # labelled training cases
    files: int = 0  # files read
    problems: list[Problem] = field(default_factory=list)

    @property
    def defects(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "defect"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity != "defect"]


def _progress(items: list, description: str, show: bool) -> Iterable:
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=description, unit="case", leave=False)


def _orientation_warnings(orientations: dict[str, str]) -> list[Problem]:
    """Cases whose orientation differs from the most common one in the dataset."""
    if not orientations:
        return []
    counts = Counter(orientations.values())
    usual, usual_count = counts.most_common(1)[0]
    return [
        Problem(
            file,
            f"orientation {code} differs from the dataset's usual {usual} ({usual_count} of "
            f"{len(orientations)} images); check it is the same anatomy the right way round",
            "warning",
        )
        for file, code in sorted(orientations.items())
        if code != usual
    ]


def verify_dataset(root: str | Path, progress: bool = True) -> VerifyReport:
    """Check everything mpcl-train will read from ``root``; the report lists each problem once."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder does not exist")
    report = VerifyReport(root)
    problems = report.problems
    description = read_dataset_json(root)
    problems.extend(description.problems)
    if not (root / "imagesTr").is_dir():
        problems.append(
            Problem("imagesTr", "folder missing; labelled images go in imagesTr/<case>_0000.nii.gz")
        )
    if not (root / "labelsTr").is_dir():
        problems.append(Problem("labelsTr", "folder missing; labels go in labelsTr/<case>.nii.gz"))
    ending = description.file_ending
    train, pairing = pair_cases(root, "imagesTr", "labelsTr", ending)
    problems.extend(pairing)
    if (root / "imagesTr").is_dir() and not train:
        problems.append(Problem("imagesTr", "no images found (expected <case>_0000.nii.gz files)"))
    report.cases = len(train)
    if description.num_training is not None and description.num_training != len(train):
        problems.append(
            Problem(
                "dataset.json",
                f"numTraining is {description.num_training} but imagesTr holds {len(train)} case(s)",
            )
        )
    unlabelled_files, unlabelled_problems = image_files(root / "imagesUnlabelled", root, ending)
    unlabelled = [CaseFiles(name, path, None) for name, path in unlabelled_files.items()]
    problems.extend(unlabelled_problems)
    test, test_problems = pair_cases(root, "imagesTs", "labelsTs", ending, labels_required=False)
    problems.extend(test_problems)

    num_classes = len(description.class_names) if description.class_names else None
    orientations: dict[str, str] = {}
    everything: list[CaseFiles] = [*train, *unlabelled, *test]
    log.info("verifying %d case(s) in %s", len(everything), root)
    for case in _progress(everything, "verify", progress):
        if case.label is None:
            _, geometry, case_problems = read_checked(case.image, root)
            report.files += 1
        else:
            data, case_problems = check_case(case, root, num_classes)
            geometry = None if data is None else data.geometry
            report.files += 2
        problems.extend(case_problems)
        if geometry is not None:
            orientations[relative(case.image, root)] = orientation_code(geometry.direction)
    problems.extend(_orientation_warnings(orientations))
    return report


def report_lines(report: VerifyReport) -> list[str]:
    """The table a person reads: one line per problem, naming the file, then a verdict."""
    lines = [f"Checked {report.cases} labelled case(s), {report.files} file(s) in {report.root}"]
    if report.problems:
        width = min(max(len(p.file) for p in report.problems), 60)
        lines.append(f"  {'severity':<8}  {'file':<{width}}  problem")
        for problem in sorted(report.problems, key=lambda p: (p.severity != "defect", p.file)):
            lines.append(f"  {problem.severity:<8}  {problem.file:<{width}}  {problem.message}")
    n_defects, n_warnings = len(report.defects), len(report.warnings)
    if n_defects:
        lines.append(
            f"{n_defects} defect(s), {n_warnings} warning(s): mpcl-train would stop on or learn from "
            "these; fix them first."
        )
    else:
        lines.append(
            f"No defects ({n_warnings} warning(s)): the dataset is ready for mpcl-plan and mpcl-train."
        )
    return lines
