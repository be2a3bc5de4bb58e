"""The package's layers, and that no module reaches above its own.

Lowest first:

0. runtime: ``mpcl`` outside the subpackages below (I/O, Segmenter, backends, ``mpcl-segment``); imports
   without torch. The torch backend may import the model core inside a function, when it loads a
   checkpoint; nothing in the runtime imports training or export.
1. model core: ``mpcl.nn`` (networks, network spec, batch-norm folding, checkpoint format).
2. training: ``mpcl.training``; never the export.
3. export: ``mpcl.export``.
4. commands: ``mpcl.training.cli`` (``mpcl-train`` trains, then writes the package; ``mpcl-eval``).

Checked twice: each layer is imported in a fresh interpreter with every layer above it (and torch, for
the runtime) blocked by a meta-path finder, and every import statement of every module, including those
inside functions, is read from the source and held to the same order. The same reading checks that the
imports form no cycle and that no module takes a private name from another package.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# pyproject's package-dir: training/ ships as mpcl.training and export/ as mpcl.export
SOURCE_ROOTS = {"mpcl": REPO / "mpcl", "mpcl.training": REPO / "training", "mpcl.export": REPO / "export"}
LAYER_NAMES = ("runtime", "model core", "training", "export", "commands")
COMMANDS = ("mpcl.training.cli",)
# runtime modules that need an optional extra to be imported at all (mpcl[gpu]: torch and triton); the
# torch backend imports them when the fused kernels run
NEEDS_GPU_EXTRA = ("mpcl.kernels.triton_head", "mpcl.kernels.triton_preprocess")


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (source file, is a package)."""
    found = {}
    for package, folder in SOURCE_ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found[".".join([package, *parts])] = (path, is_package)
    return found


MODULES = _modules()


def layer_of(name: str) -> int:
    if name in COMMANDS or name.startswith(tuple(f"{command}." for command in COMMANDS)):
        return 4
    for layer, package in ((3, "mpcl.export"), (2, "mpcl.training"), (1, "mpcl.nn")):
        if name == package or name.startswith(package + "."):
            return layer
    return 0


def _in_layer(layer: int) -> list[str]:
    return [name for name in MODULES if layer_of(name) == layer]


def _blocked_above(layer: int) -> list[str]:
    """Module prefixes a layer must not reach: every higher layer (and torch, for the runtime)."""
    blocked = [name for name in ("mpcl.nn", "mpcl.training", "mpcl.export") if layer_of(name) > layer]
    blocked += [command for command in COMMANDS if layer < 4]
    if layer == 0:
        blocked += ["torch", "triton", "tensorrt"]
    return blocked


_IMPORT_WITH_BLOCKS = textwrap.dedent(
    """
    import importlib, json, sys, traceback

    blocked, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    reached = []

    def is_blocked(name):
        return any(name == prefix or name.startswith(prefix + ".") for prefix in blocked)

    class Block:
        def find_spec(self, name, path=None, target=None):
            if is_blocked(name):
                reached.append(name)
                raise ImportError(f"{name} is blocked (a higher layer)")
            return None

    sys.meta_path.insert(0, Block())
    failed = {}
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception:
            failed[module] = traceback.format_exc(limit=-3)
    loaded = sorted(name for name in sys.modules if is_blocked(name))
    print(json.dumps({"failed": failed, "reached": sorted(set(reached)), "loaded": loaded}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("layer", range(len(LAYER_NAMES) - 1), ids=LAYER_NAMES[:-1])
def test_each_layer_imports_with_the_layers_above_blocked(layer):
    modules = [name for name in _in_layer(layer) if name not in NEEDS_GPU_EXTRA]
    blocked = _blocked_above(layer)
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_WITH_BLOCKS, json.dumps(blocked), json.dumps(modules)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failed"] == {}, "\n".join(report["failed"].values())
    assert report["reached"] == [] and report["loaded"] == [], report
    assert len(modules) >= 3  # the layer was really imported


def test_import_mpcl_imports_no_torch_and_no_higher_layer():
    code = (
        "import sys, mpcl, mpcl.segmenter, mpcl.cli_segment, mpcl.backends.torch_backend\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'torch' or n.startswith(('mpcl.nn', "
        "'mpcl.training', 'mpcl.export'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _imports(name: str) -> list[tuple[str, bool, list[str]]]:
    """(imported module, at module level, names taken from it) for every import statement of ``name``
    that names an mpcl module, including imports inside functions and ``if TYPE_CHECKING`` blocks."""
    path, is_package = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if is_package else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, id(node) in top_level, []))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{node.module}" if node.module else anchor
            names = [alias.name for alias in node.names]
            found.append((base, id(node) in top_level, names))
            for imported in names:  # `from package import module`
                if f"{base}.{imported}" in MODULES:
                    found.append((f"{base}.{imported}", id(node) in top_level, []))
    return [entry for entry in found if entry[0] == "mpcl" or entry[0].startswith("mpcl.")]


def _module_of(imported: str) -> str:
    while imported not in MODULES and "." in imported:
        imported = imported.rpartition(".")[0]
    return imported


def test_no_module_imports_a_higher_layer_even_inside_a_function():
    wrong = []
    for name in MODULES:
        for imported, at_top, _ in _imports(name):
            target = _module_of(imported)
            if layer_of(target) <= layer_of(name):
                continue
            # the runtime's torch backend builds networks from the model core, when torch is there
            if layer_of(name) == 0 and layer_of(target) == 1 and not at_top:
                continue
            where = "" if at_top else " (inside a function)"
            wrong.append(
                f"{name} ({LAYER_NAMES[layer_of(name)]}) imports {target} "
                f"({LAYER_NAMES[layer_of(target)]}){where}"
            )
    assert wrong == []


def test_runtime_modules_import_torch_only_inside_functions():
    wrong = []
    for name in _in_layer(0):
        if name in NEEDS_GPU_EXTRA:
            continue
        tree = ast.parse(MODULES[name][0].read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Import):
                heavy = [alias.name for alias in node.names if alias.name.split(".")[0] == "torch"]
            elif isinstance(node, ast.ImportFrom):
                heavy = [node.module] if (node.module or "").split(".")[0] == "torch" else []
            else:
                heavy = []
            wrong += [f"{name} imports {module} at module level" for module in heavy]
    assert wrong == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_the_imports_form_no_cycle_even_through_function_level_imports():
    graph = {name: {_module_of(imported) for imported, _, _ in _imports(name)} - {name} for name in MODULES}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_takes_a_private_name_from_another_package():
    wrong = []
    for name in MODULES:
        own_package = name if MODULES[name][1] else name.rpartition(".")[0]
        for imported, _, names in _imports(name):
            source = _module_of(imported)
            source_package = source if MODULES[source][1] else source.rpartition(".")[0]
            private = [item for item in names if item.startswith("_") and not item.startswith("__")]
            if private and source_package != own_package:
                wrong.append(f"{name} imports {private} from {source}")
    assert wrong == []


def test_a_checkpoint_pickles_no_mpcl_class(tmp_path):
    """Checkpoints are plain dicts of tensors and values (loaded with weights_only=True), so moving a
    network or the checkpoint code to another module never breaks a saved checkpoint."""
    torch = pytest.importorskip("torch")
    import zipfile

    from mpcl.nn.checkpoint import build_metadata, load_checkpoint, save_checkpoint
    from mpcl.nn.unet import UNet

    config = {"data": {"patch_size": [32, 32]}, "model": {"channels": [4, 8, 8, 16, 16]}}
    network = UNet(1, 2, (4, 8, 8, 16, 16))
    metadata = build_metadata(config, ["background", "a"], {"scheme": "minmax"}, "supervised")
    path = save_checkpoint(
        tmp_path / "best.pt",
        {"student": network.state_dict(), "metadata": metadata, "config": config, "iteration": 1},
    )
    with zipfile.ZipFile(path) as archive:
        pickled = b"".join(archive.read(item) for item in archive.namelist() if item.endswith(".pkl"))
    assert b"mpcl" not in pickled.replace(b"mpcl_version", b"").replace(b"mpcl-checkpoint", b"")
    state = load_checkpoint(path)
    for key, value in network.state_dict().items():
        assert torch.equal(state["student"][key], value), key
