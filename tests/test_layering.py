"""The package's layering, read from its imports (`ast`, nothing imported).

Each subpackage is a stage of the pipeline and may import only the stages
below it; `keras.src` appears in one module; the maths imports no Keras;
only `hub` imports KerasHub and only `kernels` imports a backend.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_collab"

# Lower stages first. `__init__`/`__main__` of the package sit on top.
STAGES = ("kernels", "layers", "decomposition", "conversion", "hub", "cli")
RANK = {stage: rank for rank, stage in enumerate(STAGES)}
# `decomposition` is NumPy only: it must not reach `layers` or `kernels`.
FORBIDDEN = {"decomposition": {"kernels", "layers"}}
COMPAT_MODULE = "keras_collab.layers._keras_compat"


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path, modules=()):
    """Absolute names of the modules `path` imports, lazily or not.

    `from a import b` imports the module `a.b` when it is one of `modules`,
    else (a function, a class) the module `a`.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: relative import")
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                names.append(name if name in modules else node.module)
    return names


PATHS = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
MODULES = {module: _imports(path, PATHS) for module, path in PATHS.items()}


def _stage(module):
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "keras_collab":
        return None
    return parts[1] if parts[1] in RANK else None


def _package_imports(module):
    return sorted(
        {name for name in MODULES[module] if name.startswith("keras_collab")}
    )


def test_every_module_belongs_to_a_stage():
    top = {"keras_collab", "keras_collab.__main__"}
    assert {m for m in MODULES if _stage(m) is None} == top


def _upward(module, imported):
    """The names in `imported` that `module` may not import."""
    stage = _stage(module)
    if stage is None:  # the package's public API and `python -m`
        return []
    return [
        name
        for name in imported
        if _stage(name) is not None
        and (
            RANK[_stage(name)] > RANK[stage]
            or _stage(name) in FORBIDDEN.get(stage, ())
        )
    ]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    upward = _upward(module, _package_imports(module))
    assert not upward, f"{module} imports upward: {upward}"


def test_no_import_cycle_between_modules():
    graph = {
        module: {
            name
            for name in _package_imports(module)
            if name in MODULES and name != module
        }
        for module in MODULES
    }
    state = {}

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = trail[trail.index(target) :] + [target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_private_keras_lives_in_one_module():
    users = sorted(
        module
        for module, names in MODULES.items()
        if any(name.startswith("keras.src") for name in names)
    )
    assert users == [COMPAT_MODULE]


def test_decomposition_imports_no_keras():
    for module, names in MODULES.items():
        if _stage(module) == "decomposition":
            keras = [n for n in names if n.split(".")[0] == "keras"]
            assert not keras, f"{module} imports {keras}"


@pytest.mark.parametrize(
    "library, stages",
    [("keras_hub", {"hub", "cli"}), ("torch", {"kernels"})],
)
def test_third_party_libraries_stay_in_their_stage(library, stages):
    for module, names in MODULES.items():
        if any(name.split(".")[0] == library for name in names):
            assert _stage(module) in stages, f"{module} imports {library}"


def test_the_layering_check_can_fail():
    layer = "keras_collab.layers.collaborative_multi_head_attention"
    assert _upward(layer, ["keras_collab.conversion.attention"])
    assert _upward("keras_collab.decomposition.cp", ["keras_collab.layers"])
    assert not _upward("keras_collab.hub.twins", ["keras_collab.conversion"])
