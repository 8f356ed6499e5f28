"""The installed extension, not only the source tree: the files are laid out as the CMakeLists install them
(``slicerMacroBuildScriptedModule`` puts each module's SCRIPTS and RESOURCES, with their relative paths, in
``lib/Slicer-X.Y/qt-scripted-modules``; the extension-level ``install(FILES ...)`` go to the ``DESTINATION``
below it), and the worker runs from there on the shipped real pair with the shipped 3-D model."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from AgentRegistrationGUILib import jobs
from AgentRegistrationLib.contract import layout, register_folder, worker_commands

REPO = Path(__file__).resolve().parents[2]
MODULES = ("AgentRegistration", "AgentRegistrationTraining")
INSTALL_DIR_VARIABLE = "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}"


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: variables.get(m.group(1), m.group(0)), text)


def _installed_files(module: str) -> dict[str, Path]:
    """``{path relative to qt-scripted-modules: source file}`` of one module's CMakeLists.txt."""
    source_dir = REPO / module
    text = re.sub(r"#[^\n]*", "", (source_dir / "CMakeLists.txt").read_text())
    variables = {"MODULE_NAME": module, "PROJECT_SOURCE_DIR": str(REPO), "CMAKE_CURRENT_SOURCE_DIR": str(source_dir)}
    lists: dict[str, list[str]] = {}
    for command, body in re.findall(r"\b(set|file|list)\s*\(([^)]*)\)", text):
        words = _expand(body, variables).split()
        if command == "set" and words:
            lists[words[0]] = words[1:]
        elif command == "file" and words[0] in ("GLOB", "GLOB_RECURSE"):
            glob = "rglob" if words[0] == "GLOB_RECURSE" else "glob"
            name, rest = words[1], words[2:]
            relative = rest[1] if rest[0] == "RELATIVE" else None
            patterns = rest[2:] if relative else rest
            found = [p for pattern in patterns
                     for p in sorted(getattr(Path(pattern).parent if Path(pattern).is_absolute()
                                             else source_dir / Path(pattern).parent, glob)(Path(pattern).name))]
            lists[name] = [str(p.relative_to(relative)) if relative else str(p) for p in found]
        elif command == "list" and words[0] == "APPEND":
            lists.setdefault(words[1], []).extend(w for item in words[2:] for w in _expand_list(item, lists))
    installed: dict[str, Path] = {}
    for key in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        for item in lists.get(key, []):
            for relative in _expand_list(item, lists):
                installed[relative] = source_dir / relative
    for body in re.findall(r"\binstall\s*\(\s*FILES([^)]*)\)", text):
        words = _expand(body, variables).split()
        destination = words[words.index("DESTINATION") + 1]
        assert destination.startswith(INSTALL_DIR_VARIABLE), destination
        folder = destination[len(INSTALL_DIR_VARIABLE):].strip("/")
        for item in words[:words.index("DESTINATION")]:
            for path in _expand_list(item, lists):
                installed[f"{folder}/{Path(path).name}"] = Path(path)
    return installed


def _expand_list(item: str, lists: dict[str, list[str]]) -> list[str]:
    match = re.fullmatch(r"\$\{(\w+)\}", item)
    return list(lists.get(match.group(1), [])) if match else [item]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``qt-scripted-modules`` of an installed extension, in a temporary folder."""
    root = tmp_path_factory.mktemp("Slicer-5.8") / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    for module in MODULES:
        for relative, source in _installed_files(module).items():
            assert source.is_file(), f"{module}/CMakeLists.txt installs {source}, which does not exist"
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, root / relative)
    return root


def test_every_engine_file_and_resource_is_installed(installed):
    source = REPO / "AgentRegistration" / "AgentRegistrationLib"
    engine = {p.relative_to(source) for p in source.rglob("*.py")}
    assert {Path("cli", "__main__.py"), Path("contract", "messages.py")} <= engine  # the tier packages
    target = installed / "AgentRegistrationLib"
    assert {p.relative_to(target) for p in target.rglob("*.py")} == engine
    gui = {p.name for p in (REPO / "AgentRegistration" / "AgentRegistrationGUILib").glob("*.py")}
    assert "slicer_setup.py" in gui  # the Slicer-side code both modules import
    assert {p.name for p in (installed / "AgentRegistrationGUILib").glob("*.py")} == gui
    for relative in ("AgentRegistration.py", "AgentRegistrationTraining.py", "Resources/UI/AgentRegistration.ui",
                     "Resources/UI/AgentRegistrationTraining.ui", "Resources/requirements.txt",
                     "Resources/Models/prostate-3d.pt", "Resources/SampleData/README.md"):
        assert (installed / relative).is_file(), relative


def test_both_modules_find_the_engine_models_and_sample_data_when_installed(installed):
    for module in MODULES:
        assert layout.engine_dir(installed / f"{module}.py") == installed
    module_file = installed / "AgentRegistration.py"
    assert layout.resource_dirs(module_file)[0] == installed / "Resources"
    models = layout.available_models([d / "Models" for d in layout.resource_dirs(module_file)])
    assert layout.default_model(models) == installed / "Resources" / "Models" / "prostate-3d.pt"
    assert all(p.is_relative_to(installed) for p in layout.sample_data_files(module_file).values())


def test_the_worker_runs_from_the_installed_extension_on_the_shipped_pair(installed, tmp_path):
    module_file = installed / "AgentRegistrationTraining.py"
    env = jobs.worker_environment(layout.engine_dir(module_file))
    where = subprocess.run([sys.executable, "-c", "import AgentRegistrationLib; print(AgentRegistrationLib.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(installed)  # the installed engine, not the source tree's

    sample = layout.sample_data_files(installed / "AgentRegistration.py")
    model = installed / "Resources" / "Models" / "prostate-3d.pt"
    command = worker_commands.register_command(sys.executable, sample["fixed"], sample["moving"], model, tmp_path / "out",
                                        fixed_label=sample["fixed_label"], moving_label=sample["moving_label"],
                                        device="CPU", steps=4)
    job = jobs.WorkerJob([command], env=env).start()
    messages = job.wait(timeout=600)
    assert job.succeeded, job.error
    metrics = register_folder.read_metrics(tmp_path / "out" / register_folder.METRICS_JSON)
    assert metrics["steps"] <= 4 and 0.0 < metrics["dice_after"] <= 1.0  # the model's stop rule may end it sooner
    assert [m["done"] for m in messages if m["stage"] == "register"] == list(range(metrics["steps"] + 1))
