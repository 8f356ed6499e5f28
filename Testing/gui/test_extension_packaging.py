"""The extension's packaging: the Extensions Index description is what the top-level CMakeLists.txt says, in the
index's current format; the icon and screenshot URLs point at this repository's files; no address is made up (a
placeholder is marked as one); each module's self-test is registered and reads as the first registration."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "extension_index_description.py"
MODULES = ("AgentRegistration", "AgentRegistrationTraining")
SCREENSHOTS = ("Resources/Screenshots/first_registration.png", "Resources/Screenshots/trajectory.png")

# The Extensions Index's catalog entry schema v1.0.2 (github.com/Slicer/ExtensionsIndex, schemas/, read at commit
# 07f1d1b of August 2026): its required keys, and each property with its JSON type.
SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}
SCHEMA_PROPERTIES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                     "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str, "enabled": bool,
                     "tier": int}


def _script():
    spec = importlib.util.spec_from_file_location("extension_index_description", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _script()


@pytest.fixture(scope="module")
def metadata(script):
    return script.cmake_metadata((ROOT / "CMakeLists.txt").read_text())


def test_the_index_description_in_the_repository_is_the_one_cmakelists_gives(script, metadata):
    path = script.OUTPUT_DIR / f"{metadata['PROJECT']}.json"
    assert path.is_file(), f"run python {SCRIPT.relative_to(ROOT)}"
    assert path.read_text() == script.description_text(metadata), f"run python {SCRIPT.relative_to(ROOT)}"
    assert script.main(["--check"]) == 0


def test_the_description_is_in_the_index_format(script, metadata):
    entry = json.loads(script.description_text(metadata))
    assert SCHEMA_REQUIRED <= set(entry) <= set(SCHEMA_PROPERTIES)
    for key, value in entry.items():
        assert isinstance(value, SCHEMA_PROPERTIES[key]), key
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert 1 <= entry["tier"] <= 5
    assert urlsplit(entry["scm_url"]).scheme in ("https", "git")  # the index's scm_url check
    text = script.description_text(metadata)
    assert text.endswith("}\n") and "\r" not in text and "\t" not in text


def test_the_description_is_read_from_cmakelists_values(script):
    text = """project(Demo)
    set(EXTENSION_HOMEPAGE "https://github.com/someone/SlicerDemo") # a comment
    set(EXTENSION_CATEGORY "Segmentation")
    set(EXTENSION_DEPENDS "PyTorch MONAIAuto3DSeg")
    set(EXTENSION_TIER 3)
    set(EXTENSION_BUILD_SUBDIRECTORY inner-build)"""
    metadata = script.cmake_metadata(text)
    assert metadata["PROJECT"] == "Demo"
    assert script.description(metadata) == {
        "$schema": script.SCHEMA, "build_dependencies": ["PyTorch", "MONAIAuto3DSeg"],
        "build_subdirectory": "inner-build", "category": "Segmentation", "scm_revision": "main",
        "scm_url": "https://github.com/someone/SlicerDemo.git", "tier": 3}
    assert not script.is_placeholder(metadata["EXTENSION_HOMEPAGE"])


def test_the_category_is_the_modules_category(metadata):
    for module in MODULES:
        assert f'self.parent.categories = [_("{metadata["EXTENSION_CATEGORY"]}")]' in (ROOT / module / f"{module}.py").read_text()


def test_no_address_is_made_up_a_placeholder_is_marked(script, metadata):
    """The homepage is either a real address or the reserved ``.invalid`` placeholder that CMakeLists.txt says it is;
    the icon and screenshots are files of this repository under that address."""
    homepage = metadata["EXTENSION_HOMEPAGE"]
    cmake = (ROOT / "CMakeLists.txt").read_text()
    if script.is_placeholder(homepage):
        assert "NO PUBLIC ADDRESS YET" in cmake
        assert any("no public address yet" in problem for problem in script.still_refused(metadata))
    urls = [metadata["EXTENSION_ICONURL"], *metadata["EXTENSION_SCREENSHOTURLS"].split()]
    prefix = homepage.rstrip("/") + "/raw/main/"
    assert all(url.startswith(prefix) for url in urls), urls
    assert metadata["EXTENSION_ICONURL"][len(prefix):] == "Resources/Icons/AgentRegistration.png"
    assert (ROOT / "Resources" / "Icons" / "AgentRegistration.png").is_file()
    assert tuple(url[len(prefix):] for url in metadata["EXTENSION_SCREENSHOTURLS"].split()) == SCREENSHOTS


def test_the_screenshots_are_pictures_when_they_exist():
    """The screenshots are rendered by another command; once there, they must be PNG files."""
    present = [ROOT / p for p in SCREENSHOTS if (ROOT / p).is_file()]
    for path in present:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    if not present:
        pytest.skip(f"{', '.join(SCREENSHOTS)} not rendered yet")


@pytest.mark.parametrize("module", MODULES)
def test_each_module_registers_its_self_test_with_ctest(module):
    cmake = (ROOT / module / "CMakeLists.txt").read_text()
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake
    assert "WITH_GENERIC_TESTS" in cmake


def _test_class(module: str) -> ast.ClassDef:
    tree = ast.parse((ROOT / module / f"{module}.py").read_text())
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == f"{module}Test")


def test_the_registration_self_test_is_the_first_registration():
    """Inside Slicer the module's test does what a new user does, through the widget: Load sample data, Apply (the
    shipped 3-D model), look (every output exists, the segmentation is carried, Dice improves)."""
    cls = _test_class("AgentRegistration")
    run = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "runTest")
    called = [n.func.attr for n in ast.walk(run) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    assert "test_first_registration_load_sample_apply_look" in called
    test = next(n for n in cls.body if isinstance(n, ast.FunctionDef)
                and n.name == "test_first_registration_load_sample_apply_look")
    source = ast.unparse(test)
    order = [source.index(s) for s in ("loadSampleDataButton.click()", "applyButton.click()", "lastResult")]
    assert order == sorted(order)
    for expected in ("propagated_segmentation", "warped_volume", "transform", "metrics_table", "step_sequence",
                     "'dice_after'", "'dice_none'", "prostate-3d"):
        assert expected in source, expected
    assert not re.search(r"\bskip", source)  # never skipped
