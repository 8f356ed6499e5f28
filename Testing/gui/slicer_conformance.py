"""Check the Slicer modules' Python and .ui files against the names of Slicer's API at one release.

The names come from ``slicer_api_<version>.json`` beside this file, extracted from Slicer's, CTK's and Qt's own
sources by ``scripts/slicer_api/extract_slicer_api.py``. Each ``check_*`` function returns a list of problems, one
line each, naming the file, the line and the unknown name; an empty list means every name it could resolve is in
that Slicer. What is resolved (see docs/slicer-conformance.md):

- attribute chains from the ``slicer``, ``qt`` and ``ctk`` modules (``slicer.util.X``, ``slicer.app.X``,
  ``slicer.modules.X.Y``, ``slicer.vtkMRMLX.Y``, ``qt.QX.Y``, ``ctk.ctkX``), ``from slicer... import X``, and the
  keyword arguments of calls to the ``slicer`` package's Python functions (``slicer.util.X(name=...)``);
- members used on expressions of a known class: variables made by ``qt.QX(...)``, ``slicer.vtkMRMLX()``,
  ``scene.AddNewNodeByClass("vtkMRMLX")``, annotated with a Slicer class, returned by a method whose return class
  the headers name, ``self.ui.<widget>`` (its class in the .ui) and ``slicer.modules.X.logic()``;
- class names in strings (``AddNewNodeByClass("vtkMRMLX")``, ``IsA``, the .ui's ``nodeTypes``);
- each .ui widget class, each property it sets, its layouts and its signal/slot connections;
- each ``@parameterNodeWrapper`` field's annotation (types the wrapper's serializers accept, its validators).
"""

from __future__ import annotations

import ast
import functools
import json
import xml.etree.ElementTree as ET
from pathlib import Path

API_FILE = next(Path(__file__).parent.glob("slicer_api_*.json"))
NODE_CLASS_CALLS = {"AddNewNodeByClass", "AddNewNodeByClassWithID", "CreateNodeByClass", "GetFirstNodeByClass",
                    "GetNodesByClass", "IsA", "getNodesByClass", "getFirstNodeByClassByName"}
NEW_NODE_CALLS = {"AddNewNodeByClass", "AddNewNodeByClassWithID", "CreateNodeByClass", "GetFirstNodeByClass"}
TYPING_CONTAINERS = {"Annotated", "Union", "Optional", "list", "tuple", "dict", "List", "Tuple", "Dict"}


class SlicerApi:
    """The names of one Slicer release, with class hierarchies resolved."""

    def __init__(self, path: Path = API_FILE):
        data = json.loads(path.read_text())
        self.version = data["slicer"]["version"]
        self.vtk = {**data["vtk_base_classes"], **data["vtk_classes"]}
        self.qt = data["qt_classes"]
        self.ctk = data["ctk_classes"]
        self.q = {**self.qt, **self.ctk, **data["slicer_qt_classes"]}
        self.slicer_names = set(data["slicer_attributes"]) | set(data["vtk_classes"]) | set(data["slicer_qt_classes"])
        self.python_modules = {k: set(v) for k, v in data["python_modules"].items()}
        self.keywords = {k: set(v) for k, v in data["python_keywords"].items()}
        self.modules = data["modules"]
        self.parameter_types = set(data["parameter_node_types"])
        self.pythonqt_members = set(data["pythonqt_object_members"])
        self._children: dict[str, set[str]] = {}
        self._cache: dict[tuple[str, str], object] = {}
        for name, info in self.vtk.items():
            for base in info.get("bases", []):
                self._children.setdefault(base, set()).add(name)

    def _table(self, cls: str) -> dict:
        return self.vtk if cls in self.vtk else self.q

    def _cached(self, kind: str, cls: str, compute):
        if (kind, cls) not in self._cache:
            self._cache[kind, cls] = compute(cls)
        return self._cache[kind, cls]

    def ancestors(self, cls: str) -> tuple[str, ...]:
        return self._cached("ancestors", cls, self._ancestors)

    def _ancestors(self, cls: str) -> tuple[str, ...]:
        info = self._table(cls).get(cls)
        if info is None:
            return ()
        return (cls, *(a for base in info.get("bases", []) for a in self.ancestors(base)))

    def members(self, cls: str) -> frozenset[str]:
        return self._cached("members", cls, self._members)

    def _members(self, cls: str) -> frozenset[str]:
        """What Python can reach on an object of ``cls``: a VTK class's methods and enum values, or a Qt class's
        properties, methods (slots, signals, Q_INVOKABLE; all public ones for Qt's own classes) and enum values;
        with the inherited ones."""
        table = self._table(cls)
        names = set(self.pythonqt_members) if cls in self.q else set()
        for name in self.ancestors(cls):
            info = table.get(name, {})
            names |= set(info.get("methods", [])) | set(info.get("properties", [])) | set(info.get("enums", []))
        return frozenset(names)

    def members_or_subclass_members(self, cls: str) -> frozenset[str]:
        return self._cached("downcast", cls, self._members_or_subclass_members)

    def _members_or_subclass_members(self, cls: str) -> frozenset[str]:
        """A VTK class's members and those of its subclasses: a variable annotated ``vtkMRMLNode`` may hold a
        markups node (``GetNumberOfControlPoints``); a misspelled name is in none of them."""
        return self.members(cls).union(*(self.members_or_subclass_members(c) for c in self._children.get(cls, ())))

    def properties(self, cls: str) -> set[str]:
        return {p for name in self.ancestors(cls) for p in self.q.get(name, {}).get("properties", [])}

    def returns(self, cls: str, method: str) -> str | None:
        """The class ``cls.method()`` returns, where the headers name one."""
        for name in self.ancestors(cls):
            returned = self._table(cls).get(name, {}).get("returns", {}).get(method)
            if returned is not None:
                return returned if returned in self.vtk or returned in self.q else None
        return None

    def is_node_class(self, cls: str) -> bool:
        return "vtkMRMLNode" in self.ancestors(cls)

    def is_class(self, cls: str) -> bool:
        return cls in self.vtk or cls in self.q


@functools.cache
def api() -> SlicerApi:
    return SlicerApi()


def _chain(node: ast.expr) -> list[str] | None:
    """``a.b.c`` -> ``["a", "b", "c"]``; None for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def _string(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


class _Types:
    """The classes of the expressions of one function. Flow-insensitive: a name has the classes its assignments
    (None aside) and its annotation give, and none when one of them is an expression the checker cannot tell."""

    def __init__(self, api: SlicerApi, ui: dict[str, str], self_types: dict[str, set[str]]):
        self.api = api
        self.ui = ui
        self.self_types = self_types
        self.names: dict[str, set[str]] = {}

    def annotation(self, node: ast.expr | None) -> set[str]:
        if node is None:
            return set()
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return self.annotation(ast.parse(node.value, mode="eval").body)
        if isinstance(node, ast.BinOp):
            return self.annotation(node.left) | self.annotation(node.right)
        if isinstance(node, ast.Subscript) and (_chain(node.value) or [""])[-1] in ("Union", "Optional"):
            elements = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            return set().union(*(self.annotation(e) for e in elements))
        chain = _chain(node)
        return {chain[-1]} if chain and self.api.is_class(chain[-1]) else set()

    def of(self, node: ast.expr) -> set[str]:
        api, chain = self.api, _chain(node)
        if chain:
            if chain[0] == "self" and len(chain) == 3 and chain[1] == "ui" and chain[2] in self.ui:
                return {self.ui[chain[2]]}
            if chain[0] == "self" and len(chain) == 2:
                return set(self.self_types.get(chain[1], ()))
            if chain == ["slicer", "mrmlScene"]:
                return {"vtkMRMLScene"}
            if chain == ["slicer", "app"]:
                return {"qSlicerApplication"}
            if chain[:2] == ["slicer", "modules"] and len(chain) == 3 and chain[2] in api.modules:
                return {api.modules[chain[2]]["class"]}
            if len(chain) == 1:
                return set(self.names.get(chain[0], ()))
            return set()
        if not isinstance(node, ast.Call):
            return set()
        func = _chain(node.func)
        if func and len(func) == 2 and func[0] in ("qt", "ctk", "slicer", "vtk") and api.is_class(func[1]):
            return {func[1]}
        if func == ["slicer", "util", "loadUI"] and "" in self.ui:
            return {self.ui[""]}
        if func and func[:2] == ["slicer", "modules"] and len(func) == 4 and func[3] == "logic":
            logic = api.modules.get(func[2], {}).get("logic")
            return {logic} if logic else set()
        if not isinstance(node.func, ast.Attribute):
            return set()
        method, owners = node.func.attr, self.of(node.func.value)
        if method in NEW_NODE_CALLS and node.args and api.is_class(_string(node.args[0]) or ""):
            return {_string(node.args[0])}
        return {r for r in (api.returns(cls, method) for cls in owners) if r}

    def learn(self, function: ast.AST) -> None:
        """The classes of the function's arguments (annotations) and assigned names."""
        arguments = {}
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for arg in [*function.args.posonlyargs, *function.args.args, *function.args.kwonlyargs]:
                arguments[arg.arg] = self.annotation(arg.annotation)
        values = {id(n.targets[0]): n.value for n in _own_nodes(function)
                  if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)}
        stores = [n for n in _own_nodes(function) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]
        for _ in range(2):  # the second pass resolves names assigned from names
            found = {name: [classes] for name, classes in arguments.items()}
            for store in stores:
                value = values.get(id(store))
                if not (isinstance(value, ast.Constant) and value.value is None):
                    found.setdefault(store.id, []).append(self.of(value) if value is not None else set())
            self.names = {k: set.union(*v) if all(v) else set() for k, v in found.items()}


def _own_nodes(scope: ast.AST):
    """The nodes of a function (or module) body, not of the functions and classes inside it."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def _scopes(tree: ast.Module):
    """(scope, enclosing class) for the module and every function."""
    yield tree, None
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield item, node
                    for inner in ast.walk(item):
                        if inner is not item and isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            yield inner, node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node in tree.body:
            yield node, None
            for inner in ast.walk(node):
                if inner is not node and isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield inner, None


def _self_types(api: SlicerApi, cls: ast.ClassDef, ui: dict[str, str]) -> dict[str, set[str]]:
    """Classes of ``self.<name>`` in a class: every assignment (None aside) gives that class. ``self.parent`` of a
    ScriptedLoadableModule is Slicer's qSlicerScriptedLoadableModule."""
    bases = {(_chain(b) or [""])[-1] for b in cls.bases}
    types: dict[str, set[str]] = {"parent": {"qSlicerScriptedLoadableModule"}} if "ScriptedLoadableModule" in bases else {}
    for _ in range(2):
        found: dict[str, list[set[str]]] = {}
        for item in ast.walk(cls):
            if not isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            scope = _Types(api, ui, types)
            scope.learn(item)
            for node in _own_nodes(item):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else []
                for target in targets:
                    chain = _chain(target)
                    if chain and len(chain) == 2 and chain[0] == "self" and not (
                            isinstance(node.value, ast.Constant) and node.value.value is None):
                        found.setdefault(chain[1], []).append(scope.of(node.value) if len(targets) == 1 else set())
        types = {**{k: set.union(*v) if all(v) else set() for k, v in found.items()},
                 **({"parent": types["parent"]} if "parent" in types and "parent" not in found else {})}
    return types


class Findings:
    """What a check looked at (``checked``: names such as ``vtkMRMLScene.GenerateUniqueName``) and what Slicer does
    not have (``problems``: one line each, naming the file, the line and the name)."""

    def __init__(self, filename: str):
        self.filename = filename
        self.checked: set[str] = set()
        self.problems: list[str] = []

    def check(self, name: str, ok: bool, text: str, node: ast.AST | None = None) -> None:
        self.checked.add(name)
        if not ok:
            where = f"{self.filename}:{node.lineno}" if node is not None else self.filename
            self.problems.append(f"{where}: {text} (Slicer {api().version})")


def check_python(source: str, filename: str, ui: dict[str, str] | None = None,
                 own_modules: tuple[str, ...] = ()) -> Findings:
    """The names one Python file uses. ``ui``: widget name -> class of the module's .ui (``""``: its top widget);
    ``own_modules``: this extension's module names (``slicer.modules.<name>`` is theirs)."""
    api_ = api()
    tree = ast.parse(source)
    found = Findings(filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "slicer" and not node.level:
            known = api_.slicer_names if node.module == "slicer" else api_.python_modules.get(node.module, set())
            for alias in node.names:
                found.check(f"{node.module}.{alias.name}", alias.name in known or "*" in known,
                            f"from {node.module} import {alias.name}: no such name", node)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "slicer" and len(parts) > 1:
                    found.check(alias.name, parts[1] in api_.slicer_names, f"no module {alias.name}", node)
        elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
            method = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            name = _string(node.args[0]) if node.args else None
            if method in NODE_CLASS_CALLS and name and name.startswith("vtk"):
                found.check(name, api_.is_class(name), f"{method}({name!r}): Slicer has no class {name}", node)
            function = ".".join(_chain(node.func) or [])
            for keyword in node.keywords if function in api_.keywords else []:
                if keyword.arg is not None:
                    found.check(f"{function}({keyword.arg}=)", keyword.arg in api_.keywords[function] or
                                "**" in api_.keywords[function], f"{function}() takes no argument {keyword.arg!r}", node)

    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        chain = _chain(node) if isinstance(node, ast.Attribute) and id(node) not in inner else None
        if chain and chain[0] in ("slicer", "qt", "ctk"):
            name, problem = _check_module_chain(api_, chain, own_modules)
            found.check(name, problem is None, problem or "", node)

    self_types_of = {}
    for scope, cls in _scopes(tree):
        if cls is not None and id(cls) not in self_types_of:
            self_types_of[id(cls)] = _self_types(api_, cls, ui or {})
        types = _Types(api_, ui or {}, self_types_of.get(id(cls), {}))
        types.learn(scope)
        for node in _own_nodes(scope):
            if isinstance(node, ast.Attribute) and (_chain(node) or [""])[0] not in ("slicer", "qt", "ctk"):
                owners = types.of(node.value)
                if owners:
                    found.check(f"{' | '.join(sorted(owners))}.{node.attr}",
                                any(node.attr in _reachable(api_, c) for c in owners),
                                f"{ast.unparse(node.value)}.{node.attr}: {' | '.join(sorted(owners))} has no "
                                f"{node.attr!r}", node)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect" \
                    and node.args and _string(node.args[0]):
                signal = _string(node.args[0]).split("(")[0]
                owners = types.of(node.func.value)
                if owners:
                    found.check(f"{' | '.join(sorted(owners))}.{signal}",
                                any(signal in _reachable(api_, c) for c in owners),
                                f"{ast.unparse(node.func.value)}.connect({_string(node.args[0])!r}): "
                                f"{' | '.join(sorted(owners))} has no signal {signal!r}", node)
    found.problems = sorted(set(found.problems))
    return found


def _reachable(api_: SlicerApi, cls: str) -> frozenset[str]:
    return api_.members_or_subclass_members(cls) if cls in api_.vtk else api_.members(cls)


def _check_module_chain(api_: SlicerApi, chain: list[str], own_modules: tuple[str, ...]) -> tuple[str, str | None]:
    """(the name checked, its problem or None) of an attribute chain from ``slicer``, ``qt`` or ``ctk``."""
    root, dotted = chain[0], ".".join(chain)
    if root in ("qt", "ctk"):
        classes = api_.qt if root == "qt" else api_.ctk
        if len(chain) < 2 or chain[1] not in classes:
            return dotted, f"{dotted}: {root} has no class {chain[1]!r}"
        if len(chain) > 2 and "methods" in classes[chain[1]]:
            ok = chain[2] in api_.members(chain[1])
            return ".".join(chain[:3]), None if ok else f"{dotted}: {chain[1]} has no {chain[2]!r}"
        return ".".join(chain[:2]), None
    name = chain[1]
    if name not in api_.slicer_names:
        return ".".join(chain[:2]), f"{dotted}: slicer has no {name!r}"
    if len(chain) < 3:
        return dotted, None
    member, checked = chain[2], ".".join(chain[:3])
    if f"slicer.{name}" in api_.python_modules:
        known = api_.python_modules[f"slicer.{name}"]
        return checked, None if member in known or "*" in known else \
            f"{dotted}: slicer.{name} has no {member!r}"
    if name == "modules":
        own = {m.lower() for m in own_modules} | {f"{m}{s}" for m in own_modules for s in ("Instance", "Widget")}
        scripted = {f"{m['name']}{s}" for m in api_.modules.values() for s in ("Instance", "Widget")
                    if m["class"] == "qSlicerScriptedLoadableModule"}
        if member in own:
            return checked, None
        if member not in api_.modules and member not in scripted:
            return checked, f"{dotted}: Slicer has no module {member!r}"
        cls = api_.modules.get(member, {}).get("class")
        if len(chain) > 3 and cls:
            return ".".join(chain[:4]), None if chain[3] in api_.members(cls) else f"{dotted}: {cls} has no {chain[3]!r}"
        return checked, None
    cls = {"app": "qSlicerApplication", "mrmlScene": "vtkMRMLScene"}.get(name, name)
    if api_.is_class(cls):
        return checked, None if member in api_.members(cls) else f"{dotted}: {cls} has no {member!r}"
    return checked, None


# ------------------------------------------------------------------------------------------------------ .ui files


def ui_classes(root: ET.Element) -> dict[str, str]:
    """Widget name -> class of a .ui file, ``""`` -> the top widget's class."""
    classes = {w.get("name"): w.get("class") for w in root.iter("widget") if w.get("name")}
    top = root.find("widget")
    if top is not None:
        classes[""] = top.get("class")
    return classes


def check_ui(root: ET.Element, filename: str) -> Findings:
    """The names one .ui file uses: widget and layout classes, the (non-dynamic) properties each widget sets, the MRML
    classes in ``nodeTypes``, and the signals and slots of its connections."""
    api_ = api()
    found = Findings(filename)
    for widget in root.iter("widget"):
        cls, name = widget.get("class"), widget.get("name")
        found.check(cls, cls in api_.q, f"widget {name}: no widget class {cls!r}")
        properties = api_.properties(cls)
        for prop in widget.findall("property"):
            if prop.get("stdset") == "0":
                continue  # a dynamic property (SlicerParameterName): test_ui_files checks its name
            found.check(f"{cls}.{prop.get('name')}", prop.get("name") in properties,
                        f"widget {name} ({cls}): no property {prop.get('name')!r}")
            if prop.get("name") == "nodeTypes":
                for node_type in prop.iter("string"):
                    found.check(node_type.text or "", api_.is_node_class(node_type.text or ""),
                                f"widget {name}: nodeTypes names no MRML node class {node_type.text!r}")
    for layout in root.iter("layout"):
        found.check(layout.get("class"), layout.get("class") in api_.qt,
                    f"layout {layout.get('name')}: no layout class {layout.get('class')!r}")
    for custom in root.iter("customwidget"):
        for tag in ("class", "extends"):
            found.check(custom.findtext(tag), custom.findtext(tag) in api_.q, f"customwidget: no class "
                                                                             f"{custom.findtext(tag)!r}")
    classes = ui_classes(root)
    for connection in root.iter("connection"):
        for end, method in (("sender", "signal"), ("receiver", "slot")):
            cls = classes.get(connection.findtext(end), "")
            name = (connection.findtext(method) or "").split("(")[0]
            found.check(f"{cls}.{name}", name in api_.members(cls),
                        f"connection {connection.findtext(end)} ({cls or 'no such widget'}): no {method} {name!r}")
    return found


# ------------------------------------------------------------------------------------------ parameter node wrapper


def check_parameter_node(source: str, filename: str) -> Findings:
    """The annotations of each ``@parameterNodeWrapper`` (and ``@parameterPack``) class: every type one the
    wrapper's serializers accept (MRML node classes included), every ``Annotated`` extra one the wrapper exports."""
    api_ = api()
    tree = ast.parse(source)
    exported = api_.python_modules["slicer.parameterNodeWrapper"]
    local = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and (
        any((_chain(d) or [""])[-1] in ("parameterPack", "parameterNodeWrapper") for d in n.decorator_list)
        or any((_chain(b) or [""])[-1] in ("Enum", "IntEnum", "StrEnum") for b in n.bases))}
    found = Findings(filename)

    def check(node: ast.expr, field: str) -> None:
        if isinstance(node, ast.Constant) and (node.value is None or node.value is Ellipsis):
            return
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            check(node.left, field)
            check(node.right, field)
            return
        if isinstance(node, ast.Subscript):
            container = (_chain(node.value) or [""])[-1]
            elements = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            found.check(container, container in TYPING_CONTAINERS,
                        f"{field}: the parameter node wrapper does not serialize {container!r}", node)
            for element in elements[:1] if container == "Annotated" else elements:
                check(element, field)
            for extra in elements[1:] if container == "Annotated" else []:
                name = (_chain(extra.func if isinstance(extra, ast.Call) else extra) or [""])[-1]
                found.check(name, name in exported, f"{field}: slicer.parameterNodeWrapper has no {name!r}", extra)
            return
        name = (_chain(node) or [""])[-1]
        found.check(name, name in api_.parameter_types or name in local or name in exported or api_.is_node_class(name),
                    f"{field}: the parameter node wrapper does not serialize {ast.unparse(node)!r}", node)

    for cls in ast.walk(tree):
        if isinstance(cls, ast.ClassDef) and any((_chain(d) or [""])[-1] in ("parameterNodeWrapper", "parameterPack")
                                                 for d in cls.decorator_list):
            for statement in cls.body:
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                    annotation = statement.annotation
                    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
                        annotation = ast.parse(annotation.value, mode="eval").body
                    check(annotation, f"{cls.name}.{statement.target.id}")
    return found
