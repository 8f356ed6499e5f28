"""The MRML glue, tested on a real MRML scene (slicer-core).

Geometry and transform conversions use a real PROMISE12 volume with a non-identity direction and a
non-zero origin (so that every RAS/LPS mistake shows) and a smooth known displacement field built here,
a known warp that must be reproduced exactly. The results section runs the real ``agentreg register``
worker (the shipped models, their stop rule off so a run takes every step) through the module Logic's route
(``registration_job.start_registration`` / ``finish_registration``) and imports the folder it really wrote.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk
from AgentRegistrationGUILib import nodes, registration_job, result_nodes
from AgentRegistrationLib.contract import layout, messages, register_folder, worker_commands

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is needed for the glue tests")


CASE = "case00"
MODULE_FILE = Path(__file__).resolve().parents[2] / "AgentRegistration" / "AgentRegistration.py"
REPO_MODELS = Path(__file__).resolve().parents[2] / "Resources" / "Models"


def _rotation(angles_deg: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _with_geometry(image: sitk.Image, direction: np.ndarray, origin, spacing) -> sitk.Image:
    out = sitk.Image(image)
    out.SetDirection(direction.ravel().tolist())
    out.SetOrigin(tuple(float(v) for v in origin))
    out.SetSpacing(tuple(float(v) for v in spacing))
    return out


@pytest.fixture(scope="module")
def promise_pair(native) -> dict[str, sitk.Image]:
    """A cropped, down-sampled PROMISE12 image and mask with oblique geometry (moving), and a
    fixed grid of the same extent with a different direction and origin."""
    image = sitk.ReadImage(str(native / f"{CASE}_image.nii.gz"))[64:192:2, 48:160:2, 6:42]
    label = sitk.ReadImage(str(native / f"{CASE}_label.nii.gz"))[64:192:2, 48:160:2, 6:42]
    spacing = (1.4, 1.4, 2.5)
    moving_direction = _rotation((10.0, -5.0, 20.0))
    moving_origin = (-31.5, 42.25, -17.0)
    moving = _with_geometry(image, moving_direction, moving_origin, spacing)
    moving_label = _with_geometry(label, moving_direction, moving_origin, spacing)
    fixed = _with_geometry(image, _rotation((4.0, 3.0, 12.0)), np.add(moving_origin, (3.0, -2.0, 1.5)), spacing)
    return {"moving": moving, "moving_label": moving_label, "fixed": fixed}


@pytest.fixture(scope="module")
def displacement(promise_pair) -> sitk.Image:
    """A smooth displacement field (LPS mm, up to ~5 mm) on the fixed grid, ITK convention."""
    fixed = promise_pair["fixed"]
    size = fixed.GetSize()
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")[::-1], axis=-1)
    direction = np.array(fixed.GetDirection()).reshape(3, 3)
    points = np.array(fixed.GetOrigin()) + (index * np.array(fixed.GetSpacing())) @ direction.T
    centre = points.reshape(-1, 3).mean(axis=0)
    rel = (points - centre) / 40.0
    field = np.stack([5.0 * np.sin(np.pi * rel[..., 1]),
                      -4.0 * np.cos(np.pi * rel[..., 0]) * np.exp(-rel[..., 2] ** 2),
                      2.0 * np.sin(np.pi * rel[..., 0] * rel[..., 1])], axis=-1)
    out = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    out.CopyInformation(fixed)
    return out


@pytest.fixture()
def scene(mrml_scene):
    with mrml_scene() as made:
        yield made


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _itk_warped_label(promise_pair, displacement) -> np.ndarray:
    transform = sitk.DisplacementFieldTransform(sitk.Image(displacement))
    warped = sitk.Resample(promise_pair["moving_label"], promise_pair["fixed"], transform,
                           sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(warped)


# ----------------------------------------------------------------------------- geometry


def test_volume_node_geometry_is_ras(scene, promise_pair):
    image = promise_pair["moving"]
    node = nodes.volume_node_from_sitk(image, scene, "moving")
    # The RAS position of voxel (i, j, k) is the LPS physical point with x and y negated.
    ijk = (5, 7, 3)
    lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    ras = np.array(ijk_to_ras.MultiplyPoint((*ijk, 1.0))[:3])
    np.testing.assert_allclose(ras, lps * np.array([-1.0, -1.0, 1.0]), atol=1e-6)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(image))


def test_ras_lps_round_trip_keeps_voxels_and_geometry(scene, promise_pair):
    image = promise_pair["moving"]
    back = nodes.sitk_from_volume_node(nodes.volume_node_from_sitk(image, scene, "moving"))
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert back.GetPixelID() == image.GetPixelID()


def test_labelmap_node_is_a_labelmap(scene, promise_pair):
    node = nodes.volume_node_from_sitk(promise_pair["moving_label"], scene, "mask", labelmap=True)
    assert node.IsA("vtkMRMLLabelMapVolumeNode")


def test_vector_image_is_refused_as_volume(scene, displacement):
    with pytest.raises(ValueError, match="components"):
        nodes.volume_node_from_sitk(displacement, scene, "field")


def test_segmentation_round_trip_on_reference_grid(scene, promise_pair):
    moving_node = nodes.volume_node_from_sitk(promise_pair["moving"], scene, "moving")
    segmentation = nodes.segmentation_node_from_labelmap_sitk(promise_pair["moving_label"], scene,
                                                             "mask", moving_node)
    label = nodes.segmentation_to_labelmap_sitk(segmentation, moving_node)
    assert label.GetSize() == promise_pair["moving"].GetSize()
    np.testing.assert_allclose(label.GetOrigin(), promise_pair["moving"].GetOrigin(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label),
                                  sitk.GetArrayFromImage(promise_pair["moving_label"]) > 0)


def test_labelmap_on_another_grid_is_resampled_to_the_reference(scene, promise_pair):
    fixed_node = nodes.volume_node_from_sitk(promise_pair["fixed"], scene, "fixed")
    label_node = nodes.volume_node_from_sitk(promise_pair["moving_label"], scene, "mask", labelmap=True)
    label = nodes.segmentation_to_labelmap_sitk(label_node, fixed_node)
    expected = sitk.Resample(promise_pair["moving_label"], promise_pair["fixed"], sitk.Transform(),
                             sitk.sitkNearestNeighbor, 0)
    assert label.GetSize() == promise_pair["fixed"].GetSize()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(expected) > 0)


def test_empty_segmentation_is_refused_with_its_name(scene, promise_pair):
    fixed_node = nodes.volume_node_from_sitk(promise_pair["fixed"], scene, "fixed")
    empty = sitk.Image(promise_pair["moving_label"]) * 0
    label_node = nodes.volume_node_from_sitk(empty, scene, "blank mask", labelmap=True)
    with pytest.raises(ValueError, match="blank mask"):
        nodes.segmentation_to_labelmap_sitk(label_node, fixed_node)


# ----------------------------------------------------------------------------- transform


def test_transform_node_references_and_from_parent(scene, promise_pair, displacement):
    fixed_node = nodes.volume_node_from_sitk(promise_pair["fixed"], scene, "fixed")
    moving_node = nodes.volume_node_from_sitk(promise_pair["moving"], scene, "moving")
    node = nodes.grid_transform_node_from_displacement(displacement, scene, "tx", fixed_node, moving_node)
    assert node.GetNodeReference(node.GetFixedNodeReferenceRole()) is fixed_node
    assert node.GetNodeReference(node.GetMovingNodeReferenceRole()) is moving_node
    # A fixed-space point maps to x + u(x) in moving space (RAS), through the "from parent" transform.
    index = (10, 20, 8)
    lps = np.array(displacement.TransformIndexToPhysicalPoint(index))
    u = np.array(displacement[index])
    from_parent = node.GetTransformFromParent()
    mapped = np.array(from_parent.TransformPoint(*(lps * [-1, -1, 1])))
    np.testing.assert_allclose(mapped, (lps + u) * [-1, -1, 1], atol=1e-6)


def test_displacement_needs_one_component_per_dimension(scene, promise_pair):
    with pytest.raises(ValueError, match="component"):
        nodes.grid_transform_node_from_displacement(promise_pair["fixed"], scene, "tx")


def test_propagated_segmentation_matches_itk_resampling(scene, promise_pair, displacement):
    fixed_node = nodes.volume_node_from_sitk(promise_pair["fixed"], scene, "fixed")
    moving_node = nodes.volume_node_from_sitk(promise_pair["moving"], scene, "moving")
    segmentation = nodes.segmentation_node_from_labelmap_sitk(promise_pair["moving_label"], scene,
                                                             "moving mask", moving_node)
    transform = nodes.grid_transform_node_from_displacement(displacement, scene, "tx", fixed_node, moving_node)
    propagated = nodes.propagate_segmentation(segmentation, transform, fixed_node, "propagated")

    assert segmentation.GetTransformNodeID() is None  # the input is left untouched
    assert propagated.GetSegmentation().GetNthSegment(0).GetName() == \
        segmentation.GetSegmentation().GetNthSegment(0).GetName()
    slicer_label = sitk.GetArrayFromImage(nodes.segmentation_to_labelmap_sitk(propagated, fixed_node))
    itk_label = _itk_warped_label(promise_pair, displacement)
    identity = sitk.GetArrayFromImage(sitk.Resample(promise_pair["moving_label"], promise_pair["fixed"],
                                                    sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    assert _dice(identity, itk_label) < 0.95  # the field really moves the prostate
    assert _dice(slicer_label, itk_label) >= 0.99


def test_propagating_a_labelmap_volume_matches_itk_resampling(scene, promise_pair, displacement):
    fixed_node = nodes.volume_node_from_sitk(promise_pair["fixed"], scene, "fixed")
    label_node = nodes.volume_node_from_sitk(promise_pair["moving_label"], scene, "mask", labelmap=True)
    transform = nodes.grid_transform_node_from_displacement(displacement, scene, "tx")
    propagated = nodes.propagate_segmentation(label_node, transform, fixed_node, "propagated")
    slicer_label = sitk.GetArrayFromImage(nodes.segmentation_to_labelmap_sitk(propagated, fixed_node))
    assert _dice(slicer_label, _itk_warped_label(promise_pair, displacement)) >= 0.99


def test_hardening_the_transform_in_slicer_moves_the_segmentation_the_itk_way(scene, promise_pair, displacement):
    """The user's own route (segmentation under the transform, Harden) agrees with ITK up to the
    extra resampling Slicer does; the inverse field would agree far less."""
    fixed_node = nodes.volume_node_from_sitk(promise_pair["fixed"], scene, "fixed")
    moving_node = nodes.volume_node_from_sitk(promise_pair["moving"], scene, "moving")
    segmentation = nodes.segmentation_node_from_labelmap_sitk(promise_pair["moving_label"], scene, "mask", moving_node)
    transform = nodes.grid_transform_node_from_displacement(displacement, scene, "tx", fixed_node, moving_node)
    segmentation.SetAndObserveTransformNodeID(transform.GetID())
    slicer.vtkSlicerTransformLogic.hardenTransform(segmentation)
    assert segmentation.GetTransformNodeID() is None
    hardened = sitk.GetArrayFromImage(nodes.segmentation_to_labelmap_sitk(segmentation, fixed_node))
    negated = sitk.GetImageFromArray(-sitk.GetArrayFromImage(displacement), isVector=True)
    negated.CopyInformation(displacement)
    correct = _dice(hardened, _itk_warped_label(promise_pair, displacement))
    assert correct >= 0.88
    assert correct > _dice(hardened, _itk_warped_label(promise_pair, negated)) + 0.05


# ----------------------------------------------------------------------------- results of the real worker

STEPS, SAVE_EVERY = 6, 3


def _table_column(table_node, name):
    table = table_node.GetTable()
    column = table.GetColumnByName(name)
    assert column is not None, f"column {name!r} missing"
    return [column.GetValue(i) for i in range(column.GetNumberOfValues())]


def _oblique(image: sitk.Image, direction: np.ndarray, origin) -> sitk.Image:
    return _with_geometry(image, direction, origin, (0.7, 0.7, 2.2))


def _every_step_copy(dim: int, folder: Path) -> Path:
    """A copy of the shipped model of ``dim`` (organ crops: a label, a point or its localiser places each crop; no
    elastix) with its stop rule off, so that a run takes every step it is given."""
    import torch

    payload = torch.load(REPO_MODELS / f"prostate-{dim}d.pt", weights_only=True)
    payload["agent_defaults"]["stop_when_no_action_helps"] = False
    path = folder / f"prostate-{dim}d-every-step.pt"
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def shipped_3d_every_step(tmp_path_factory):
    return _every_step_copy(3, tmp_path_factory.mktemp("shipped"))


@pytest.fixture(scope="module")
def real_run(shipped_3d_every_step, grid128, tmp_path_factory, mrml_scene):
    """One real ``agentreg register`` worker started from scene nodes the way the module's Logic starts it
    (grid128 subjects 13 -> 17, oblique fixed geometry, both segmentations, a few steps, step volumes), its
    folder imported into the scene. Yields the scene, the input nodes, the result nodes, the received the
    worker printed and its output folder (kept for comparison)."""
    bundle = shipped_3d_every_step
    images = {f"{role}{kind}": sitk.ReadImage(str(grid128 / f"case{case}_{name}.nii.gz"))
              for role, case in (("fixed", "13"), ("moving", "17")) for kind, name in (("", "image"), ("_label", "label"))}
    fixed_direction, fixed_origin = _rotation((3.0, -4.0, 15.0)), (-40.0, 25.5, -12.0)
    moving_direction, moving_origin = _rotation((0.0, 2.0, 9.0)), (-37.0, 22.0, -10.0)
    with mrml_scene() as scene:
        inputs = {}
        for role, direction, origin in (("fixed", fixed_direction, fixed_origin),
                                         ("moving", moving_direction, moving_origin)):
            inputs[role] = nodes.volume_node_from_sitk(_oblique(images[role], direction, origin), scene, role)
            inputs[f"{role}_label"] = nodes.segmentation_node_from_labelmap_sitk(
                _oblique(images[f"{role}_label"], direction, origin), scene, f"{role} prostate", inputs[role])
        registration = registration_job.start_registration(
            sys.executable, layout.engine_dir(MODULE_FILE), inputs["fixed"], inputs["moving"], bundle,
            fixed_segmentation=inputs["fixed_label"], moving_segmentation=inputs["moving_label"],
            temporary_root=tmp_path_factory.mktemp("worker"), keep_temporary_files=True,
            device="CPU", steps=STEPS, save_steps=SAVE_EVERY)
        received = registration.job.wait(timeout=600)
        assert registration.job.succeeded, registration.job.error
        result = registration_job.finish_registration(registration)
        yield {"scene": scene, "nodes": inputs, "result": result, "messages": received,
               "output": registration.output_dir, "folder": registration.folder}


def test_every_progress_line_of_the_real_worker_renders(real_run):
    received = [m for m in real_run["messages"] if m["stage"] != messages.STAGE_LOG]
    stages = list(dict.fromkeys(m["stage"] for m in received))  # in order of their first message
    assert stages in (["read", "localise", "register", "resample", "write", "done"],
                      ["read", "prealign", "register", "resample", "write", "done"])
    assert received[0] == {"stage": "read", "done": 0, "total": 5}  # the first line, before any file is read
    progress = [m for m in received if m["stage"] == "register"]
    assert [m["done"] for m in progress] == list(range(0, STEPS + 1))
    assert [messages.progress_text(m) for m in progress] == [f"Registering: {k} / {STEPS}" for k in range(0, STEPS + 1)]
    assert [messages.progress_range(m) for m in progress] == [(0, STEPS, k) for k in range(0, STEPS + 1)]
    assert received[-1]["stage"] == messages.STAGE_DONE and messages.progress_text(received[-1]) == "Done"
    for message in received:  # every line, whatever its stage, renders to a non-empty status line
        assert messages.progress_text(message)


def test_real_output_folder_holds_the_protocol_files(real_run):
    names = {p.name for p in real_run["output"].iterdir()}
    assert names == set(register_folder.OUTPUT_NAMES)
    assert sorted(p.name for p in (real_run["output"] / register_folder.STEPS_DIR).iterdir()) == [
        register_folder.step_file_name(s) for s in range(0, STEPS + 1, SAVE_EVERY)]


def test_warped_volume_node_is_the_engine_image_in_ras(real_run):
    warped = sitk.ReadImage(str(real_run["output"] / register_folder.WARPED))
    node = real_run["result"].warped_volume
    np.testing.assert_allclose(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(warped))
    back = nodes.sitk_from_volume_node(node)
    np.testing.assert_allclose(back.GetOrigin(), warped.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), warped.GetDirection(), atol=1e-5)


def test_transform_node_references_the_input_volumes(real_run):
    transform, inputs = real_run["result"].transform, real_run["nodes"]
    assert transform.IsA("vtkMRMLGridTransformNode")
    assert transform.GetNodeReference(transform.GetFixedNodeReferenceRole()) is inputs["fixed"]
    assert transform.GetNodeReference(transform.GetMovingNodeReferenceRole()) is inputs["moving"]


def test_the_moving_segmentation_comes_back_on_the_fixed_volume_as_the_engine_warped_it(real_run):
    """Apply with a moving segmentation gives it on the fixed volume (no separate step): resampled through the
    imported transform, it is the label the engine warped."""
    inputs = real_run["nodes"]
    propagated = real_run["result"].propagated_segmentation
    assert propagated is not None and propagated.GetName() == "moving prostate on fixed"
    assert propagated.GetSegmentation().GetNumberOfSegments() == 1
    assert propagated.GetSegmentation().GetNthSegment(0).GetName() == \
        inputs["moving_label"].GetSegmentation().GetNthSegment(0).GetName()
    slicer_label = sitk.GetArrayFromImage(nodes.segmentation_to_labelmap_sitk(propagated, inputs["fixed"]))
    engine_label = sitk.GetArrayFromImage(sitk.ReadImage(str(real_run["output"] / register_folder.WARPED_LABEL)))
    assert engine_label.sum() > 1000
    assert _dice(slicer_label, engine_label) >= 0.98


def test_metrics_table_has_dice_and_hausdorff_rows_of_the_real_metrics(real_run):
    metrics = json.loads((real_run["output"] / register_folder.METRICS_JSON).read_text())
    table = real_run["result"].metrics_table
    rows = _table_column(table, "Metric")
    assert rows[:4] == ["Dice", "Hausdorff (mm)", "Hausdorff 95% (mm)", "Average surface distance (mm)"]
    assert rows[4:] == ["Jacobian folding (%)", "log-Jacobian std", "Agent steps", "Run time (s)"]
    before, after = _table_column(table, "Before"), _table_column(table, "After")
    assert before[:2] == pytest.approx([metrics["dice_before"], metrics["hausdorff_before"]])
    assert after[:2] == pytest.approx([metrics["dice_after"], metrics["hausdorff_after"]])
    assert after[6:] == pytest.approx([STEPS, metrics["seconds_total"]])
    assert real_run["result"].metrics == metrics


def test_the_fixed_crop_is_a_locked_roi_around_the_fixed_prostate(real_run):
    """metrics.json's fixed crop, as the engine wrote it, becomes an ROI whose box (oblique, like the fixed volume)
    holds the fixed prostate and spans about BOX_SPREADS of its standard deviations per axis."""
    from AgentRegistrationLib.data.organ_box import BOX_SPREADS, localisation_from_label

    metrics = json.loads((real_run["output"] / register_folder.METRICS_JSON).read_text())
    roi, inputs = real_run["result"].fixed_crop, real_run["nodes"]
    assert roi is not None and roi.GetLocked() and roi in real_run["result"].all_nodes()
    assert metrics["fixed_crop_placed_by"] == "localiser"  # no point was given; the fixed label never places it
    centre = [0.0, 0.0, 0.0]
    roi.GetCenter(centre)
    np.testing.assert_allclose(centre, nodes.ras_from_lps(metrics["fixed_crop_centre"]), atol=1e-6)
    prostate = localisation_from_label(nodes.segmentation_to_labelmap_sitk(inputs["fixed_label"], inputs["fixed"]))
    assert _in_roi(roi, prostate.centre)
    axes = np.asarray(metrics["fixed_crop_axes"]).reshape(3, 3)  # columns: the box's axes (the fixed volume's)
    size = np.asarray(metrics["fixed_crop_size"])
    for axis in range(3):  # just outside the box along each of its oblique axes
        outside = np.asarray(metrics["fixed_crop_centre"]) + 0.52 * size[axis] * axes[:, axis]
        inside = np.asarray(metrics["fixed_crop_centre"]) + 0.48 * size[axis] * axes[:, axis]
        assert _in_roi(roi, inside) and not _in_roi(roi, outside), axis
    assert np.all((size / (np.array(BOX_SPREADS[3]) * prostate.spread) > 0.7)
                  & (size / (np.array(BOX_SPREADS[3]) * prostate.spread) < 1.5)), (size, prostate.spread)


def _in_roi(roi, lps) -> bool:
    """Whether an LPS point lies in a markups ROI, by the ROI node's own matrix and size (as Slicer draws it)."""
    ras_to_object = np.linalg.inv(np.array([[roi.GetObjectToNodeMatrix().GetElement(r, c) for c in range(4)]
                                            for r in range(4)]))
    local = ras_to_object @ np.r_[nodes.ras_from_lps(lps), 1.0]
    return bool(np.all(np.abs(local[:3]) <= np.array(roi.GetSize()) / 2))


def test_every_key_the_table_reads_is_in_the_metrics_schema():
    for _, key in result_nodes.METRIC_ROWS:
        assert {f"{key}_before", f"{key}_after"} <= set(register_folder.METRICS_SCHEMA)
    for _, key in result_nodes.SINGLE_METRIC_ROWS:
        assert key in register_folder.METRICS_SCHEMA


def test_trajectory_table_and_chart_of_the_real_run(real_run):
    result = real_run["result"]
    assert _table_column(result.trajectory_table, "step") == [float(s) for s in range(1, STEPS + 1)]
    dice = _table_column(result.trajectory_table, "dice")
    assert all(0.0 < d <= 1.0 for d in dice)
    chart = result.trajectory_chart
    series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    assert {s.GetYColumnName() for s in series} == {"q_max", "dice"}
    assert all(s.GetTableNode() is result.trajectory_table and s.GetXColumnName() == "step" for s in series)


def test_step_sequence_of_the_real_run(real_run):
    sequence, browser = real_run["result"].step_sequence, real_run["result"].step_browser
    assert [sequence.GetNthIndexValue(i) for i in range(sequence.GetNumberOfDataNodes())] == ["0", "3", "6"]
    step_3 = sitk.ReadImage(str(real_run["output"] / register_folder.STEPS_DIR / register_folder.step_file_name(3)))
    np.testing.assert_allclose(slicer.util.arrayFromVolume(sequence.GetDataNodeAtValue("3")),
                               sitk.GetArrayFromImage(step_3))
    proxy = browser.GetProxyNode(sequence)
    assert proxy is not None and proxy.IsA("vtkMRMLScalarVolumeNode")


def test_chosen_output_nodes_are_filled_in_place(real_run):
    scene, inputs = real_run["scene"], real_run["nodes"]
    warped = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my warped")
    transform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "my transform")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "my metrics")
    propagated = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my propagated")
    propagated.GetSegmentation().AddEmptySegment("an earlier segment")
    result = result_nodes.import_register_results(real_run["output"], scene, inputs["fixed"], inputs["moving"], "again",
                                          warped_node=warped, transform_node=transform, metrics_node=table,
                                          moving_segmentation=inputs["moving_label"], propagated_node=propagated)
    assert (result.warped_volume, result.transform, result.metrics_table) == (warped, transform, table)
    assert result.propagated_segmentation is propagated
    assert [propagated.GetSegmentation().GetNthSegment(i).GetName()
            for i in range(propagated.GetSegmentation().GetNumberOfSegments())] == [
        inputs["moving_label"].GetSegmentation().GetNthSegment(0).GetName()]  # the earlier segment replaced
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(nodes.segmentation_to_labelmap_sitk(propagated, inputs["fixed"])),
        sitk.GetArrayFromImage(nodes.segmentation_to_labelmap_sitk(real_run["result"].propagated_segmentation,
                                                                   inputs["fixed"])))
    np.testing.assert_allclose(slicer.util.arrayFromVolume(warped),
                               slicer.util.arrayFromVolume(real_run["result"].warped_volume))
    assert _table_column(table, "Metric")[0] == "Dice"


def test_failed_import_leaves_the_scene_as_it_was(real_run, tmp_path):
    folder = tmp_path / "output"
    shutil.copytree(real_run["output"], folder)
    (folder / register_folder.TRAJECTORY_CSV).write_text("")  # corrupt: empty
    scene, inputs = real_run["scene"], real_run["nodes"]
    before = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="trajectory file .*(no steps|lacks the columns)"):
        result_nodes.import_register_results(folder, scene, inputs["fixed"], inputs["moving"], "run")
    assert scene.GetNumberOfNodes() == before


def test_a_file_that_is_no_model_is_refused_before_a_worker_starts(real_run, tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a model bundle" * 20)
    inputs = real_run["nodes"]
    with pytest.raises(ValueError, match="model.pt is not a readable AgentRegistration model bundle"):
        registration_job.start_registration(sys.executable, layout.engine_dir(MODULE_FILE), inputs["fixed"],
                                            inputs["moving"], bad, temporary_root=tmp_path / "tmp", device="CPU")
    assert not (tmp_path / "tmp").exists()  # refused before any folder was made


def test_a_failing_worker_reports_its_error_and_leaves_nothing(real_run, shipped_3d_every_step, tmp_path):
    import torch

    payload = torch.load(shipped_3d_every_step, weights_only=True)
    payload["network"]["state"] = {}  # the module reads its header; the worker finds no weights
    bad = tmp_path / "model.pt"
    torch.save(payload, bad)
    scene, inputs = real_run["scene"], real_run["nodes"]
    before = scene.GetNumberOfNodes()
    registration = registration_job.start_registration(sys.executable, layout.engine_dir(MODULE_FILE), inputs["fixed"],
                                           inputs["moving"], bad, temporary_root=tmp_path / "tmp", device="CPU")
    received = registration.job.wait(timeout=300)
    assert any(m["stage"] == messages.STAGE_ERROR for m in received)
    with pytest.raises(RuntimeError, match="model.pt"):
        registration_job.finish_registration(registration)
    assert scene.GetNumberOfNodes() == before
    assert not registration.folder.exists()


def test_cancelling_the_real_worker_removes_its_folder(slice_run, tmp_path):
    """Cancel while the agent runs (5000 steps asked): the single-slice volumes of the slice run with the shipped 2-D
    model, its stop rule off (its localiser places the moving crop, the markups point the fixed one)."""
    inputs = slice_run["nodes"]
    registration = registration_job.start_registration(sys.executable, layout.engine_dir(MODULE_FILE), inputs["fixed"],
                                           inputs["moving"], _every_step_copy(2, tmp_path), fixed_point=slice_run["markups"],
                                           temporary_root=tmp_path / "worker", device="CPU", steps=5000)
    job = registration.job
    deadline = time.monotonic() + 300
    while not any(m["stage"] == "register" for m in job.poll()):
        assert time.monotonic() < deadline and not job.done(), job.error
        time.sleep(0.05)
    job.cancel()
    job.wait(timeout=30)
    assert job.cancelled and not job.succeeded and job.worker.returncode != 0
    with pytest.raises(RuntimeError, match="cancelled"):
        registration_job.finish_registration(registration)
    assert not registration.folder.exists()


def test_sample_pair_loads_as_volumes_and_segmentations(scene):
    inputs = registration_job.load_volume_pair(layout.sample_data_files(MODULE_FILE), scene)
    assert inputs["fixed"].GetImageData().GetDimensions() == (160, 160, 15)
    assert inputs["moving"].GetImageData().GetDimensions() == (160, 160, 20)
    for key in ("fixed_label", "moving_label"):
        assert inputs[key].IsA("vtkMRMLSegmentationNode")
        assert inputs[key].GetSegmentation().GetNumberOfSegments() == 1


# ----------------------------------------------------------------------------- points and single slices


def test_a_markups_point_reaches_the_engine_in_lps(scene):
    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "prostate")
    markups.AddControlPoint(12.5, -30.0, 4.0)  # RAS
    np.testing.assert_allclose(nodes.markups_point_lps(markups), [-12.5, 30.0, 4.0])
    np.testing.assert_allclose(nodes.ras_from_lps(nodes.lps_from_ras((1.0, 2.0, 3.0))), (1.0, 2.0, 3.0))
    command = worker_commands.register_command("python", Path("f"), Path("m"), Path("b.pt"), Path("o"),
                                        fixed_point=nodes.markups_point_lps(markups))
    from AgentRegistrationLib.cli.commands import _point
    from AgentRegistrationLib.cli.parser import build_parser

    np.testing.assert_allclose(_point(build_parser().parse_args(command[3:]).fixed_point), [-12.5, 30.0, 4.0])


def test_an_empty_markups_node_is_refused_by_name(scene):
    with pytest.raises(ValueError, match="markups 'nothing' has no point: place one on the prostate"):
        nodes.markups_point_lps(scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "nothing"))


def test_a_single_slice_goes_to_its_2d_frame_and_back(promise_pair):
    one_slice = promise_pair["moving"][:, :, 5:6]
    plane = nodes.SlicePlane.of(one_slice)
    flat = plane.to_2d(one_slice, "slice")
    assert flat.GetDimension() == 2 and flat.GetOrigin() == (0.0, 0.0) and flat.GetDirection() == (1.0, 0.0, 0.0, 1.0)
    back = plane.to_3d(flat)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(one_slice))
    assert back.GetOrigin() == one_slice.GetOrigin() and back.GetDirection() == one_slice.GetDirection()
    # a 2-D displacement (a, b) is a * u + b * v in LPS, u and v the slice's in-plane directions
    field = sitk.Compose([sitk.Image(flat.GetSize(), sitk.sitkFloat64) + 2.0, sitk.Image(flat.GetSize(), sitk.sitkFloat64) - 1.0])
    field.CopyInformation(flat)
    columns = np.array(one_slice.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(sitk.GetArrayFromImage(plane.to_3d(field))[0, 3, 4], 2.0 * columns[:, 0] - columns[:, 1])
    # a point on the slice: its in-plane offsets from the first voxel
    point = one_slice.TransformIndexToPhysicalPoint((4, 7, 0))
    np.testing.assert_allclose(plane.point_2d(point), np.multiply((4, 7), one_slice.GetSpacing()[:2]), atol=1e-9)


def test_a_thick_volume_with_a_2d_model_names_the_slice_to_use(scene, promise_pair, tmp_path):
    fixed = nodes.volume_node_from_sitk(promise_pair["fixed"], scene, "fixed")
    moving = nodes.volume_node_from_sitk(promise_pair["moving"], scene, "moving")
    model = REPO_MODELS / "prostate-2d.pt"
    with pytest.raises(ValueError, match="2-D model but volume 'fixed' has 36 slices: .*slice 18, its middle one"):
        registration_job.start_registration(sys.executable, layout.engine_dir(MODULE_FILE), fixed, moving, model,
                                temporary_root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_single_slice_with_a_3d_model_asks_for_a_2d_model(scene, promise_pair, tmp_path):
    fixed = nodes.volume_node_from_sitk(promise_pair["fixed"][:, :, 3:4], scene, "fixed slice")
    moving = nodes.volume_node_from_sitk(promise_pair["moving"][:, :, 3:4], scene, "moving slice")
    with pytest.raises(ValueError, match="3-D model but volume 'fixed slice' is a single slice: choose a 2-D model"):
        registration_job.start_registration(sys.executable, layout.engine_dir(MODULE_FILE), fixed, moving,
                                REPO_MODELS / "prostate-3d.pt", temporary_root=tmp_path)
    assert list(tmp_path.iterdir()) == []


SLICE_STEPS = 4


@pytest.fixture(scope="module")
def slice_run(grid128, tmp_path_factory, mrml_scene):
    """The real worker with the shipped 2-D model (stop rule off) on two single-slice volumes as Slicer holds them
    (128x128x1, oblique, parallel planes at different positions), both segmentations and a markups point on the
    fixed one, which places the fixed crop."""
    bundle = _every_step_copy(2, tmp_path_factory.mktemp("shipped_2d"))
    direction = _rotation((8.0, -6.0, 20.0))
    with mrml_scene() as scene:
        inputs = {}
        for role, case, index, origin in (("fixed", "13", 16, (-40.0, 25.5, -12.0)), ("moving", "17", 21, (-36.0, 22.0, -9.0))):
            image, label = (sitk.ReadImage(str(grid128 / f"case{case}_{kind}.nii.gz"))[:, :, index:index + 1]
                            for kind in ("image", "label"))
            inputs[role] = nodes.volume_node_from_sitk(_oblique(image, direction, origin), scene, role)
            inputs[f"{role}_label"] = nodes.segmentation_node_from_labelmap_sitk(
                _oblique(label, direction, origin), scene, f"{role} prostate", inputs[role])
        fixed_image = nodes.sitk_from_volume_node(inputs["fixed"])
        markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "prostate centre")
        markups.AddControlPoint(*nodes.ras_from_lps(fixed_image.TransformContinuousIndexToPhysicalPoint((64, 60, 0))))
        registration = registration_job.start_registration(
            sys.executable, layout.engine_dir(MODULE_FILE), inputs["fixed"], inputs["moving"], bundle,
            fixed_segmentation=inputs["fixed_label"], moving_segmentation=inputs["moving_label"], fixed_point=markups,
            temporary_root=tmp_path_factory.mktemp("slice_worker"), keep_temporary_files=True, device="CPU",
            steps=SLICE_STEPS, save_steps=2)
        received = registration.job.wait(timeout=600)
        assert registration.job.succeeded, registration.job.error
        result = registration_job.finish_registration(registration)
        yield {"scene": scene, "nodes": inputs, "result": result, "messages": received, "markups": markups,
               "output": registration.output_dir, "command": registration.job.commands[0]}


def test_a_2d_model_registers_a_single_slice_volume(slice_run):
    warped = slice_run["result"].warped_volume
    assert warped.GetImageData().GetDimensions() == (128, 128, 1)
    expected, actual = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    slice_run["nodes"]["fixed"].GetIJKToRASMatrix(expected)
    warped.GetIJKToRASMatrix(actual)
    np.testing.assert_allclose(nodes._numpy_matrix(actual), nodes._numpy_matrix(expected), atol=1e-6)
    engine = sitk.GetArrayFromImage(sitk.ReadImage(str(slice_run["output"] / register_folder.WARPED)))
    assert engine.ndim == 2  # the worker registered a 2-D image ...
    np.testing.assert_allclose(slicer.util.arrayFromVolume(warped)[0], engine)  # ... shown on the fixed slice
    assert slice_run["result"].metrics["steps"] == SLICE_STEPS


def test_the_slice_label_propagated_through_the_imported_transform_is_the_engine_warped_label(slice_run):
    inputs = slice_run["nodes"]
    propagated = slice_run["result"].propagated_segmentation  # carried onto the fixed slice on import
    slicer_label = sitk.GetArrayFromImage(nodes.segmentation_to_labelmap_sitk(propagated, inputs["fixed"]))[0]
    engine_label = sitk.GetArrayFromImage(sitk.ReadImage(str(slice_run["output"] / register_folder.WARPED_LABEL)))
    assert engine_label.sum() > 100
    assert _dice(slicer_label, engine_label) >= 0.98


def test_the_markups_point_is_given_to_the_engine_in_the_slices_frame(slice_run):
    command = slice_run["command"]
    (option,) = [c for c in command if c.startswith("--fixed-point")]
    value = option.split("=", 1)[1] if "=" in option else command[command.index(option) + 1]
    fixed = nodes.sitk_from_volume_node(slice_run["nodes"]["fixed"])
    expected = np.multiply((64, 60), fixed.GetSpacing()[:2])  # the point's in-plane offset from the first voxel
    np.testing.assert_allclose([float(v) for v in value.split(",")], expected, atol=1e-6)


def test_a_2d_crop_is_a_locked_roi_on_the_fixed_slice_around_the_point(slice_run):
    """A 2-D model's crop (2-D in metrics.json, in the slice's frame) becomes an ROI on the oblique fixed slice, one
    slice thick, centred on the markups point that placed it, holding the prostate of that slice."""
    from AgentRegistrationLib.data.organ_box import localisation_from_label

    metrics = json.loads((slice_run["output"] / register_folder.METRICS_JSON).read_text())
    roi, inputs = slice_run["result"].fixed_crop, slice_run["nodes"]
    assert len(metrics["fixed_crop_centre"]) == 2 and metrics["fixed_crop_placed_by"] == "point on the fixed image"
    assert roi is not None and roi.GetLocked() and roi in slice_run["result"].all_nodes()
    fixed = nodes.sitk_from_volume_node(inputs["fixed"])
    point = np.array(fixed.TransformContinuousIndexToPhysicalPoint((64, 60, 0)))  # where the markups point lies
    centre = [0.0, 0.0, 0.0]
    roi.GetCenter(centre)
    assert np.linalg.norm(nodes.lps_from_ras(centre) - point) < max(fixed.GetSpacing()[:2])
    prostate = localisation_from_label(nodes.segmentation_to_labelmap_sitk(inputs["fixed_label"], inputs["fixed"]))
    assert _in_roi(roi, prostate.centre)
    direction = np.array(fixed.GetDirection()).reshape(3, 3)
    size = np.asarray(metrics["fixed_crop_size"])
    for axis in range(2):  # the box's in-plane axes are the slice's voxel axes
        assert _in_roi(roi, point + 0.4 * size[axis] * direction[:, axis])
        assert not _in_roi(roi, point + 0.6 * size[axis] * direction[:, axis])
    assert not _in_roi(roi, point + fixed.GetSpacing()[2] * direction[:, 2])  # one slice off the plane: outside


def test_the_step_volumes_of_a_slice_are_on_the_slice(slice_run):
    sequence = slice_run["result"].step_sequence
    assert [sequence.GetNthIndexValue(i) for i in range(sequence.GetNumberOfDataNodes())] == ["0", "2", "4"]
    assert sequence.GetDataNodeAtValue("4").GetImageData().GetDimensions() == (128, 128, 1)
    # the result is the last step's image, or the start's where the similarity guard kept the start
    result_step = "0" if slice_run["result"].metrics.get("start_kept") else "4"
    np.testing.assert_allclose(slicer.util.arrayFromVolume(sequence.GetDataNodeAtValue(result_step))[0],
                               slicer.util.arrayFromVolume(slice_run["result"].warped_volume)[0], atol=1e-4)
