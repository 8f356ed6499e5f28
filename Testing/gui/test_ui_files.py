"""Static checks of each module's .ui file against its module code (no Qt needed).

- the .ui parses as XML;
- every ``self.ui.<name>`` the module uses is a widget in the .ui;
- every ``SlicerParameterName`` names a field of the module's ``@parameterNodeWrapper`` class,
  every field is bound by exactly one widget, and that widget can represent the field's type;
- no dynamic (``stdset="0"``) property has a misspelled name, which would silently leave a
  widget unbound (the bug in Slicer's scripted-module template).
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = ["AgentRegistration", "AgentRegistrationTraining"]
KNOWN_DYNAMIC_PROPERTIES = {"SlicerParameterName", "SlicerPackParameterName"}

# Widget classes parameterNodeWrapper's GUI connectors accept for each field type.
NODE_WIDGETS = {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyComboBox", "qMRMLSubjectHierarchyTreeView"}
WIDGETS_FOR_TYPE = {
    "bool": {"QCheckBox", "QPushButton", "ctkCheckablePushButton"},
    "int": {"QSpinBox", "QSlider", "ctkSliderWidget", "QComboBox"},
    "float": {"ctkSliderWidget", "QDoubleSpinBox", "ctkDoubleSpinBox", "QComboBox"},
    "str": {"QLineEdit", "QTextEdit", "QComboBox"},
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
}


def _ui_path(module: str) -> Path:
    return ROOT / module / "Resources" / "UI" / f"{module}.ui"


def _module_source(module: str) -> str:
    return (ROOT / module / f"{module}.py").read_text()


def _widgets(module: str) -> dict[str, ET.Element]:
    tree = ET.parse(_ui_path(module))
    return {w.get("name"): w for w in tree.iter("widget") if w.get("name")}


def _parameter_name(widget: ET.Element) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == "SlicerParameterName":
            return prop.findtext("string")
    return None


def _parameter_fields(module: str) -> dict[str, str]:
    """Field name -> type annotation source of the module's @parameterNodeWrapper class."""
    tree = ast.parse(_module_source(module))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return {stmt.target.id: ast.unparse(stmt.annotation) for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}
    raise AssertionError(f"{module}.py has no @parameterNodeWrapper class")


def _base_type(annotation: str) -> str:
    """The unannotated type of an annotation string: 'Annotated[int, ...]' -> 'int'."""
    match = re.fullmatch(r"Annotated\[(\w+),.*\]", annotation)
    base = match.group(1) if match else annotation
    if base.startswith(("vtkMRML", "Union[vtkMRML")):
        return "node"
    return base


@pytest.mark.parametrize("module", MODULES)
def test_ui_file_parses(module):
    root = ET.parse(_ui_path(module)).getroot()
    assert root.tag == "ui"
    assert root.find("widget").get("name") == module


@pytest.mark.parametrize("module", MODULES)
def test_widget_names_are_unique(module):
    """``self.ui.<name>`` can reach one widget only: a repeated name hides all but one."""
    names = [w.get("name") for w in ET.parse(_ui_path(module)).getroot().iter("widget")]
    repeated = sorted({n for n in names if names.count(n) > 1})
    assert not repeated, f"{module}.ui repeats widget names {repeated}"


@pytest.mark.parametrize("module", MODULES)
def test_every_widget_the_code_uses_exists(module):
    used = set(re.findall(r"self\.ui\.(\w+)", _module_source(module)))
    missing = used - set(_widgets(module))
    assert used, f"{module}.py uses no ui widgets"
    assert not missing, f"{module}.py uses widgets missing from {module}.ui: {sorted(missing)}"


def _fields_set_in_code(module: str) -> dict[str, str]:
    """The module's ``FIELDS_SET_IN_CODE`` (field -> the widget the code keeps in step with it), or {}."""
    for node in ast.parse(_module_source(module)).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "FIELDS_SET_IN_CODE" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


@pytest.mark.parametrize("module", MODULES)
def test_every_parameter_field_is_bound_once(module):
    fields = _parameter_fields(module)
    bound: dict[str, list[str]] = {}
    for name, widget in _widgets(module).items():
        parameter = _parameter_name(widget)
        if parameter is not None:
            bound.setdefault(parameter, []).append(name)
    unknown = set(bound) - set(fields)
    assert not unknown, f"SlicerParameterName values with no parameter node field: {sorted(unknown)}"
    unbound = set(fields) - set(bound) - set(_fields_set_in_code(module))
    assert not unbound, f"parameter node fields bound by no widget: {sorted(unbound)}"
    twice = {k: v for k, v in bound.items() if len(v) > 1}
    assert not twice, f"fields bound by several widgets: {twice}"


@pytest.mark.parametrize("module", MODULES)
def test_bound_widgets_can_represent_their_field_type(module):
    fields = _parameter_fields(module)
    for name, widget in _widgets(module).items():
        parameter = _parameter_name(widget)
        if parameter is None:
            continue
        base = _base_type(fields[parameter])
        allowed = NODE_WIDGETS if base == "node" else WIDGETS_FOR_TYPE[base]
        assert widget.get("class") in allowed, (
            f"{name} ({widget.get('class')}) cannot represent {parameter}: {fields[parameter]}")
        if widget.get("class") == "QComboBox" and base != "node":
            assert "Choice(" in fields[parameter], f"{parameter} bound to a QComboBox needs a Choice annotation"


@pytest.mark.parametrize("module", MODULES)
def test_no_misnamed_dynamic_property(module):
    root = ET.parse(_ui_path(module)).getroot()
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("stdset") == "0":
                assert prop.get("name") in KNOWN_DYNAMIC_PROPERTIES, (
                    f"widget {widget.get('name')} has dynamic property {prop.get('name')!r}; "
                    f"did you mean one of {sorted(KNOWN_DYNAMIC_PROPERTIES)}?")


def test_the_binding_check_catches_a_misnamed_property(tmp_path):
    """The check above, run on a copy of the .ui whose one property name has a typo."""
    text = _ui_path("AgentRegistration").read_text()
    broken = text.replace('name="SlicerParameterName" stdset="0"', 'name="SlicerParamterName" stdset="0"', 1)
    assert broken != text
    root = ET.fromstring(broken)
    bound = {p.findtext("string") for p in root.iter("property") if p.get("name") == "SlicerParameterName"}
    assert set(_parameter_fields("AgentRegistration")) - bound, "a misnamed property must leave a field unbound"


@pytest.mark.parametrize("module", MODULES)
def test_module_resources_exist(module):
    assert (ROOT / module / "Resources" / "Icons" / f"{module}.png").is_file()
    cmake = (ROOT / module / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in cmake and "slicer_add_python_unittest" in cmake


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "AgentRegistration" / "AgentRegistrationGUILib").glob("*.py")
                                        if p.name != "slicer_setup.py"), ids=lambda p: p.name)
def test_the_mrml_glue_imports_no_qt_and_uses_no_slicer_app(path):
    """The Slicer-side library's glue (nodes, results, jobs, the job panel), imports inside functions too: Qt and
    ``slicer.app`` belong to the module files and ``slicer_setup``'s dialogs. (The engine imports nothing of Slicer at
    all: Testing/test_architecture.py.)"""
    tree = ast.parse(path.read_text())
    imports = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imports |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imports & {"qt", "ctk", "PythonQt"}
    uses_app = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "app"
                and isinstance(n.value, ast.Name) and n.value.id == "slicer"]
    assert not uses_app, f"{path.name} must not use slicer.app"


@pytest.mark.parametrize("module", MODULES)
def test_a_field_set_in_code_has_its_widget_and_is_written_by_it(module):
    """A field the code keeps in step with a widget (the model combo box lists models found at run time) is bound by no
    ``SlicerParameterName``, its widget exists, and the code both listens to that widget and writes the field."""
    source = _module_source(module)
    for field_name, widget_name in _fields_set_in_code(module).items():
        assert field_name in _parameter_fields(module)
        assert widget_name in _widgets(module), f"{widget_name} missing from {module}.ui"
        assert _parameter_name(_widgets(module)[widget_name]) is None
        assert f"self.ui.{widget_name}.connect(" in source, f"the code never listens to {widget_name}"
        assert re.search(rf"\.{field_name} = ", source), f"the code never writes {field_name}"
