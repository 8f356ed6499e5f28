"""A user's first registration, on a real MRML scene (slicer-core), through the route the module's widget takes: Load
sample data (the shipped real pair), Apply with the module's default settings and the model it selects first, look
at what comes back. The module's own self-test does the same inside Slicer by clicking its buttons; this one runs
everywhere the tests run (the real worker, the shipped 3-D model, no Qt)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from AgentRegistrationGUILib import definitions, nodes, registration_job
from AgentRegistrationLib.contract import layout, register_folder

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is needed for the glue tests")

ROOT = Path(__file__).resolve().parents[2]
MODULE_FILE = ROOT / "AgentRegistration" / "AgentRegistration.py"


def _parameter_defaults() -> dict[str, object]:
    """The defaults of the module's parameter node fields (what a user who changes nothing gets)."""
    tree = ast.parse(MODULE_FILE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AgentRegistrationParameterNode")
    return {s.target.id: ast.literal_eval(s.value) for s in cls.body if isinstance(s, ast.AnnAssign) and s.value}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def first_registration(mrml_scene, tmp_path_factory):
    with mrml_scene() as scene:
        sample = registration_job.load_volume_pair(layout.sample_data_files(MODULE_FILE), scene)  # Load sample data
        models = layout.available_models([d / "Models" for d in layout.resource_dirs(MODULE_FILE)])
        choices = definitions.model_choices(models)
        model = layout.default_model({c.name: c.path for c in choices})  # the model the widget selects first
        hint = definitions.apply_hint(sample["fixed"], sample["moving"], model)
        p = _parameter_defaults()
        registration = registration_job.start_registration(  # Apply
            sys.executable, layout.engine_dir(MODULE_FILE), sample["fixed"], sample["moving"], model,
            fixed_segmentation=sample["fixed_label"], moving_segmentation=sample["moving_label"],
            temporary_root=tmp_path_factory.mktemp("worker"), keep_temporary_files=p["keepTemporaryFiles"],
            device="CPU" if p["device"] == "Auto" else p["device"], steps=p["steps"], seed=p["seed"],
            fuzzy_action_control=p["fuzzyActionControl"], fuzzy_k=p["fuzzyK"], save_steps=p["saveStepsEvery"])
        registration.job.wait(timeout=600)
        assert registration.job.succeeded, registration.job.error
        result = registration_job.finish_registration(registration)
        yield {"scene": scene, "sample": sample, "model": model, "hint": hint, "result": result}


def test_after_load_sample_data_apply_needs_nothing_more(first_registration):
    assert first_registration["model"].name == "prostate-3d.pt"
    assert first_registration["hint"] == ""


def test_apply_leaves_every_output_node(first_registration):
    result, scene = first_registration["result"], first_registration["scene"]
    for node in (result.warped_volume, result.transform, result.metrics_table, result.trajectory_table,
                 result.trajectory_chart, result.step_sequence, result.propagated_segmentation):
        assert node is not None and scene.IsNodePresent(node)
    assert result.propagated_segmentation.GetName() == "case17_label on case13_image"


def test_the_moving_segmentation_lands_on_the_prostate_of_the_fixed_volume(first_registration):
    """Dice of the carried segmentation with the fixed one, against the moving one where it lies unregistered."""
    sample, result = first_registration["sample"], first_registration["result"]
    fixed = sitk.GetArrayFromImage(nodes.segmentation_to_labelmap_sitk(sample["fixed_label"], sample["fixed"]))
    carried = sitk.GetArrayFromImage(nodes.segmentation_to_labelmap_sitk(result.propagated_segmentation,
                                                                         sample["fixed"]))
    moving = nodes.segmentation_to_labelmap_sitk(sample["moving_label"], sample["moving"])
    unregistered = sitk.GetArrayFromImage(sitk.Resample(moving, nodes.sitk_from_volume_node(sample["fixed"]),
                                                        sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    assert _dice(carried, fixed) > _dice(unregistered, fixed) + 0.3
    metrics = result.metrics
    assert metrics["dice_after"] > metrics["dice_none"]
    assert not register_folder.made_worse(metrics["dice_before"], metrics["dice_after"])
    assert abs(_dice(carried, fixed) - metrics["dice_after"]) < 0.02  # the engine's Dice is the one the user sees
    assert registration_job.summary_text(metrics).startswith("Done: ")
