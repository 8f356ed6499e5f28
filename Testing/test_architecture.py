"""The layout is the architecture: the engine's packages are dependency tiers, and no module imports from a tier above
its own, at the top of the file or inside a function. ``contract`` (standard library) < ``core`` (torch) < ``elastix``
(itk-elastix on SimpleITK images) < ``data`` (SimpleITK I/O, subjects, localiser, preprocessing) < ``model`` (the
bundle) < ``stages`` (ground truth, SDM fit, training, registration, cohort, evaluation) < ``cli``. The Slicer side
(``AgentRegistrationGUILib``) is above them all, outside the pip package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "AgentRegistration" / "AgentRegistrationLib"
GUI = REPO / "AgentRegistration" / "AgentRegistrationGUILib"
TIERS = ("contract", "core", "elastix", "data", "model", "stages", "cli")
SLICER_SIDE = ("slicer", "qt", "ctk", "vtk", "AgentRegistrationGUILib")
CONTRACT_ALLOWED = ("__future__",)  # beside the standard library


def _module_name(path: Path) -> str:
    parts = ("AgentRegistrationLib", *path.relative_to(ENGINE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported module, at the top of the file)`` for every import of ``path``; ``from package import module``
    names the module."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    for node in tree.body:  # ``if TYPE_CHECKING:`` blocks are read by type checkers only
        if isinstance(node, ast.If):
            top |= {id(sub) for sub in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.count(".") == 1 and node.module.startswith("AgentRegistrationLib."):
                found += [(f"{node.module}.{alias.name}", id(node) in top) for alias in node.names]
            else:
                found.append((node.module, id(node) in top))
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}: a relative import; the engine imports by absolute name")
    return found


def _tier(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "AgentRegistrationLib" or len(parts) < 2 or parts[1] not in TIERS:
        return None
    return TIERS.index(parts[1])


ENGINE_FILES = sorted(ENGINE.rglob("*.py"))


def test_every_engine_module_lives_in_a_tier_package():
    loose = [p.name for p in ENGINE.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside the tier packages: {loose}"
    assert {p.name for p in ENGINE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(TIERS)


@pytest.mark.parametrize("path", ENGINE_FILES, ids=lambda p: str(p.relative_to(ENGINE)))
def test_no_module_imports_from_a_tier_above_its_own(path):
    own = _tier(_module_name(path))
    upward = [module for module, _ in _imports(path) if (_tier(module) or -1) > (own if own is not None else 99)]
    assert not upward, f"{_module_name(path)} (tier {TIERS[own]}) imports from above: {upward}"


@pytest.mark.parametrize("path", ENGINE_FILES, ids=lambda p: str(p.relative_to(ENGINE)))
def test_the_engine_imports_nothing_of_slicer_qt_or_vtk(path):
    slicer = [m for m, _ in _imports(path) if m.split(".")[0] in SLICER_SIDE]
    assert not slicer, f"{path.relative_to(ENGINE)} imports {slicer}"


def test_the_contract_imports_only_the_standard_library():
    import sys

    for path in (ENGINE / "contract").rglob("*.py"):
        for module, _ in _imports(path):
            root = module.split(".")[0]
            assert (root in sys.stdlib_module_names or root in CONTRACT_ALLOWED
                    or module.startswith("AgentRegistrationLib.contract")), f"{path.name} imports {module}"


def test_the_top_level_imports_have_no_cycle():
    modules = {_module_name(p): p for p in ENGINE_FILES}
    graph = {name: {m for m, at_top in _imports(path) if at_top and m in modules and m != name}
             for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, [*stack, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_the_tier_check_fails_on_an_upward_import(tmp_path):
    """The check is not vacuous: a core module that imports a stage is caught."""
    core = tmp_path / "core.py"
    core.write_text("from AgentRegistrationLib.stages.training import train\n")
    imports = _imports(core)
    assert imports == [("AgentRegistrationLib.stages.training", True)]
    assert _tier(imports[0][0]) > TIERS.index("core")


def test_the_slicer_side_is_outside_the_pip_package():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'include = ["AgentRegistrationLib", "AgentRegistrationLib.*"]' in pyproject
    assert (GUI / "nodes.py").is_file() and not (ENGINE / "mrml.py").exists()
