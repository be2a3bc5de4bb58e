"""The 3D Slicer extension's files: what Slicer's Extension Wizard, build and module loader expect.

No Slicer needed: the module file is parsed (not imported: it needs the application), the .ui file is
checked as XML against the names the widget uses, the CMake files against the sources on disk, and the
Extensions Index entry against the catalog-entry schema (v1.0.1, Slicer/Slicer Schemas/).
"""

from __future__ import annotations

import ast
import json
import re
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

EXTENSION = Path(__file__).resolve().parents[1] / "plugins" / "slicer"
MODULE = EXTENSION / "MPCLSegmentation"
MODULE_FILE = MODULE / "MPCLSegmentation.py"
UI_FILE = MODULE / "Resources" / "UI" / "MPCLSegmentation.ui"
if str(MODULE) not in sys.path:
    sys.path.insert(0, str(MODULE))

# Slicer/Slicer Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json, "properties" and "required".
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
CATALOG_TYPES = {
    "$schema": str,
    "category": str,
    "scm_url": str,
    "scm_revision": str,
    "scm_type": str,
    "build_dependencies": list,
    "build_subdirectory": str,
    "enabled": bool,
    "tier": int,
}
SCHEMA_URL = re.compile(
    r"^https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
    r"slicer-extension-catalog-entry-schema-v1\.0\.\d+\.json#$"
)
EXPECTED_CLASSES = {
    "MPCLSegmentation": "ScriptedLoadableModule",
    "MPCLSegmentationWidget": "ScriptedLoadableModuleWidget",
    "MPCLSegmentationLogic": "ScriptedLoadableModuleLogic",
    "MPCLSegmentationTest": "ScriptedLoadableModuleTest",
}


def _module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


def _classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _methods(cls: ast.ClassDef) -> set[str]:
    return {node.name for node in cls.body if isinstance(node, ast.FunctionDef)}


def _cmake_set(text: str, name: str) -> str:
    match = re.search(rf'set\({name}\s+"([^"]*)"\)', text)
    assert match, f"{name} is not set"
    return match.group(1)


def test_module_and_lib_parse_also_for_older_slicer_pythons():
    """Slicer < 5.10 runs Python 3.9: the module must still load there to say that mpcl needs 3.10+."""
    for path in [MODULE_FILE, *sorted((MODULE / "MPCLSegmentationLib").glob("*.py"))]:
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))


def test_module_defines_the_classes_slicer_expects():
    classes = _classes(_module_tree())
    for name, base in EXPECTED_CLASSES.items():
        assert name in classes, f"{MODULE_FILE.name} has no class {name}"
        bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in classes[name].bases]
        assert base in bases, f"{name} must derive from {base}, derives from {bases}"
    assert {"setup", "cleanup", "onApplyButton", "onCancelButton"} <= _methods(
        classes["MPCLSegmentationWidget"]
    )
    assert {"process", "prepare", "finish", "saveSegmentation"} <= _methods(classes["MPCLSegmentationLogic"])
    test_methods = _methods(classes["MPCLSegmentationTest"])
    assert {"setUp", "runTest"} <= test_methods and any(m.startswith("test_") for m in test_methods)
    assigned = {
        node.targets[0].attr: node.value
        for node in ast.walk(classes["MPCLSegmentation"])
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)
    }
    assert {"title", "categories", "contributors", "helpText"} <= set(assigned)
    categories = [n.value for n in ast.walk(assigned["categories"]) if isinstance(n, ast.Constant)]
    assert "Segmentation" in categories


def test_ui_file_is_valid_and_has_every_widget_the_module_uses():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.findtext("class") == "MPCLSegmentation"
    top = root.find("widget")
    assert (top.get("class"), top.get("name")) == ("qMRMLWidget", "MPCLSegmentation")
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used, "the widget uses no .ui elements"
    missing = sorted(used - set(widgets))
    assert not missing, f"{UI_FILE.name} lacks widgets the module uses: {missing}"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    custom = {cls for cls in widgets.values() if not cls.startswith("Q")}
    assert custom <= declared, f"custom widgets not declared: {sorted(custom - declared)}"
    connected = {
        c.findtext("receiver")
        for c in root.iter("connection")
        if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
    }
    mrml_widgets = {name for name, cls in widgets.items() if cls.startswith("qMRML") and cls != "qMRMLWidget"}
    assert mrml_widgets and mrml_widgets <= connected, "every MRML widget needs the scene connection"


def test_module_cmake_lists_every_script_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert "set(MODULE_NAME MPCLSegmentation)" in text
    listed = {
        line.strip().replace("${MODULE_NAME}", "MPCLSegmentation")
        for line in text.splitlines()
        if line.strip().startswith(("${MODULE_NAME}", "Resources/"))
    }
    scripts = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*.py")}
    resources = {p.relative_to(MODULE).as_posix() for p in (MODULE / "Resources").rglob("*") if p.is_file()}
    assert listed == scripts | resources, (
        f"CMakeLists.txt and the files on disk differ: {listed ^ (scripts | resources)}"
    )


def test_extension_cmake_and_index_entry_agree():
    text = (EXTENSION / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"^project\(MPCL\)$", text, re.MULTILINE)
    assert "find_package(Slicer REQUIRED)" in text and "add_subdirectory(MPCLSegmentation)" in text
    assert "${Slicer_EXTENSION_GENERATE_CONFIG}" in text and "${Slicer_EXTENSION_CPACK}" in text
    for name in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
    ):
        assert _cmake_set(text, name), f"{name} is empty"
    assert _cmake_set(text, "EXTENSION_CATEGORY") == "Segmentation"
    assert _cmake_set(text, "EXTENSION_DEPENDS") == "NA"
    repository = _cmake_set(text, "MPCL_REPOSITORY_URL")
    icon = _cmake_set(text, "EXTENSION_ICONURL")  # a literal raw-file address: the index reads it as text
    raw = repository.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert icon.startswith(raw), f"EXTENSION_ICONURL {icon} is not a raw file of {repository}"
    icon_path = icon.removeprefix(raw)
    assert (EXTENSION.parents[1] / icon_path).is_file(), f"EXTENSION_ICONURL points at a missing {icon_path}"
    root = (EXTENSION.parents[1] / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "add_subdirectory(plugins/slicer/MPCLSegmentation)" in root  # the index builds the root
    for name in (
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_CATEGORY",
    ):
        assert _cmake_set(root, name) == _cmake_set(text, name), f"{name} differs from the root's"

    entry_path = EXTENSION / "MPCL.json"  # named after the extension (the CMake project)
    entry = json.loads(entry_path.read_text(encoding="utf-8"))
    assert CATALOG_REQUIRED <= set(entry), f"missing required keys {CATALOG_REQUIRED - set(entry)}"
    assert set(entry) <= set(CATALOG_TYPES), f"keys the schema forbids: {set(entry) - set(CATALOG_TYPES)}"
    for key, value in entry.items():
        assert isinstance(value, CATALOG_TYPES[key]), f"{key} must be a {CATALOG_TYPES[key].__name__}"
    assert SCHEMA_URL.match(entry["$schema"]), entry["$schema"]
    assert entry.get("scm_type", "git") in ("git", "local") and entry.get("tier", 1) in (1, 3, 5)
    assert all(isinstance(item, str) for item in entry.get("build_dependencies", []))
    assert entry["category"] == "Segmentation"
    assert entry["scm_url"] == repository, "MPCL.json scm_url and CMake MPCL_REPOSITORY_URL differ"
    assert not list(EXTENSION.glob("*.s4ext")), "the .s4ext format is retired"


def test_icon_is_a_128_pixel_png():
    data = (MODULE / "Resources" / "Icons" / "MPCLSegmentation.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


def test_shipped_test_model_is_valid_and_reproducible(tmp_path):
    from MPCLSegmentationLib import testdata

    from mpcl.model_package import load_model_package

    shipped = testdata.default_test_model()
    package = load_model_package(shipped)  # validates model.json and the ONNX checksum
    assert package.class_names == list(testdata.CLASS_NAMES)
    assert package.patch_size == testdata.SAMPLE_SHAPE[1:]
    pytest.importorskip("onnx", reason="regenerating the test model needs onnx (the export extra)")
    fresh = testdata.write_test_model(tmp_path / "model")
    assert (fresh / "model.onnx").read_bytes() == (shipped / "model.onnx").read_bytes()
    regenerated, committed = (json.loads((path / "model.json").read_text()) for path in (fresh, shipped))
    regenerated.pop("mpcl_version"), committed.pop("mpcl_version")  # a version bump needs no new test data
    assert regenerated == committed


def test_readme_documents_loading_and_building():
    text = (EXTENSION / "README.md").read_text(encoding="utf-8")
    for needle in (
        "Add module path",
        "Slicer_DIR",
        "MPCL.json",
        "slicer-core",
        "selfTests['MPCLSegmentation']",
        "Resources/Wheels",
        "allowVersionMismatch",
    ):
        assert needle in text, f"README.md does not mention {needle!r}"
