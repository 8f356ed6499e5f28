"""The Slicer modules use only names that Slicer has, at the release named in slicer_api_<version>.json.

The names come from Slicer's, CTK's and Qt's sources (scripts/slicer_api/extract_slicer_api.py); the checks are in
slicer_conformance.py and docs/slicer-conformance.md says what they cover and what needs the Slicer application.
Each kind of check is also shown to fail on a typo planted in a temporary copy of a module's file.
"""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import slicer_conformance as conformance
from test_ui_files import MODULES, ROOT, _ui_path

GUI_LIBRARY = sorted((ROOT / "AgentRegistration" / "AgentRegistrationGUILib").glob("*.py"))


def _check_module(module: str, source: str | None = None) -> conformance.Findings:
    source = (ROOT / module / f"{module}.py").read_text() if source is None else source
    ui = conformance.ui_classes(ET.parse(_ui_path(module)).getroot())
    return conformance.check_python(source, f"{module}.py", ui, tuple(MODULES))


def _plant(text: str, old: str, new: str, tmp_path: Path, name: str) -> str:
    """``text`` with its first ``old`` replaced by ``new``, written to and read back from a temporary copy."""
    assert old in text, f"the planted typo's original {old!r} is no longer in {name}: choose another"
    copy = tmp_path / name
    copy.write_text(text.replace(old, new, 1))
    return copy.read_text()


def test_the_names_are_those_of_a_named_slicer_release():
    data = json.loads(conformance.API_FILE.read_text())
    assert conformance.API_FILE.name == f"slicer_api_{data['slicer']['version']}.json"
    assert re.fullmatch(r"\d+\.\d+\.\d+", data["slicer"]["version"])
    assert re.fullmatch(r"[0-9a-f]{40}", data["slicer"]["commit"]) and re.fullmatch(r"[0-9a-f]{40}", data["ctk"]["commit"])
    assert "extract_slicer_api.py" in data["command"]


@pytest.mark.parametrize("module", MODULES)
def test_the_module_uses_only_names_slicer_has(module):
    assert _check_module(module).problems == []


@pytest.mark.parametrize("path", GUI_LIBRARY, ids=lambda p: p.name)
def test_the_gui_library_uses_only_names_slicer_has(path):
    assert conformance.check_python(path.read_text(), path.name, None, tuple(MODULES)).problems == []


@pytest.mark.parametrize("module", MODULES)
def test_the_ui_uses_only_widget_classes_and_properties_slicer_has(module):
    assert conformance.check_ui(ET.parse(_ui_path(module)).getroot(), f"{module}.ui").problems == []


@pytest.mark.parametrize("module", MODULES)
def test_every_parameter_node_annotation_is_one_the_wrapper_serializes(module):
    assert conformance.check_parameter_node((ROOT / module / f"{module}.py").read_text(), f"{module}.py").problems == []


def test_the_checks_resolve_every_kind_of_name_the_modules_use():
    """Not vacuous: the checks above looked at names of each kind (a checker that resolved nothing would pass)."""
    checked = set()
    for module in MODULES:
        checked |= _check_module(module).checked
        checked |= conformance.check_ui(ET.parse(_ui_path(module)).getroot(), module).checked
        checked |= conformance.check_parameter_node((ROOT / module / f"{module}.py").read_text(), module).checked
    for path in GUI_LIBRARY:
        checked |= conformance.check_python(path.read_text(), path.name).checked
    kinds = {
        "slicer.util functions": r"slicer\.util\.\w+", "slicer.app members": r"slicer\.app\.\w+",
        "slicer.modules": r"slicer\.modules\.\w+(\.\w+)?", "MRML classes named in strings": r"vtkMRML\w+Node",
        "MRML methods on typed variables": r"vtkMRML\w+\.[A-Z]\w+", "Qt members on typed variables": r"Q\w+\.\w+",
        "Slicer and CTK widget properties": r"(qMRML|ctk)\w+\.\w+", "parameter node annotations": r"Annotated",
    }
    missing = [kind for kind, pattern in kinds.items() if not any(re.fullmatch(pattern, name) for name in checked)]
    assert not missing, f"no name checked of: {missing}"


# -- each check fails on a planted typo ------------------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new", "reported"), [
    ("slicer.util.loadUI(", "slicer.util.loadUi(", "slicer.util has no 'loadUi'"),
    ("qt.QTimer()", "qt.QTimer2()", "qt has no class 'QTimer2'"),
    ('.connect("clicked(bool)"', '.connect("clickd(bool)"', "has no signal 'clickd'"),
    ("slicer.mrmlScene.StartCloseEvent", "slicer.mrmlScene.StartClosingEvent", "vtkMRMLScene has no 'StartClosingEvent'"),
    ("self.parent.helpText", "self.parent.helpTxt", "qSlicerScriptedLoadableModule has no 'helpTxt'"),
    ("waitCursor=True", "waitcursor=True", "slicer.util.tryWithErrorDisplay() takes no argument 'waitcursor'"),
])
def test_a_misspelled_name_in_the_module_is_reported(tmp_path, old, new, reported):
    source = _plant((ROOT / "AgentRegistration" / "AgentRegistration.py").read_text(), old, new, tmp_path,
                    "AgentRegistration.py")
    problems = _check_module("AgentRegistration", source).problems
    assert any(reported in p for p in problems), problems


@pytest.mark.parametrize(("old", "new", "reported"), [
    ("node.CreateDefaultDisplayNodes()", "node.CreateDefaultDisplayNode()", "has no 'CreateDefaultDisplayNode'"),
    ('AddNewNodeByClass("vtkMRMLSegmentationNode"', 'AddNewNodeByClass("vtkMRMLSegmentationsNode"',
     "Slicer has no class vtkMRMLSegmentationsNode"),
    ("markups_node.GetNthControlPointPositionWorld", "markups_node.GetNthControlPointPosWorld",
     "has no 'GetNthControlPointPosWorld'"),
])
def test_a_misspelled_mrml_name_in_the_gui_library_is_reported(tmp_path, old, new, reported):
    source = _plant((ROOT / "AgentRegistration" / "AgentRegistrationGUILib" / "nodes.py").read_text(), old, new,
                    tmp_path, "nodes.py")
    problems = conformance.check_python(source, "nodes.py").problems
    assert any(reported in p for p in problems), problems


@pytest.mark.parametrize(("old", "new", "reported"), [
    ('<property name="toolTip">', '<property name="toolTips">', "no property 'toolTips'"),
    ('class="qMRMLNodeComboBox"', 'class="qMRMLNodeComboBox2"', "no widget class 'qMRMLNodeComboBox2'"),
    ("<string>vtkMRMLScalarVolumeNode</string>", "<string>vtkMRMLScalarVolume</string>",
     "nodeTypes names no MRML node class 'vtkMRMLScalarVolume'"),
    ("<slot>setMRMLScene(vtkMRMLScene*)</slot>", "<slot>setMrmlScene(vtkMRMLScene*)</slot>", "no slot 'setMrmlScene'"),
])
def test_a_misspelled_name_in_the_ui_is_reported(tmp_path, old, new, reported):
    text = _plant(_ui_path("AgentRegistration").read_text(), old, new, tmp_path, "AgentRegistration.ui")
    problems = conformance.check_ui(ET.fromstring(text), "AgentRegistration.ui").problems
    assert any(reported in p for p in problems), problems


def _parameter_class_source(module: str) -> str:
    """The module's ``@parameterNodeWrapper`` class, alone (a planted typo lands in it, not elsewhere)."""
    source = (ROOT / module / f"{module}.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", "") == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
            return "@parameterNodeWrapper\n" + ast.get_source_segment(source, node)
    raise AssertionError(f"{module}.py has no @parameterNodeWrapper class")


@pytest.mark.parametrize(("pattern", "new", "reported"), [
    (r": bool\b", ": boolean", "does not serialize 'boolean'"),
    (r"\bWithinRange\(", "WithinRnage(", "slicer.parameterNodeWrapper has no 'WithinRnage'"),
    (r": vtkMRMLScalarVolumeNode\b", ": vtkMRMLScalarVolumNode", "does not serialize 'vtkMRMLScalarVolumNode'"),
])
def test_a_misspelled_parameter_node_annotation_is_reported(tmp_path, pattern, new, reported):
    source = _parameter_class_source("AgentRegistration")
    old = re.search(pattern, source).group(0)
    problems = conformance.check_parameter_node(_plant(source, old, new, tmp_path, "parameters.py"), "parameters.py").problems
    assert any(reported in p for p in problems), problems
