"""Standard terminology (DICOM / SNOMED CT codes) for the segments a model package names.

Slicer describes what a segment *is* with a terminology entry: a category, a type and optional
modifiers, each a DICOM code triplet (coding scheme, code value, code meaning), serialised as one string
in the segment's ``TerminologyEntry`` tag (``vtkSegment.SetTerminology``)::

    <context>~<category>~<type>~<type modifier>~<anatomic context>~<region>~<region modifier>

with every code written ``SCHEME^VALUE^MEANING`` (``^^`` when empty). Without it every segment is the
default "Tissue", which DICOM SEG export, the segment editor and other tools then carry along.

Where each class's entry comes from, first match wins:

1. ``model.json``: a class may carry ``"terminology"``, either an entry string in the format above or an
   object ``{"category": [scheme, value, meaning], "type": [...], "type_modifier": [...]}``;
2. its name: the cardiac structures of ACDC-style packages (``RV``/``right ventricle``, ``myocardium``,
   ``LV``/``left ventricle``, spelt in the usual ways) map to the SNOMED CT codes Slicer's DICOM master
   list (and SlicerTotalSegmentator) use;
3. anything else is a generic anatomical structure; the segment's name keeps the class name as text.

Pure Python: no slicer, vtk or Qt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SEGMENTATION_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
SOURCE_MODEL_JSON, SOURCE_NAME, SOURCE_FALLBACK = "model.json", "class name", "generic"


@dataclass(frozen=True)
class Code:
    """One DICOM code: coding scheme designator (``SCT`` = SNOMED CT), code value and code meaning."""

    scheme: str = ""
    value: str = ""
    meaning: str = ""

    def __str__(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"

    @classmethod
    def parse(cls, text: str) -> Code:
        parts = text.split("^")
        if len(parts) != 3:
            raise ValueError(f"a code must be SCHEME^VALUE^MEANING, got {text!r}")
        return cls(*parts)


EMPTY = Code()
ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")  # the category (DICOM CID 7150)
# The types, as in Slicer's "DICOM master list" (Modules/Loadable/Terminologies/Resources) and
# SlicerTotalSegmentator's totalsegmentator_snomed_mapping.csv.
RIGHT_VENTRICLE = Code("SCT", "53085002", "Right ventricle")
LEFT_VENTRICLE = Code("SCT", "87878005", "Left ventricle")
MYOCARDIUM = Code("SCT", "74281007", "Myocardium")
HEART = Code("SCT", "80891009", "Heart")
# A class this module cannot name: SNOMED CT "Anatomical structure" (the concept, not the category).
GENERIC_STRUCTURE = Code("SCT", "91723000", "Anatomical structure")


@dataclass(frozen=True)
class Terminology:
    """A Slicer terminology entry; :meth:`entry` is the string ``vtkSegment.SetTerminology`` takes."""

    category: Code
    type: Code
    type_modifier: Code = EMPTY
    context: str = SEGMENTATION_CONTEXT
    anatomic_context: str = ANATOMIC_CONTEXT
    region: Code = EMPTY
    region_modifier: Code = EMPTY

    def entry(self) -> str:
        fields = (
            self.context,
            self.category,
            self.type,
            self.type_modifier,
            self.anatomic_context,
            self.region,
            self.region_modifier,
        )
        return "~".join(str(field) for field in fields)

    @classmethod
    def parse(cls, text: str) -> Terminology:
        """Read an entry string (the format of the module docstring); raises ValueError if malformed."""
        fields = text.strip().rstrip("|").split("~")
        if len(fields) != 7:
            raise ValueError(f"a terminology entry has 7 '~'-separated fields, got {len(fields)} in {text!r}")
        context, category, kind, modifier, anatomic_context, region, region_modifier = fields
        entry = cls(
            Code.parse(category),
            Code.parse(kind),
            Code.parse(modifier),
            context,
            anatomic_context,
            Code.parse(region),
            Code.parse(region_modifier),
        )
        if not (entry.category.value and entry.type.value):
            raise ValueError(f"a terminology entry needs a category and a type code, got {text!r}")
        return entry


def _anatomy(kind: Code) -> Terminology:
    return Terminology(ANATOMICAL_STRUCTURE, kind)


_ALIASES = {
    RIGHT_VENTRICLE: (
        "rv",
        "rvc",
        "right ventricle",
        "right ventricle cavity",
        "right ventricular cavity",
        "rv cavity",
        "rv blood pool",
        "right ventricle of heart",
        "heart ventricle right",
        "ventricle right",
    ),
    LEFT_VENTRICLE: (
        "lv",
        "lvc",
        "left ventricle",
        "left ventricle cavity",
        "left ventricular cavity",
        "lv cavity",
        "lv blood pool",
        "left ventricle of heart",
        "heart ventricle left",
        "ventricle left",
    ),
    MYOCARDIUM: (
        "myo",
        "lvm",
        "myocardium",
        "lv myocardium",
        "left ventricle myocardium",
        "left ventricular myocardium",
        "myocardium of left ventricle",
        "myocardium of the left ventricle",
        "heart myocardium",
    ),
    HEART: ("heart", "whole heart"),
}
KNOWN_NAMES: dict[str, Code] = {alias: code for code, aliases in _ALIASES.items() for alias in aliases}


def normalise_name(name: str) -> str:
    """Lower case, ``_``, ``-`` and ``.`` as spaces, single spaces ("Left_Ventricle" -> "left ventricle")."""
    return " ".join(re.sub(r"[_\-.]+", " ", name).lower().split())


def _code(value: Any, where: str) -> Code:
    if isinstance(value, str):
        return Code.parse(value)
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, str) for v in value):
        return Code(*value)
    raise ValueError(f"{where} must be [scheme, value, meaning] or 'SCHEME^VALUE^MEANING', got {value!r}")


def declared_terminology(declared: Any) -> Terminology:
    """A model.json ``"terminology"`` value (entry string or object) as a Terminology; ValueError if bad."""
    if isinstance(declared, str):
        return Terminology.parse(declared)
    if not isinstance(declared, Mapping):
        raise ValueError(f"terminology must be an entry string or an object, got {declared!r}")
    if "category" not in declared or "type" not in declared:
        raise ValueError(f"terminology needs 'category' and 'type', got {sorted(declared)}")
    return Terminology(
        _code(declared["category"], "terminology.category"),
        _code(declared["type"], "terminology.type"),
        _code(declared.get("type_modifier", ["", "", ""]), "terminology.type_modifier"),
        region=_code(declared.get("region", ["", "", ""]), "terminology.region"),
        region_modifier=_code(declared.get("region_modifier", ["", "", ""]), "terminology.region_modifier"),
    )


def terminology_for_class(name: str, declared: Any = None) -> tuple[Terminology, str]:
    """The terminology of one class and where it came from (``SOURCE_*``).

    ``declared``: the class's ``"terminology"`` in model.json, if any; a malformed one raises ValueError
    (a model package that claims codes must get them right, not silently become "generic").
    """
    if declared is not None:
        return declared_terminology(declared), SOURCE_MODEL_JSON
    known = KNOWN_NAMES.get(normalise_name(name))
    if known is not None:
        return _anatomy(known), SOURCE_NAME
    return _anatomy(GENERIC_STRUCTURE), SOURCE_FALLBACK


def declared_by_class(model_json: Mapping[str, Any]) -> dict[str, Any]:
    """Class name -> its ``"terminology"`` value, for the classes of a model.json that declare one."""
    declared = {}
    for entry in model_json.get("classes", []) if isinstance(model_json, Mapping) else []:
        if isinstance(entry, Mapping) and isinstance(entry.get("name"), str) and "terminology" in entry:
            declared[entry["name"]] = entry["terminology"]
    return declared
