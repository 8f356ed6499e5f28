"""Extract the names of Slicer's Python API at one Slicer release into a small JSON file (names only, no code).

The file is what ``Testing/gui/test_slicer_conformance.py`` checks the modules against. Sources:

- Slicer at a release tag (a bare git directory of github.com/Slicer/Slicer): the ``slicer`` Python package's names
  (``Base/Python/slicer``), the parameter node wrapper's serializable types and validators, the MRML and logic
  classes (VTK-wrapped: public methods, VTK macros, enums, return classes), the Qt classes of Slicer (``qSlicer*``,
  ``qMRML*``: properties, slots, signals, ``Q_INVOKABLE``, enums, which is what PythonQt exposes) and the modules
  (``slicer.modules.<name>``, its module class and logic class);
- CTK and vtkAddon at the commits that release builds (``SuperBuild/External_CTK.cmake``, ``SuperBuild.cmake``),
  read the same way as Slicer's own classes;
- Qt 5 from its own meta-object through PyQt5 (importable when this runs: Q_PROPERTYs with ``QMetaObject``, other
  members with ``dir``), and the VTK classes the MRML classes derive from or return (``vtkObject``, ``vtkImageData``,
  ...) from the installed ``vtk``.

Usage (docs/slicer-conformance.md says how to get the sources)::

    PYTHONPATH=<a folder with PyQt5 5.15> python scripts/slicer_api/extract_slicer_api.py \
        --slicer-git Slicer.git --ctk-git CTK.git --vtkaddon-git vtkAddon.git --tag v5.12.3 \
        --out Testing/gui/slicer_api_5.12.3.json
"""

from __future__ import annotations

import argparse
import ast
import builtins
import json
import re
import subprocess
from pathlib import Path

# Members every PythonQt object has beyond its Qt class (PythonQtStdDecorators' QObject slots and the instance
# wrapper's own methods).
PYTHONQT_OBJECT_MEMBERS = ["className", "connect", "delete", "disconnect", "findChild", "findChildren", "help",
                           "metaObject", "parent", "property", "setParent", "setProperty", "tr"]
# Attributes the Slicer application sets on the ``slicer`` package at start-up (Base/Python/slicer/__init__.py's
# docstring); the application's Python also imports these submodules.
SLICER_RUNTIME_ATTRIBUTES = ["app", "mrmlScene", "modules", "moduleNames"]
QT_MODULES = ["QtCore", "QtGui", "QtWidgets", "QtNetwork"]  # the Qt modules CTK's PythonQt wraps for Slicer


class Git:
    """Read files of one commit of a bare git directory."""

    def __init__(self, git_dir: Path, ref: str):
        self.git_dir = str(git_dir)
        self.commit = self._git("rev-parse", f"{ref}^{{commit}}").strip()
        self.paths = self._git("ls-tree", "-r", "--name-only", self.commit).splitlines()

    def _git(self, *args: str) -> str:
        return subprocess.run(["git", "--git-dir", self.git_dir, *args], check=True, capture_output=True,
                              text=True, errors="replace").stdout

    def read(self, path: str) -> str:
        return self._git("show", f"{self.commit}:{path}")

    def read_many(self, paths: list[str]) -> dict[str, str]:
        """Many files in one ``git cat-file --batch`` call."""
        request = "".join(f"{self.commit}:{p}\n" for p in paths).encode()
        out = subprocess.run(["git", "--git-dir", self.git_dir, "cat-file", "--batch"], input=request,
                             check=True, capture_output=True).stdout
        texts, pos = {}, 0
        for path in paths:
            header_end = out.index(b"\n", pos)
            size = int(out[pos:header_end].split()[2])
            texts[path] = out[header_end + 1:header_end + 1 + size].decode("utf-8", "replace")
            pos = header_end + 1 + size + 1
        return texts

    def glob(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        return [p for p in self.paths if regex.fullmatch(p)]


# ---------------------------------------------------------------------------------------------- C++ headers

CLASS_HEAD = re.compile(r"\bclass\s+(?:\w+_EXPORT\s+|VTK_\w+\s+)*(\w+)\s*(?::\s*([^{;]*))?\{")
SECTION = re.compile(r"\b(public|protected|private)\s*(Q_SLOTS|slots)?\s*:|\b(Q_SIGNALS|signals)\s*:")
VTK_MACRO = re.compile(r"\b(vtk(?:Get|Set|SetAndPropagate)\w*?Macro|vtkBooleanMacro|vtkMRMLCopyContent\w*Macro|"
                       r"vtkMRMLNodeNewMacro)\s*\(\s*(\w+)\s*(?:,\s*(\w+))?")
DECLARED = re.compile(r"(?:^|[\s\*&>])(~?\w+)\s*\($")


def _strip(text: str) -> str:
    """C++ source without comments, strings and preprocessor lines."""
    text = re.sub(r""""(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|//[^\n]*|/\*.*?\*/""",
                  lambda m: '""' if m.group(0)[0] in "\"'" else " ", text, flags=re.S)
    return re.sub(r"^\s*#.*?(?<!\\)$", " ", text, flags=re.M | re.S)


def _body(text: str, start: int) -> tuple[str, str]:
    """The class body from the brace at ``start`` to its match: whole, and with nested braces (inline bodies,
    enums) replaced by ``;``."""
    depth, flat = 0, []
    for i in range(start, len(text)):
        c = text[i]
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return text[start + 1:i], "".join(flat)
        if depth == 1 and c not in "{}":
            flat.append(c)
        elif depth == 2 and c == "{":
            flat.append(";")
    return text[start + 1:], "".join(flat)


def _declared_names(statement: str) -> list[str]:
    """The function names a class-body statement declares (``void SetName(const char*)`` -> ``SetName``)."""
    statement = re.sub(r"\b(Q_INVOKABLE|virtual|static|inline|explicit|const|VTK_\w+|Q_DECL_\w+)\b", " ", statement)
    head = statement.split("(", 1)[0] + "("
    match = DECLARED.search(head.rstrip())
    if not match or match.group(1).startswith("~") or match.group(1).endswith("Macro") or match.group(1) in (
            "operator", "Q_OBJECT", "Q_DISABLE_COPY", "Q_DECLARE_PRIVATE", "Q_DECLARE_FLAGS"):
        return []
    return [match.group(1)]


def parse_classes(text: str, statements: bool = False) -> dict[str, dict]:
    """Classes of one header: bases, properties, methods (public, or slots, signals and Q_INVOKABLE for Qt
    classes), enum values, and the classes methods return (``vtkMRMLScene* GetScene()`` -> ``GetScene: vtkMRMLScene``)."""
    text = _strip(text)
    classes = {}
    for head in CLASS_HEAD.finditer(text):
        name, bases = head.group(1), head.group(2) or ""
        whole, body = _body(text, head.end() - 1)
        qt_class = "Q_OBJECT" in body or "Q_GADGET" in body or "Q_NAMESPACE" in body
        info = {"bases": [b.split()[-1] for b in bases.split(",") if b.split() and b.split()[0] == "public"],
                "properties": sorted(set(re.findall(r"Q_PROPERTY\s*\([^)]*?\b(\w+)\s+(?:READ|MEMBER)\b", body))),
                "methods": set(), "enums": set(), "returns": {}, "statements": []}
        for enum in re.finditer(r"\benum\s+(?:class\s+)?\w*\s*(?::\s*\w+\s*)?\{([^}]*)\}", whole):
            info["enums"] |= {v.split("=")[0].strip() for v in enum.group(1).split(",") if v.split("=")[0].strip()}
        access, kind = "private", None
        pos = 0
        for section in [*SECTION.finditer(body), None]:
            chunk = body[pos:section.start() if section else len(body)]
            for statement in re.split(r"[;}]", chunk):
                statement = " ".join(statement.split())
                macro = VTK_MACRO.search(statement)
                if access == "public" and not qt_class and macro:
                    info["methods"] |= _macro_methods(macro.group(1), macro.group(2))
                    if macro.group(1) == "vtkGetObjectMacro" and macro.group(3):
                        info["returns"].setdefault("Get" + macro.group(2), macro.group(3))
                    continue
                exposed = (kind in ("slots", "signals") and access in ("public", "signals")) or \
                          (access == "public" and (not qt_class or "Q_INVOKABLE" in statement))
                if exposed and "(" in statement and not statement.startswith(("enum", "friend", "typedef", "using")):
                    info["statements"].append(statement)
                    names = _declared_names(statement)
                    info["methods"] |= set(names) - {name}
                    returned = re.match(r"(?:(?:Q_INVOKABLE|virtual|static|const|VTK_\w+)\s+)*(\w+)\s*\*\s*(\w+)\s*\(",
                                        statement)
                    if returned and names and returned.group(2) == names[0] and \
                            returned.group(1).startswith(("vtk", "q", "ctk", "Q")):
                        info["returns"].setdefault(names[0], returned.group(1))
            if section is not None:
                if section.group(3):
                    access, kind = "signals", "signals"
                else:
                    access, kind = section.group(1), "slots" if section.group(2) else None
                pos = section.end()
        if not statements:
            del info["statements"]
        classes[name] = info
    return classes


def _macro_methods(macro: str, name: str) -> set[str]:
    if macro == "vtkBooleanMacro":
        return {f"{name}On", f"{name}Off"}
    if macro.startswith("vtkMRMLCopyContent"):
        return {"CopyContent", "HasCopyContent"}
    if macro == "vtkMRMLNodeNewMacro":
        return {"CreateNodeInstance", "GetNodeTagName"}
    return {("Get" if macro.startswith("vtkGet") else "Set") + name}


def decorated_members(text: str) -> dict[str, set[str]]:
    """Members a ``*PythonQtDecorators.h`` adds to Slicer's classes: ``name(qSlicerX* self, ...)`` and
    ``static_qSlicerX_name(...)`` slots."""
    members: dict[str, set[str]] = {}
    for info in parse_classes(text, statements=True).values():
        for statement in info["statements"]:
            for name in _declared_names(statement):
                first = re.search(r"\(\s*(?:const\s+)?(\w+)\s*\*", statement)
                if name.startswith("static_"):
                    owner, _, method = name[len("static_"):].partition("_")
                elif first and not name.startswith(("new_", "delete_")):
                    owner, method = first.group(1), name
                else:
                    continue
                members.setdefault(owner, set()).add(method)
    return members


def read_classes(git: Git, paths: list[str]) -> dict[str, dict]:
    """The ``vtk*``, ``q*`` and ``ctk*`` classes of these headers, with the members their PythonQt decorators add."""
    classes: dict[str, dict] = {}
    texts = git.read_many(paths)
    for path, text in texts.items():
        if not path.endswith("PythonQtDecorators.h"):
            for name, info in parse_classes(text).items():
                if name.startswith(("vtk", "q", "ctk")) and name not in classes:
                    classes[name] = info
    for path, text in texts.items():
        if path.endswith("PythonQtDecorators.h"):
            for owner, members in decorated_members(text).items():
                if owner in classes:
                    classes[owner]["methods"] |= members
    return classes


# ---------------------------------------------------------------------------------------------- Python sources


def python_names(git: Git, path: str, seen: set[str] | None = None) -> set[str]:
    """Top-level names of a Python module of the ``slicer`` package (``from .x import *`` followed)."""
    seen = seen if seen is not None else set()
    seen.add(path)
    tree = ast.parse(git.read(path))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):  # re-exported names; plain ``import x`` modules left out
            for alias in node.names:
                if alias.name == "*" and node.level == 1:
                    sub = str(Path(path).parent / f"{node.module}.py")
                    if sub not in seen:
                        names |= _exported(git, sub, seen)
                elif alias.name == "*":
                    names.add("*")  # a compiled library's classes (``from SlicerBaseLogicPython import *``): any name
                else:
                    names.add(alias.asname or alias.name.split(".")[0])
    return {n for n in names if not n.startswith("__")}


def python_keywords(git: Git, path: str) -> dict[str, list[str]]:
    """The keyword arguments each top-level function of a module takes (``"**"``: any)."""
    keywords = {}
    for node in ast.parse(git.read(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            args = node.args
            keywords[node.name] = sorted(a.arg for a in [*args.args, *args.kwonlyargs]) + (["**"] if args.kwarg else [])
    return keywords


def _exported(git: Git, path: str, seen: set[str]) -> set[str]:
    """What ``from module import *`` brings: its ``__all__``, else its public names."""
    for node in ast.parse(git.read(path)).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return {ast.literal_eval(e) for e in node.value.elts}
    return {n for n in python_names(git, path, seen) if not n.startswith("_")}


def _builtin_type(name: str) -> bool:
    value = getattr(builtins, name, None)
    return isinstance(value, type) and not issubclass(value, BaseException)


def parameter_node_types(git: Git, package: str) -> list[str]:
    """The types the parameter node wrapper's registered serializers accept: the names each ``canSerialize``
    compares its type with (``int``, ``pathlib.Path``, ``slicer.vtkMRMLNode``, ``typing.Union``, ...)."""
    names = set()
    for path in git.glob(re.escape(package) + r"/\w+\.py"):
        for node in ast.walk(ast.parse(git.read(path))):
            if isinstance(node, ast.FunctionDef) and node.name == "canSerialize":
                for sub in (sub for statement in node.body for sub in ast.walk(statement)):
                    if isinstance(sub, ast.Attribute) and sub.attr != "get_origin":
                        names.add(sub.attr)
                    elif isinstance(sub, ast.Name) and _builtin_type(sub.id):
                        names.add(sub.id)
                    elif isinstance(sub, ast.Constant) and sub.value is None:
                        names.add("None")
    return sorted(names - {"type"})


# ---------------------------------------------------------------------------------------------- Qt, VTK


def qt_classes() -> tuple[dict[str, dict], str]:
    """Qt 5's classes: bases, own Q_PROPERTYs (meta-object) and own members (``dir``) of every QObject class; other
    classes by name only."""
    import importlib

    from PyQt5 import QtCore

    classes = {}
    for module_name in QT_MODULES:
        module = importlib.import_module(f"PyQt5.{module_name}")
        for name in dir(module):
            cls = getattr(module, name)
            if not (name.startswith("Q") and isinstance(cls, type)):
                continue
            base = next((b for b in cls.__bases__ if b.__name__.startswith("Q")), None)
            info = {"bases": [base.__name__] if base else []}
            if issubclass(cls, QtCore.QObject) or name == "Qt":
                meta = getattr(cls, "staticMetaObject", None)
                if meta is not None and issubclass(cls, QtCore.QObject):
                    info["properties"] = sorted(meta.property(i).name() for i in range(meta.propertyOffset(),
                                                                                        meta.propertyCount()))
                inherited = set(dir(base)) if base else set(dir(object))
                info["methods"] = sorted(m for m in set(dir(cls)) - inherited if not m.startswith("_"))
            classes[name] = info
    return classes, f"Qt {QtCore.QT_VERSION_STR} (PyQt5 {QtCore.PYQT_VERSION_STR})"


def vtk_base_classes(names: set[str]) -> tuple[dict[str, dict], str]:
    """VTK classes the Slicer classes derive from or return (``vtkObject``, ``vtkImageData``, ...), from the
    installed VTK."""
    import vtk

    classes: dict[str, dict] = {}
    todo = [n for n in names if hasattr(vtk, n)]
    while todo:
        name = todo.pop()
        if name in classes:
            continue
        cls = getattr(vtk, name)
        base = next((b for b in cls.__bases__ if b.__name__.startswith("vtk")), None)
        inherited = set(dir(base)) if base else set(dir(object))
        classes[name] = {"bases": [base.__name__] if base else [],
                         "methods": sorted(m for m in set(dir(cls)) - inherited if not m.startswith("_"))}
        if base is not None:
            todo.append(base.__name__)
    return classes, f"VTK {vtk.vtkVersion.GetVTKVersion()} (python package)"


# ---------------------------------------------------------------------------------------------- Slicer


def slicer_modules(git: Git) -> dict[str, dict]:
    """``slicer.modules.<name>``: the module class and, for loadable modules, the logic class its createLogic makes."""
    modules = {}
    for path in git.glob(r"Modules/Loadable/(\w+)/qSlicer(\w+)Module\.h"):
        folder, header = path.split("/")[2], Path(path).stem
        name = header[len("qSlicer"):-len("Module")]
        source = path[:-2] + ".cxx"
        logic = None
        if source in git.paths:
            match = re.search(r"createLogic\(\)[^{]*\{[^}]*?(vtk\w+Logic)::New", git.read(source))
            logic = match.group(1) if match else None
        modules[name.lower()] = {"name": name, "class": header, "logic": logic, "folder": folder}
    for path in git.glob(r"Modules/Scripted/(\w+)/(\w+)\.py"):
        folder, stem = path.split("/")[2], Path(path).stem
        if stem == folder:
            modules[stem.lower()] = {"name": stem, "class": "qSlicerScriptedLoadableModule", "logic": None}
    for path in git.glob(r"Modules/CLI/(\w+)/(\w+)\.xml"):
        folder, stem = path.split("/")[2], Path(path).stem
        if stem == folder:
            modules[stem.lower()] = {"name": stem, "class": "qSlicerCLIModule", "logic": None}
    return dict(sorted(modules.items()))


def vtkaddon_commit(git: Git) -> str:
    return re.search(r"Slicer_Remote_Add\(vtkAddon[^)]*?GIT_TAG\s+(\w+)", git.read("SuperBuild.cmake")).group(1)


def ctk_commit(git: Git) -> str:
    return re.search(r"Slicer_\$\{proj\}_GIT_TAG\s+\"(\w+)\"", git.read("SuperBuild/External_CTK.cmake")).group(1)


def prune(classes: dict[str, dict]) -> None:
    """Leave out of each class what it inherits (overrides redeclare ``WriteXML``, ``Copy``... in every node class)
    and ``New`` (the class itself): the checker adds the inherited names back from the bases."""
    full: dict[str, dict[str, set]] = {}

    def inherited(name: str) -> dict[str, set]:
        if name not in full:
            info = classes.get(name, {})
            own = {k: set(info.get(k, ())) for k in ("methods", "properties", "enums")}
            for base in info.get("bases", []):
                for k, v in inherited(base).items():
                    own[k] |= v
            full[name] = own
        return full[name]

    for info in classes.values():
        base_names = [inherited(b) for b in info.get("bases", [])]
        for key in ("methods", "properties", "enums"):
            if key in info:
                info[key] = set(info[key]) - {n for b in base_names for n in b[key]} - {"New"}
        info.get("returns", {}).pop("New", None)


def finish(classes: dict[str, dict]) -> dict[str, dict]:
    """JSON-ready: sorted lists, empty entries left out."""
    out = {}
    for name in sorted(classes):
        info = classes[name]
        out[name] = {k: (sorted(v) if isinstance(v, (set, list)) else dict(sorted(v.items())))
                     for k, v in info.items() if v}
    return out


def dumps(data: dict) -> str:
    """JSON with one line per key, and per class in the class tables (readable diffs of a regenerated file)."""
    lines = []
    for key, value in data.items():
        if isinstance(value, dict) and value and all(isinstance(v, (dict, list)) for v in value.values()):
            inner = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            lines.append(f" {json.dumps(key)}: {{\n{inner}\n }}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slicer-git", type=Path, required=True, help="bare git directory of Slicer/Slicer")
    parser.add_argument("--ctk-git", type=Path, required=True, help="bare git directory of commontk/CTK")
    parser.add_argument("--vtkaddon-git", type=Path, required=True, help="bare git directory of Slicer/vtkAddon")
    parser.add_argument("--tag", required=True, help="Slicer release tag, e.g. v5.12.3")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    slicer = Git(args.slicer_git, args.tag)
    ctk = Git(args.ctk_git, ctk_commit(slicer))
    vtk_dirs = (r"(Libs/MRML/(Core|Logic|DisplayableManager)|Libs/(vtkSegmentationCore|vtkITK|vtkTeem)|Base/Logic|"
                r"Modules/Loadable/\w+/(MRML|Logic|MRMLDM|VTKWidgets))")
    vtk_like = read_classes(slicer, slicer.glob(vtk_dirs + r"/vtk\w+\.h"))
    addon = Git(args.vtkaddon_git, vtkaddon_commit(slicer))
    vtk_like.update(read_classes(addon, addon.glob(r"vtk\w+\.h")))
    q_dirs = r"(Libs/MRML/Widgets|Base/QTCore|Base/QTGUI|Modules/Loadable/\w+|Modules/Loadable/\w+/Widgets)"
    q_like = read_classes(slicer, slicer.glob(q_dirs + r"/q\w+\.h"))
    ctk_like = read_classes(ctk, [p for p in ctk.glob(r"Libs/.+/ctk\w+\.h")
                                  if "/Testing/" not in p and not p.endswith("_p.h")])
    vtk_classes = {n: i for n, i in vtk_like.items() if n.startswith("vtk")}
    outside = {b for i in vtk_classes.values() for b in [*i["bases"], *i["returns"].values()]} - set(vtk_classes)
    vtk_bases, vtk_source = vtk_base_classes(outside)
    qt, qt_source = qt_classes()

    everything = {**vtk_bases, **vtk_classes, **qt, **ctk_like, **q_like}
    inherited_from_qt = {n: dict(i) for n, i in everything.items()}
    prune(inherited_from_qt)
    for table in (vtk_bases, vtk_classes, qt, ctk_like, q_like):
        for name in table:
            table[name] = inherited_from_qt[name]

    python_dir = "Base/Python/slicer"
    python, keywords = {}, {}
    for path in slicer.glob(re.escape(python_dir) + r"/(\w+\.py|\w+/__init__\.py)"):
        module = "slicer." + path[len(python_dir) + 1:].removesuffix("/__init__.py").removesuffix(".py")
        if module != "slicer.__init__":
            python[module] = sorted(python_names(slicer, path))
            keywords.update({f"{module}.{f}": k for f, k in python_keywords(slicer, path).items()})
    wrapper = f"{python_dir}/parameterNodeWrapper"
    version = re.search(r"v?(\d+\.\d+\.\d+)", args.tag).group(1)
    data = {
        "slicer": {"version": version, "tag": args.tag, "commit": slicer.commit},
        "ctk": {"commit": ctk.commit},
        "vtkaddon": {"commit": addon.commit},
        "qt": qt_source,
        "vtk_bases": vtk_source,
        "command": ("PYTHONPATH=<PyQt5 5.15> python scripts/slicer_api/extract_slicer_api.py "
                    "--slicer-git <Slicer/Slicer.git> --ctk-git <commontk/CTK.git> --vtkaddon-git <Slicer/vtkAddon.git> "
                    f"--tag {args.tag} --out {args.out}"),
        "slicer_attributes": SLICER_RUNTIME_ATTRIBUTES + sorted(m.split(".")[1] for m in python),
        "python_modules": python,
        "python_keywords": dict(sorted(keywords.items())),
        "modules": slicer_modules(slicer),
        "parameter_node_types": parameter_node_types(slicer, wrapper),
        "pythonqt_object_members": PYTHONQT_OBJECT_MEMBERS,
        "vtk_classes": finish(vtk_classes),
        "vtk_base_classes": finish(vtk_bases),
        "slicer_qt_classes": finish({n: i for n, i in q_like.items() if n.startswith("q")}),
        "ctk_classes": finish({n: i for n, i in ctk_like.items() if n.startswith("ctk")}),
        "qt_classes": finish(qt),
    }
    args.out.write_text(dumps(data))
    print(f"{args.out}: Slicer {version} ({slicer.commit[:10]}), CTK {ctk.commit[:10]}, {qt_source}; "
          + ", ".join(f"{len(data[k])} {k}" for k in ("vtk_classes", "vtk_base_classes", "slicer_qt_classes",
                                                      "ctk_classes", "qt_classes")))


if __name__ == "__main__":
    main()
