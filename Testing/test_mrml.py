"""The MRML glue, tested on a real MRML scene (slicer-core) with a real PROMISE12 volume.

The volumes get a non-identity direction and a non-zero origin so that every RAS/LPS
mistake shows. The displacement field is a smooth known field built here with numpy; it
stands in for the engine's ``register`` output until that is wired into this test.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

slicer = pytest.importorskip("slicer", reason="slicer-core (the MRML wheel) is needed for the glue tests")

from AgentRegistrationLib import mrml  # noqa: E402

DATA = Path("/work/shared/data/promise12/native")
CASE = "case00"


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
def promise_pair() -> dict[str, sitk.Image]:
    """A cropped, down-sampled PROMISE12 image and mask with oblique geometry (moving), and a
    fixed grid of the same extent with a different direction and origin."""
    if not (DATA / f"{CASE}_image.nii.gz").is_file():
        pytest.skip(f"PROMISE12 data not found under {DATA}")
    image = sitk.ReadImage(str(DATA / f"{CASE}_image.nii.gz"))[64:192:2, 48:160:2, 6:42]
    label = sitk.ReadImage(str(DATA / f"{CASE}_label.nii.gz"))[64:192:2, 48:160:2, 6:42]
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
def scene():
    """A real MRML scene with the module logics Slicer would have registered (segmentations:
    converter rules; sequences: browser node class), also set as ``slicer.mrmlScene``."""
    mrml_scene = slicer.vtkMRMLScene()
    logics = [slicer.vtkSlicerSegmentationsModuleLogic(), slicer.vtkSlicerSequencesLogic()]
    for logic in logics:
        logic.SetMRMLScene(mrml_scene)
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = mrml_scene
    yield mrml_scene
    for logic in logics:
        logic.SetMRMLScene(None)
    mrml_scene.Clear(True)
    slicer.mrmlScene = previous


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
    node = mrml.volume_node_from_sitk(image, scene, "moving")
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
    back = mrml.sitk_from_volume_node(mrml.volume_node_from_sitk(image, scene, "moving"))
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert back.GetPixelID() == image.GetPixelID()


def test_labelmap_node_is_a_labelmap(scene, promise_pair):
    node = mrml.volume_node_from_sitk(promise_pair["moving_label"], scene, "mask", labelmap=True)
    assert node.IsA("vtkMRMLLabelMapVolumeNode")


def test_vector_image_is_refused_as_volume(scene, displacement):
    with pytest.raises(ValueError, match="components"):
        mrml.volume_node_from_sitk(displacement, scene, "field")


def test_segmentation_round_trip_on_reference_grid(scene, promise_pair):
    moving_node = mrml.volume_node_from_sitk(promise_pair["moving"], scene, "moving")
    segmentation = mrml.segmentation_node_from_labelmap_sitk(promise_pair["moving_label"], scene,
                                                             "mask", moving_node)
    label = mrml.segmentation_to_labelmap_sitk(segmentation, moving_node)
    assert label.GetSize() == promise_pair["moving"].GetSize()
    np.testing.assert_allclose(label.GetOrigin(), promise_pair["moving"].GetOrigin(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label),
                                  sitk.GetArrayFromImage(promise_pair["moving_label"]) > 0)


def test_labelmap_on_another_grid_is_resampled_to_the_reference(scene, promise_pair):
    fixed_node = mrml.volume_node_from_sitk(promise_pair["fixed"], scene, "fixed")
    label_node = mrml.volume_node_from_sitk(promise_pair["moving_label"], scene, "mask", labelmap=True)
    label = mrml.segmentation_to_labelmap_sitk(label_node, fixed_node)
    expected = sitk.Resample(promise_pair["moving_label"], promise_pair["fixed"], sitk.Transform(),
                             sitk.sitkNearestNeighbor, 0)
    assert label.GetSize() == promise_pair["fixed"].GetSize()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(expected) > 0)


def test_empty_segmentation_is_refused_with_its_name(scene, promise_pair):
    fixed_node = mrml.volume_node_from_sitk(promise_pair["fixed"], scene, "fixed")
    empty = sitk.Image(promise_pair["moving_label"]) * 0
    label_node = mrml.volume_node_from_sitk(empty, scene, "blank mask", labelmap=True)
    with pytest.raises(ValueError, match="blank mask"):
        mrml.segmentation_to_labelmap_sitk(label_node, fixed_node)


# ----------------------------------------------------------------------------- transform


def test_transform_node_references_and_from_parent(scene, promise_pair, displacement):
    fixed_node = mrml.volume_node_from_sitk(promise_pair["fixed"], scene, "fixed")
    moving_node = mrml.volume_node_from_sitk(promise_pair["moving"], scene, "moving")
    node = mrml.grid_transform_node_from_displacement(displacement, scene, "tx", fixed_node, moving_node)
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
        mrml.grid_transform_node_from_displacement(promise_pair["fixed"], scene, "tx")


def test_propagated_segmentation_matches_itk_resampling(scene, promise_pair, displacement):
    fixed_node = mrml.volume_node_from_sitk(promise_pair["fixed"], scene, "fixed")
    moving_node = mrml.volume_node_from_sitk(promise_pair["moving"], scene, "moving")
    segmentation = mrml.segmentation_node_from_labelmap_sitk(promise_pair["moving_label"], scene,
                                                             "moving mask", moving_node)
    transform = mrml.grid_transform_node_from_displacement(displacement, scene, "tx", fixed_node, moving_node)
    propagated = mrml.propagate_segmentation(segmentation, transform, fixed_node, "propagated")

    assert segmentation.GetTransformNodeID() is None  # the input is left untouched
    assert propagated.GetSegmentation().GetNthSegment(0).GetName() == \
        segmentation.GetSegmentation().GetNthSegment(0).GetName()
    slicer_label = sitk.GetArrayFromImage(mrml.segmentation_to_labelmap_sitk(propagated, fixed_node))
    itk_label = _itk_warped_label(promise_pair, displacement)
    identity = sitk.GetArrayFromImage(sitk.Resample(promise_pair["moving_label"], promise_pair["fixed"],
                                                    sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    assert _dice(identity, itk_label) < 0.95  # the field really moves the prostate
    assert _dice(slicer_label, itk_label) >= 0.99


def test_propagating_a_labelmap_volume_matches_itk_resampling(scene, promise_pair, displacement):
    fixed_node = mrml.volume_node_from_sitk(promise_pair["fixed"], scene, "fixed")
    label_node = mrml.volume_node_from_sitk(promise_pair["moving_label"], scene, "mask", labelmap=True)
    transform = mrml.grid_transform_node_from_displacement(displacement, scene, "tx")
    propagated = mrml.propagate_segmentation(label_node, transform, fixed_node, "propagated")
    slicer_label = sitk.GetArrayFromImage(mrml.segmentation_to_labelmap_sitk(propagated, fixed_node))
    assert _dice(slicer_label, _itk_warped_label(promise_pair, displacement)) >= 0.99


def test_hardening_the_transform_in_slicer_moves_the_segmentation_the_itk_way(scene, promise_pair, displacement):
    """The user's own route (segmentation under the transform, Harden) agrees with ITK up to the
    extra resampling Slicer does; the inverse field would agree far less."""
    fixed_node = mrml.volume_node_from_sitk(promise_pair["fixed"], scene, "fixed")
    moving_node = mrml.volume_node_from_sitk(promise_pair["moving"], scene, "moving")
    segmentation = mrml.segmentation_node_from_labelmap_sitk(promise_pair["moving_label"], scene, "mask", moving_node)
    transform = mrml.grid_transform_node_from_displacement(displacement, scene, "tx", fixed_node, moving_node)
    segmentation.SetAndObserveTransformNodeID(transform.GetID())
    slicer.vtkSlicerTransformLogic.hardenTransform(segmentation)
    assert segmentation.GetTransformNodeID() is None
    hardened = sitk.GetArrayFromImage(mrml.segmentation_to_labelmap_sitk(segmentation, fixed_node))
    negated = sitk.GetImageFromArray(-sitk.GetArrayFromImage(displacement), isVector=True)
    negated.CopyInformation(displacement)
    correct = _dice(hardened, _itk_warped_label(promise_pair, displacement))
    assert correct >= 0.88
    assert correct > _dice(hardened, _itk_warped_label(promise_pair, negated)) + 0.05


# ----------------------------------------------------------------------------- results


def _table_column(table_node, name):
    table = table_node.GetTable()
    column = table.GetColumnByName(name)
    assert column is not None, f"column {name!r} missing"
    return [column.GetValue(i) for i in range(column.GetNumberOfValues())]


def _write_register_outputs(folder: Path, promise_pair, displacement, with_labels: bool = True) -> None:
    """The files ``agentreg register`` writes, made here from the known field."""
    transform = sitk.DisplacementFieldTransform(sitk.Image(displacement))
    warped = sitk.Resample(promise_pair["moving"], promise_pair["fixed"], transform, sitk.sitkLinear, 0.0)
    sitk.WriteImage(warped, str(folder / "warped.nii.gz"))
    sitk.WriteImage(displacement, str(folder / "displacement.nii.gz"))
    lines = ["step,action,mode,accepted,dice,q_0,q_1,q_2,q_3,theta_0,theta_1"]
    for step in range(4):
        dice = f"{0.6 + 0.1 * step:.2f}" if with_labels else ""
        lines.append(f"{step},{step % 4},fuzzy,1,{dice},{0.1 * step},{-0.2},{0.3},{0.05 * step},{0.5 * step},0")
    (folder / "trajectory.csv").write_text("\n".join(lines) + "\n")
    metrics = {"jacobian_folding_percent": 0.0, "log_jacobian_std": 0.12, "seconds": 3.5}
    if with_labels:
        metrics.update(dice_before=0.61, dice_after=0.88, hausdorff_before=9.5, hausdorff_after=4.25,
                       hausdorff95_before=7.0, hausdorff95_after=3.0)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "steps").mkdir()
    for step in (0, 2, 10):
        sitk.WriteImage(warped * 0 + step, str(folder / "steps" / f"warped_{step:04d}.nii.gz"))


def test_metrics_table_has_before_and_after(scene):
    metrics = {"dice_before": 0.61, "dice_after": 0.88, "hausdorff_before": 9.5, "hausdorff_after": 4.25,
               "hausdorff95_before": 7.0, "hausdorff95_after": 3.0, "seconds": 3.5}
    node = mrml.metrics_table_node(metrics, scene, "metrics")
    assert _table_column(node, "Metric") == ["Dice", "Hausdorff (mm)", "Hausdorff 95% (mm)", "Run time (s)"]
    assert _table_column(node, "Before")[:3] == [0.61, 9.5, 7.0]
    assert _table_column(node, "After") == [0.88, 4.25, 3.0, 3.5]


def test_metrics_table_without_labels_has_no_dice_row(scene):
    node = mrml.metrics_table_node({"jacobian_folding_percent": 0.5, "seconds": 1.0}, scene, "metrics")
    assert _table_column(node, "Metric") == ["Jacobian folding (%)", "Run time (s)"]


def test_import_register_results_builds_every_node(scene, promise_pair, displacement, tmp_path):
    _write_register_outputs(tmp_path, promise_pair, displacement)
    fixed_node = mrml.volume_node_from_sitk(promise_pair["fixed"], scene, "fixed")
    moving_node = mrml.volume_node_from_sitk(promise_pair["moving"], scene, "moving")
    result = mrml.import_register_results(tmp_path, scene, fixed_node, moving_node, "run")

    assert result.warped_volume.GetName() == "run warped"
    warped = sitk.ReadImage(str(tmp_path / "warped.nii.gz"))
    np.testing.assert_allclose(slicer.util.arrayFromVolume(result.warped_volume), sitk.GetArrayFromImage(warped))
    assert result.transform.GetNodeReference(result.transform.GetMovingNodeReferenceRole()) is moving_node

    assert _table_column(result.trajectory_table, "step") == [0.0, 1.0, 2.0, 3.0]
    assert _table_column(result.trajectory_table, "mode") == ["fuzzy"] * 4
    np.testing.assert_allclose(_table_column(result.trajectory_table, "dice"), [0.6, 0.7, 0.8, 0.9])
    np.testing.assert_allclose(_table_column(result.trajectory_table, "q_max"), [0.3, 0.3, 0.3, 0.3])

    chart = result.trajectory_chart
    y_columns = {chart.GetNthPlotSeriesNode(i).GetYColumnName() for i in range(chart.GetNumberOfPlotSeriesNodes())}
    assert y_columns == {"q_max", "dice"}
    series = chart.GetNthPlotSeriesNode(0)
    assert series.GetTableNode() is result.trajectory_table
    assert series.GetXColumnName() == "step"

    assert result.metrics["dice_after"] == 0.88
    assert _table_column(result.metrics_table, "After")[0] == 0.88

    sequence = result.step_sequence
    assert sequence.GetNumberOfDataNodes() == 3
    assert [sequence.GetNthIndexValue(i) for i in range(3)] == ["0", "2", "10"]
    assert sequence.GetIndexName() == "step"
    step_2 = sequence.GetDataNodeAtValue("2")
    assert np.all(slicer.util.arrayFromVolume(step_2) == 2)
    proxy = result.step_browser.GetProxyNode(sequence)
    assert proxy is not None and proxy.IsA("vtkMRMLScalarVolumeNode")
    assert np.all(slicer.util.arrayFromVolume(proxy) == 10)  # browser shows the last step


def test_trajectory_without_labels_plots_only_q(scene, promise_pair, displacement, tmp_path):
    _write_register_outputs(tmp_path, promise_pair, displacement, with_labels=False)
    fixed_node = mrml.volume_node_from_sitk(promise_pair["fixed"], scene, "fixed")
    moving_node = mrml.volume_node_from_sitk(promise_pair["moving"], scene, "moving")
    result = mrml.import_register_results(tmp_path, scene, fixed_node, moving_node, "run")
    assert result.trajectory_chart.GetNumberOfPlotSeriesNodes() == 1
    assert result.trajectory_chart.GetNthPlotSeriesNode(0).GetYColumnName() == "q_max"
    assert math.isnan(_table_column(result.trajectory_table, "dice")[0])


def test_failed_import_leaves_the_scene_as_it_was(scene, promise_pair, displacement, tmp_path):
    _write_register_outputs(tmp_path, promise_pair, displacement)
    (tmp_path / "trajectory.csv").write_text("")  # corrupt: empty
    fixed_node = mrml.volume_node_from_sitk(promise_pair["fixed"], scene, "fixed")
    moving_node = mrml.volume_node_from_sitk(promise_pair["moving"], scene, "moving")
    before = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="trajectory file .*(no steps|lacks the columns)"):
        mrml.import_register_results(tmp_path, scene, fixed_node, moving_node, "run")
    assert scene.GetNumberOfNodes() == before


# ----------------------------------------------------------------------------- worker


def test_register_command_carries_every_option(tmp_path):
    command = mrml.register_command("python", tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", tmp_path / "b.pt",
                                    tmp_path / "out", moving_label=tmp_path / "ml.nii.gz", device="GPU",
                                    steps=50, seed=3, fuzzy_action_control=True, fuzzy_k=2.0, save_steps=5)
    assert command[:4] == ["python", "-m", "AgentRegistrationLib.cli", "register"]
    assert command[-1] == "--progress-json"
    options = dict(zip(command[4:-1:2], command[5:-1:2], strict=True))
    assert options["--device"] == "cuda"
    assert options["--steps"] == "50"
    assert options["--moving-label"] == str(tmp_path / "ml.nii.gz")
    assert options["--fuzzy-k"] == "2.0"
    assert options["--save-steps"] == "5"
    assert "--fixed-label" not in command


def test_register_command_leaves_the_number_of_steps_to_the_model_by_default():
    from AgentRegistrationLib import cli

    for steps in (None, 0):  # 0: the module's "model's default"
        command = mrml.register_command("python", Path("f"), Path("m"), Path("b.pt"), Path("o"), steps=steps)
        assert "--steps" not in command
        assert cli.build_parser().parse_args(command[3:]).steps is None  # agentreg register: the bundle's default


def test_register_command_without_fuzzy_control():
    command = mrml.register_command("python", Path("f"), Path("m"), Path("b.pt"), Path("o"),
                                    fuzzy_action_control=False)
    assert "--no-fuzzy" in command and "--fuzzy-k" not in command


def test_register_command_refuses_unknown_device():
    with pytest.raises(ValueError, match="device"):
        mrml.register_command("python", Path("f"), Path("m"), Path("b.pt"), Path("o"), device="TPU")


def test_cli_command_writes_flags_and_positionals(tmp_path):
    command = mrml.cli_command("python", "sdm", {"modes": 25, "out": tmp_path / "sdm.npz", "resume": True,
                                                 "report": None}, positional=[tmp_path / "gt"])
    assert command == ["python", "-m", "AgentRegistrationLib.cli", "sdm", str(tmp_path / "gt"), "--modes", "25",
                       "--out", str(tmp_path / "sdm.npz"), "--resume", "--progress-json"]


def test_progress_lines_are_parsed():
    assert mrml.parse_progress_line('{"stage": "register", "step": 5, "total": 20}\n')["step"] == 5
    assert mrml.parse_progress_line("loading model ...") == {"stage": "log", "message": "loading model ..."}
    assert mrml.progress_fraction({"stage": "register", "step": 5, "total": 20}) == 0.25
    assert mrml.progress_fraction({"stage": "groundtruth", "done": 3, "total": 4}) == 0.75
    assert mrml.progress_fraction({"stage": "done"}) is None


def test_shipped_models_are_listed_by_name(tmp_path):
    (tmp_path / "prostate-2d.pt").write_bytes(b"")
    (tmp_path / "prostate-2d.md").write_text("card")
    assert mrml.shipped_models(tmp_path) == {"prostate-2d": tmp_path / "prostate-2d.pt"}
    assert mrml.shipped_models(tmp_path / "missing") == {}


def _wait(worker: mrml.WorkerProcess, timeout: float = 20.0) -> list[dict]:
    messages, deadline = [], time.monotonic() + timeout
    while not worker.finished() and time.monotonic() < deadline:
        messages += worker.messages()
        time.sleep(0.02)
    return messages + worker.messages()


def test_worker_process_reports_progress_and_exit_status():
    script = ("import json, sys\n"
              "for i in range(3): print(json.dumps({'stage': 'register', 'step': i + 1, 'total': 3}))\n"
              "print(json.dumps({'stage': 'done'}))\n"
              "print('warning text', file=sys.stderr)\n")
    worker = mrml.WorkerProcess([sys.executable, "-c", script])
    worker.start()
    messages = _wait(worker)
    assert [m.get("step") for m in messages[:3]] == [1, 2, 3]
    assert messages[-1] == {"stage": "done"}
    assert worker.returncode == 0
    assert "warning text" in worker.error_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="checks the child through /proc")
def test_worker_cancel_kills_the_process_tree(tmp_path):
    child_pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(child_pid_file)!r}, 'w').write(str(child.pid))\n"
              "print('{\"stage\": \"register\", \"step\": 1, \"total\": 2}', flush=True)\n"
              "time.sleep(60)\n")
    worker = mrml.WorkerProcess([sys.executable, "-c", script])
    worker.start()
    deadline = time.monotonic() + 20
    while not child_pid_file.is_file() or not child_pid_file.read_text():
        assert time.monotonic() < deadline, "worker did not start its child"
        time.sleep(0.02)
    child_pid = int(child_pid_file.read_text())
    worker.cancel()
    assert worker.returncode is not None and worker.returncode != 0
    for _ in range(100):  # the orphaned child, if any, is reaped by init shortly after the kill
        try:
            with open(f"/proc/{child_pid}/stat") as handle:
                state = handle.read().split()[2]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.02)
    else:
        pytest.fail("the worker's child process survived Cancel")


def test_worker_environment_puts_module_dir_first(tmp_path):
    env = mrml.worker_environment(tmp_path, base={"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(":")[:2] == [str(tmp_path), "/elsewhere"]
