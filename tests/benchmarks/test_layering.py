"""The benchmarks' layering, read from their imports (`ast`, nothing run).

Imports point downward: `suites` → `workloads` → `harness` → `keras_collab`.
The harness and the suites import no Keras, backend or `keras_collab` (which
imports Keras) at module level: a `--backend-all` parent imports them before
any backend is chosen.
"""

import ast
import pathlib

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"

# Lower folders first; `benchmarks/__main__.py` and `__init__.py` sit on top.
FOLDERS = ("harness", "workloads", "suites")
RANK = {folder: rank for rank, folder in enumerate(FOLDERS)}
KERAS_IMPORTERS = {"keras", "keras_collab", "jax", "torch", "tensorflow"}


def _folder(module):
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "benchmarks":
        return None
    return parts[1] if parts[1] in RANK else None


def _module_name(path):
    parts = path.relative_to(BENCHMARKS.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(tree, top_level_only=False):
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, "relative import"
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


TREES = {
    _module_name(path): ast.parse(path.read_text(), filename=str(path))
    for path in BENCHMARKS.rglob("*.py")
    if "results" not in path.relative_to(BENCHMARKS).parts
}


def test_every_module_sits_in_a_folder():
    top = {"benchmarks", "benchmarks.__main__"}
    assert {m for m in TREES if _folder(m) is None} == top


@pytest.mark.parametrize("module", sorted(TREES))
def test_imports_point_down(module):
    folder = _folder(module)
    if folder is None:
        return
    upward = [
        name
        for name in _imports(TREES[module])
        if _folder(name) is not None and RANK[_folder(name)] > RANK[folder]
    ]
    assert not upward, f"{module} imports upward: {upward}"


@pytest.mark.parametrize(
    "module",
    sorted(m for m in TREES if _folder(m) in ("harness", "suites")),
)
def test_no_backend_imported_at_module_level(module):
    backends = [
        name
        for name in _imports(TREES[module], top_level_only=True)
        if name.split(".")[0] in KERAS_IMPORTERS
    ]
    assert not backends, f"{module} imports {backends} at module level"


def test_the_layering_test_sees_violations():
    tree = ast.parse("from benchmarks.suites import fidelity\n")
    (name,) = _imports(tree)
    assert RANK[_folder(name)] > RANK["workloads"]
