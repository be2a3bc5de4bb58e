"""Segment terminology for the Slicer module: class names and model.json entries -> SNOMED CT codes.

Pure Python (no slicer-core): the entry strings are checked field by field against the format Slicer's
terminologies logic reads (``context~category~type~modifier~anatomic context~region~region modifier``,
codes ``SCHEME^VALUE^MEANING``). ``tests/test_slicer_logic.py`` checks that the segments of a real run
carry them, and that Slicer's own deserialiser reads them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "slicer" / "MPCLSegmentation"
if str(PLUGIN) not in sys.path:
    sys.path.insert(0, str(PLUGIN))

from MPCLSegmentationLib.terminology import (  # noqa: E402
    SOURCE_FALLBACK,
    SOURCE_MODEL_JSON,
    SOURCE_NAME,
    Terminology,
    declared_by_class,
    normalise_name,
    terminology_for_class,
)

DICOM = "Segmentation category and type - DICOM master list"
ANATOMIC = "Anatomic codes - DICOM master list"
STRUCTURE = "SCT^123037004^Anatomical Structure"


def _entry(kind: str) -> str:
    return f"{DICOM}~{STRUCTURE}~{kind}~^^~{ANATOMIC}~^^~^^"


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        # the ACDC class names training/data/acdc.py gives a package, and the sample test model's
        ("RV", "SCT^53085002^Right ventricle"),
        ("myocardium", "SCT^74281007^Myocardium"),
        ("LV", "SCT^87878005^Left ventricle"),
        ("right ventricle", "SCT^53085002^Right ventricle"),
        ("left ventricle", "SCT^87878005^Left ventricle"),
        # other usual spellings
        ("Right_Ventricle_Cavity", "SCT^53085002^Right ventricle"),
        ("LV-cavity", "SCT^87878005^Left ventricle"),
        ("MYO", "SCT^74281007^Myocardium"),
        ("Myocardium of the left ventricle", "SCT^74281007^Myocardium"),
        ("heart_ventricle_left", "SCT^87878005^Left ventricle"),  # TotalSegmentator's name
    ],
)
def test_cardiac_class_names_get_snomed_codes(name, kind):
    terminology, source = terminology_for_class(name)
    assert source == SOURCE_NAME
    assert terminology.entry() == _entry(kind)


@pytest.mark.parametrize("name", ["tumour", "liver", "left atrium", "RVX", "class 7"])
def test_unknown_names_are_a_generic_anatomical_structure(name):
    terminology, source = terminology_for_class(name)
    assert source == SOURCE_FALLBACK
    assert terminology.entry() == _entry("SCT^91723000^Anatomical structure")
    assert "Tissue" not in terminology.entry()  # not Slicer's default


def test_model_json_terminology_wins_over_the_name():
    mass = "SCT^49755003^Morphologically Altered Structure~SCT^4147007^Mass"
    declared = f"{DICOM}~{mass}~^^~{ANATOMIC}~SCT^80891009^Heart~^^"
    terminology, source = terminology_for_class("LV", declared)
    assert source == SOURCE_MODEL_JSON
    assert terminology.entry() == declared
    assert terminology.region.meaning == "Heart"

    as_object = {
        "category": ["SCT", "123037004", "Anatomical Structure"],
        "type": "SCT^53085002^Right ventricle",
        "type_modifier": ["SCT", "24028007", "Right"],
    }
    terminology, source = terminology_for_class("chamber 2", as_object)
    assert source == SOURCE_MODEL_JSON
    assert (
        terminology.entry()
        == f"{DICOM}~{STRUCTURE}~SCT^53085002^Right ventricle~SCT^24028007^Right~{ANATOMIC}~^^~^^"
    )


@pytest.mark.parametrize(
    "declared",
    [
        "SCT^53085002^Right ventricle",  # a code, not an entry
        f"{DICOM}~{STRUCTURE}~SCT^53085002~^^~{ANATOMIC}~^^~^^",  # a code with two parts
        f"{DICOM}~{STRUCTURE}~^^~^^~{ANATOMIC}~^^~^^",  # no type
        {"type": ["SCT", "53085002", "Right ventricle"]},  # no category
        {"category": ["SCT", "123037004"], "type": ["SCT", "53085002", "Right ventricle"]},
        42,
    ],
)
def test_malformed_model_json_terminology_is_refused(declared):
    with pytest.raises(ValueError, match="terminology|code"):
        terminology_for_class("RV", declared)


def test_parse_round_trips_and_accepts_slicers_trailing_bar():
    entry = _entry("SCT^53085002^Right ventricle")
    assert Terminology.parse(entry).entry() == entry
    assert Terminology.parse(entry + "|").entry() == entry


def test_declared_by_class_reads_only_classes_that_declare_one():
    model_json = {
        "classes": [
            {"name": "background", "value": 0},
            {"name": "RV", "value": 1, "terminology": "x"},
            {"name": "myocardium", "value": 2},
        ]
    }
    assert declared_by_class(model_json) == {"RV": "x"}
    assert declared_by_class({}) == {} and declared_by_class([]) == {}


def test_normalise_name():
    assert normalise_name("  Left__Ventricle-cavity ") == "left ventricle cavity"


def test_segment_specs_carry_the_entries():
    from MPCLSegmentationLib.nodes import label_dtype, segment_specs

    classes = [
        SimpleNamespace(name="background", value=0, color=(0, 0, 0)),
        SimpleNamespace(name="RV", value=1, color=(1, 2, 3)),
        SimpleNamespace(name="scar", value=2, color=(4, 5, 6)),
    ]
    declared = {"scar": {"category": STRUCTURE, "type": "SCT^74281007^Myocardium"}}
    specs = segment_specs(classes, declared)
    assert [(spec.value, spec.name) for spec in specs] == [(1, "RV"), (2, "scar")]
    assert specs[0].terminology == _entry("SCT^53085002^Right ventricle")
    assert specs[1].terminology == _entry("SCT^74281007^Myocardium")
    assert [label_dtype(v).name for v in (0, 255, 256, 65535, 65536)] == [
        "uint8",
        "uint8",
        "uint16",
        "uint16",
        "uint32",
    ]
    with pytest.raises(ValueError, match="32-bit"):
        label_dtype(2**32)
