#!/usr/bin/env python3
"""Check the 3D Slicer extension against the Extensions Index's description rules, offline.

The index (Slicer/ExtensionsIndex, scripts/check_description_files.py) clones the repository named by
the extension's JSON entry and reads the *root* ``CMakeLists.txt`` as text: ``project(NAME)`` must be
the entry's file name, ``set(EXTENSION_ICONURL "...")`` and ``set(EXTENSION_SCREENSHOTURLS "...")``
must be literal ``http(s)`` addresses of images, and a license file must sit at the root. It fetches
those addresses; this script cannot (CI runs offline), so it requires raw-file addresses of *this*
repository (``https://raw.githubusercontent.com/OWNER/REPO/REVISION/PATH``) and checks the files they
name here instead: the icon a 128x128 PNG, each screenshot a PNG, JPEG or GIF image.

Also checked: the entry's required keys, ``https``/``git`` ``scm_url``, category, an extension name not
starting with "Slicer", every ``EXTENSION_*`` variable set to a literal (the index never expands
``${...}``), the same values in ``plugins/slicer/CMakeLists.txt`` (the extension built on its own),
a LICENSE that is the license ``pyproject.toml`` declares, and the step that bundles the runtime: the
module's ``CMakeLists.txt`` builds the ``mpcl`` wheel from this source tree at build time
(``add_custom_command`` running ``plugins/slicer/Utilities/build_runtime_wheel.py``, in the default
``ALL`` build, rebuilt when any folder of ``pyproject.toml``'s ``package-dir`` changes) and installs it
into the module's ``Resources/Wheels``. A repository name not starting with
"Slicer" is what the index warns about; it is reported here as a warning, since renaming the
repository is not a change to this tree.

Usage: ``python .ci/check_slicer_extension.py [--root DIR] [--entry plugins/slicer/MPCL.json]``.
Exit status 0 when every rule holds, 1 (one sentence per defect on stderr) otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
import urllib.parse
from pathlib import Path

ENTRY = "plugins/slicer/MPCL.json"
EXTENSION_CMAKE = "plugins/slicer/CMakeLists.txt"
MODULE_CMAKE = "plugins/slicer/MPCLSegmentation/CMakeLists.txt"
WHEEL_SCRIPT = "plugins/slicer/Utilities/build_runtime_wheel.py"
WHEELS_FOLDER = "Resources/Wheels"
VERSION_FILE = "mpcl-version.txt"
LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
REQUIRED_ENTRY_KEYS = ("$schema", "category", "scm_url")
REQUIRED_VARIABLES = (
    "EXTENSION_HOMEPAGE",
    "EXTENSION_CATEGORY",
    "EXTENSION_CONTRIBUTORS",
    "EXTENSION_DESCRIPTION",
    "EXTENSION_ICONURL",
    "EXTENSION_SCREENSHOTURLS",
    "EXTENSION_DEPENDS",
)
URL_VARIABLES = ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS")
# Categories the index accepts that suit a segmentation extension (its full list is longer).
KNOWN_CATEGORIES = ("Segmentation", "Cardiac", "Quantification", "Analysis", "Utilities")
ICON_SIZE = (128, 128)
RAW_GITHUB = re.compile(
    r"^https://raw\.githubusercontent\.com/(?P<owner>[^/]+)/(?P<repo>[^/]+)/[^/]+/(?P<path>.+)$"
)
PROJECT = re.compile(r"^\s*project\s*\(\s*([^\s)]+)", re.IGNORECASE | re.MULTILINE)
LICENSE_MARKERS = {  # pyproject's license -> text the license file must hold
    "Apache-2.0": ("Apache License", "Version 2.0, January 2004", "TERMS AND CONDITIONS FOR USE"),
    "MIT": ("Permission is hereby granted, free of charge",),
    "BSD-3-Clause": ("Redistribution and use in source and binary forms",),
}


def cmake_variable(text: str, name: str) -> str | None:
    """The value of ``set(NAME "value")`` as the index reads it (first match), or None if not set so."""
    match = re.search(rf'^\s*set\s*\(\s*{name}\s+"([^"]*)"\s*\)', text, re.IGNORECASE | re.MULTILINE)
    return match.group(1) if match else None


def cmake_code(text: str) -> str:
    """CMake text without its comments (a ``#`` outside a quoted string starts one)."""
    lines = []
    for line in text.splitlines():
        quoted = False
        for index, char in enumerate(line):
            if char == '"':
                quoted = not quoted
            elif char == "#" and not quoted:
                line = line[:index]
                break
        lines.append(line)
    return "\n".join(lines)


def cmake_expand(text: str) -> str:
    """``${NAME}`` replaced by the value of ``set(NAME value)`` in the same text (one-value sets only),
    so that a check can follow a path kept in a variable; other references stay as they are."""
    values = {}
    for name, value in re.findall(r'^\s*set\s*\(\s*(\w+)\s+("[^"]*"|[^\s)"]+)\s*\)', text, re.MULTILINE):
        values[name] = value.strip('"')
    for _ in range(5):  # values may refer to one another
        expanded = re.sub(r"\$\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), text)
        if expanded == text:
            break
        text = expanded
    return text


def cmake_calls(text: str, command: str) -> list[str]:
    """The argument text of every ``command( ... )`` call (parentheses balanced, quotes respected)."""
    bodies = []
    for match in re.finditer(rf"(?<![\w$]){command}\s*\(", text, re.IGNORECASE):
        depth, quoted, start = 1, False, match.end()
        for index in range(start, len(text)):
            char = text[index]
            if char == '"':
                quoted = not quoted
            elif not quoted and char == "(":
                depth += 1
            elif not quoted and char == ")":
                depth -= 1
                if depth == 0:
                    bodies.append(text[start:index])
                    break
    return bodies


def image_kind(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def png_size(data: bytes) -> tuple[int, int] | None:
    if image_kind(data) != "png" or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def _repository(scm_url: str) -> tuple[str, str] | None:
    parts = urllib.parse.urlsplit(scm_url)
    path = parts.path.strip("/").removesuffix(".git").split("/")
    if parts.netloc.lower() != "github.com" or len(path) != 2:
        return None
    return path[0], path[1]


class Checker:
    def __init__(self, root: Path, entry: str = ENTRY) -> None:
        self.root = root
        self.entry_path = root / entry
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, sentence: str) -> None:
        self.errors.append(sentence)

    def run(self) -> bool:
        entry = self.check_entry()
        if entry is not None:
            name = self.entry_path.stem
            variables = self.check_root_cmake(name, entry)
            self.check_extension_cmake(variables)
        self.check_runtime_wheel()
        self.check_license()
        return not self.errors

    # -- the index entry ----------------------------------------------------------------------------
    def check_entry(self) -> dict | None:
        if not self.entry_path.is_file():
            self.error(f"The Extensions Index entry {self.entry_path} is missing.")
            return None
        raw = self.entry_path.read_bytes()
        try:
            entry = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            self.error(f"{self.entry_path.name} is not valid JSON ({error}).")
            return None
        if b"\r" in raw:
            self.error(f"{self.entry_path.name} has CR line endings; the index requires LF only.")
        if not isinstance(entry, dict):
            self.error(f"{self.entry_path.name} must hold a JSON object.")
            return None
        missing = [key for key in REQUIRED_ENTRY_KEYS if not entry.get(key)]
        if missing:
            self.error(f"{self.entry_path.name} lacks the required key(s) {', '.join(missing)}.")
        scm_url = str(entry.get("scm_url", ""))
        if scm_url and urllib.parse.urlsplit(scm_url).scheme not in ("https", "git"):
            self.error(f"scm_url {scm_url!r} must be an https:// or git:// address.")
        category = entry.get("category")
        if category and category not in KNOWN_CATEGORIES:
            self.error(f"Category {category!r} is not one the Extensions Index accepts here.")
        name = self.entry_path.stem
        if name.lower().startswith("slicer"):
            self.error(f"The extension name {name!r} must not start with 'Slicer'.")
        repository = _repository(scm_url)
        if repository and not repository[1].startswith("Slicer"):
            self.warnings.append(
                f"The repository name {repository[1]!r} does not start with 'Slicer', which the index "
                "asks of new extensions (it keeps a list of exceptions)."
            )
        return entry

    # -- the root CMakeLists.txt, which the index reads -----------------------------------------------
    def check_root_cmake(self, name: str, entry: dict) -> dict[str, str]:
        path = self.root / "CMakeLists.txt"
        if not path.is_file():
            self.error("The repository root has no CMakeLists.txt; the Extensions Index reads the root's.")
            return {}
        text = path.read_text(encoding="utf-8", errors="replace")
        projects = PROJECT.findall(text)
        if not projects:
            self.error("The root CMakeLists.txt declares no project(); it must be project(" + name + ").")
        elif projects[0].strip("\"'") != name:
            self.error(
                f"The root CMakeLists.txt project name {projects[0]!r} differs from the entry's "
                f"name {name!r}."
            )
        variables: dict[str, str] = {}
        for variable in REQUIRED_VARIABLES:
            value = cmake_variable(text, variable)
            if value is None:
                self.error(f'The root CMakeLists.txt does not set {variable} to a literal "..." value.')
                continue
            variables[variable] = value
            if not value.strip():
                self.error(f"{variable} is empty in the root CMakeLists.txt.")
            elif "${" in value:
                self.error(
                    f"{variable} uses a CMake variable ({value!r}); the index reads the file as text and "
                    "needs the literal value."
                )
        for variable in URL_VARIABLES:
            for url in variables.get(variable, "").split():
                if "${" not in url and not url.startswith("https://"):
                    self.error(f"{variable} address {url!r} must start with https://.")
        if entry.get("category") and variables.get("EXTENSION_CATEGORY") not in (None, entry["category"]):
            self.error(
                f"EXTENSION_CATEGORY {variables['EXTENSION_CATEGORY']!r} differs from the entry's category "
                f"{entry['category']!r}."
            )
        repository = _repository(str(entry.get("scm_url", "")))
        icon = variables.get("EXTENSION_ICONURL", "")
        if icon and "${" not in icon and icon.startswith("https://"):
            data = self.raw_file("EXTENSION_ICONURL", icon, repository)
            if data is not None and png_size(data) != ICON_SIZE:
                self.error(f"The icon {icon} must be a {ICON_SIZE[0]}x{ICON_SIZE[1]} PNG image.")
        for url in variables.get("EXTENSION_SCREENSHOTURLS", "").split():
            if "${" in url or not url.startswith("https://"):
                continue
            data = self.raw_file("EXTENSION_SCREENSHOTURLS", url, repository)
            if data is not None and image_kind(data) is None:
                self.error(f"The screenshot {url} must be a PNG, JPEG or GIF image.")
        return variables

    def raw_file(self, variable: str, url: str, repository: tuple[str, str] | None) -> bytes | None:
        """The bytes of the file a raw address of this repository names, or None (after an error)."""
        match = RAW_GITHUB.match(url)
        if not match:
            self.error(
                f"{variable} address {url!r} is not a raw file address "
                "(https://raw.githubusercontent.com/OWNER/REPO/REVISION/PATH)."
            )
            return None
        if repository and (match["owner"], match["repo"]) != repository:
            where = "/".join(repository)
            self.error(f"{variable} address {url!r} is not in the repository {where} of scm_url.")
            return None
        path = self.root / urllib.parse.unquote(match["path"])
        if not path.is_file():
            self.error(f"{variable} names {match['path']}, which is not in the repository.")
            return None
        return path.read_bytes()

    # -- the extension's own CMakeLists.txt (built on its own) ----------------------------------------
    def check_extension_cmake(self, root_variables: dict[str, str]) -> None:
        path = self.root / EXTENSION_CMAKE
        if not path.is_file() or not root_variables:
            return
        text = path.read_text(encoding="utf-8", errors="replace")
        for variable, value in root_variables.items():
            other = cmake_variable(text, variable)
            if other is not None and other != value:
                self.error(f"{variable} differs between the root CMakeLists.txt and {EXTENSION_CMAKE}.")

    # -- the runtime wheel the extension carries --------------------------------------------------------
    def check_runtime_wheel(self) -> None:
        path = self.root / MODULE_CMAKE
        if not path.is_file():
            self.error(f"{MODULE_CMAKE} is missing; it builds the module and bundles the runtime wheel.")
            return
        text = cmake_expand(cmake_code(path.read_text(encoding="utf-8", errors="replace")))
        script_name = Path(WHEEL_SCRIPT).name
        steps = [body for body in cmake_calls(text, "add_custom_command") if script_name in body]
        if not steps:
            self.error(
                f"{MODULE_CMAKE} does not build the mpcl runtime wheel at build time (no add_custom_command "
                f"running {script_name})."
            )
        else:
            step = steps[0]
            missing = [flag for flag in ("--source", "--dest", "OUTPUT") if flag not in step]
            if missing:
                self.error(f"The runtime wheel step in {MODULE_CMAKE} lacks {', '.join(missing)}.")
            if VERSION_FILE not in step:
                self.error(f"The runtime wheel step in {MODULE_CMAKE} does not produce {VERSION_FILE}.")
            dest = re.search(r'--dest\s+"?([^"\s]+)', step)
            if dest is None or not dest.group(1).rstrip("/").endswith(WHEELS_FOLDER):
                self.error(f"The runtime wheel step in {MODULE_CMAKE} does not write to {WHEELS_FOLDER}.")
            script = re.search(rf'"?([^"\s]*{re.escape(script_name)})"?', step).group(1)
            script = script.replace("${CMAKE_CURRENT_SOURCE_DIR}", str(path.parent))
            if not Path(script).is_file():
                self.error(f"{MODULE_CMAKE} runs {script}, which is missing.")
            for folder in self.package_folders():
                if f"${{MPCL_SOURCE_ROOT}}/{folder}/" not in text:
                    self.error(
                        f"{MODULE_CMAKE} does not rebuild the runtime wheel when {folder}/ changes (a folder "
                        "of pyproject.toml's package-dir)."
                    )
        if not any(
            re.match(r"\s*\S+\s+ALL\b", body) and VERSION_FILE in body
            for body in cmake_calls(text, "add_custom_target")
        ):
            self.error(f"{MODULE_CMAKE} does not build the runtime wheel by default (an ALL target).")
        if not any(WHEELS_FOLDER in body for body in cmake_calls(text, "install")):
            self.error(f"{MODULE_CMAKE} does not install the runtime wheel into {WHEELS_FOLDER}.")

    def package_folders(self) -> list[str]:
        """The source folders of pyproject.toml's [tool.setuptools] package-dir (the wheel's contents)."""
        pyproject = self.root / "pyproject.toml"
        if not pyproject.is_file():
            return []
        text = pyproject.read_text(encoding="utf-8")
        match = re.search(r"^package-dir\s*=\s*\{([^}]*)\}", text, re.MULTILINE)
        if not match:
            return []
        folders = re.findall(r'"[^"]+"\s*=\s*"([^"/]+)', match.group(1))
        return sorted(set(folders))

    # -- the license -----------------------------------------------------------------------------------
    def check_license(self) -> None:
        found = [self.root / name for name in LICENSE_NAMES if (self.root / name).is_file()]
        if not found:
            self.error("The repository root has no LICENSE file.")
            return
        text = found[0].read_text(encoding="utf-8", errors="replace")
        declared = self.declared_license()
        markers = LICENSE_MARKERS.get(declared or "", ())
        if declared and markers and not all(marker in text for marker in markers):
            self.error(f"{found[0].name} is not the {declared} license text that pyproject.toml declares.")
        elif not text.strip():
            self.error(f"{found[0].name} is empty.")

    def declared_license(self) -> str | None:
        pyproject = self.root / "pyproject.toml"
        if not pyproject.is_file():
            return None
        text = pyproject.read_text(encoding="utf-8")
        match = re.search(r'^license\s*=\s*(?:\{\s*text\s*=\s*)?"([^"]+)"', text, re.MULTILINE)
        return match.group(1) if match else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--entry", default=ENTRY, help=f"the Extensions Index entry (default {ENTRY})")
    args = parser.parse_args(argv)
    checker = Checker(args.root, args.entry)
    ok = checker.run()
    for warning in checker.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for error in checker.errors:
        print(f"error: {error}", file=sys.stderr)
    if ok:
        print(f"Slicer extension description checks passed ({args.root}).")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
