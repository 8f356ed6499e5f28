"""The nodes a registration leaves in the scene: warped volume, transform, propagated segmentation, metrics
table, trajectory chart, step sequences and the fixed crop box, read from a register folder."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from AgentRegistrationLib.contract import register_folder
from vtk.util import numpy_support

from AgentRegistrationGUILib.nodes import (
    LPS_TO_RAS,
    SlicePlane,
    _as_3d,
    _image_data_from_array,
    _vtk_matrix,
    grid_transform_node_from_displacement,
    ijk_to_ras_from_sitk,
    propagate_segmentation,
    ras_from_lps,
    volume_node_from_sitk,
)

# --------------------------------------------------------------------------- results


def table_node_from_columns(columns: dict[str, Sequence], scene: slicer.vtkMRMLScene, name: str,
                            node: slicer.vtkMRMLTableNode | None = None) -> slicer.vtkMRMLTableNode:
    """A table node with one column per entry: float columns as doubles, others as strings.

    A new node named ``name`` unless ``node`` is given, whose table is then replaced."""
    table = vtk.vtkTable()
    for column_name, values in columns.items():
        if all(isinstance(v, (int, float, np.number)) for v in values):
            array = vtk.vtkDoubleArray()
            for v in values:
                array.InsertNextValue(float(v))
        else:
            array = vtk.vtkStringArray()
            for v in values:
                array.InsertNextValue(str(v))
        array.SetName(column_name)
        table.AddColumn(array)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    node.SetAndObserveTable(table)
    return node


METRIC_ROWS = (
    ("Dice", "dice"),
    ("Hausdorff (mm)", "hausdorff"),
    ("Hausdorff 95% (mm)", "hausdorff95"),
    ("Average surface distance (mm)", "average_surface_distance"),
)
"""Rows with a value before and after registration: ``<key>_before`` / ``<key>_after`` of metrics.json."""
SINGLE_METRIC_ROWS = (
    ("Jacobian folding (%)", "jacobian_folding_percent"),
    ("log-Jacobian std", "log_jacobian_std"),
    ("Agent steps", "steps"),
    ("Run time (s)", "seconds_total"),
)
"""Rows with one value (in the After column); keys of :data:`register_folder.METRICS_SCHEMA`."""


def per_label_rows(metrics: dict) -> list[tuple[str, str]]:
    """``(row name, metrics.json key after registration)`` of each per-label metric, by label value then metric."""
    found = [register_folder.METRICS_PER_LABEL_KEY.match(k) for k in metrics]
    after = sorted((int(m[3]), m[1]) for m in found if m and m[2] == "after")
    names = {"dice": "Dice", "hausdorff": "Hausdorff (mm)"}
    return [(f"{names[metric]} label {value}", f"{metric}_after_label_{value}") for value, metric in after]


def metrics_table_node(metrics: dict, scene: slicer.vtkMRMLScene, name: str,
                       node: slicer.vtkMRMLTableNode | None = None) -> slicer.vtkMRMLTableNode:
    """Table of metrics.json (checked against the schema): Dice and distances before/after (of the union of the
    labels), then Dice and Hausdorff of each label value apart when the labels hold several
    (:data:`register_folder.METRICS_PER_LABEL`), then single values."""
    register_folder.check_metrics(metrics)
    names, before, after = [], [], []
    for label, key in METRIC_ROWS:
        if f"{key}_after" in metrics:
            names.append(label + (" (all labels)" if per_label_rows(metrics) else ""))
            before.append(float(metrics.get(f"{key}_before", math.nan)))
            after.append(float(metrics[f"{key}_after"]))
    for label, key in per_label_rows(metrics):
        names.append(label)
        before.append(float(metrics.get(key.replace("_after_", "_before_"), math.nan)))
        after.append(float(metrics[key]))
    for label, key in SINGLE_METRIC_ROWS:
        if key in metrics:
            names.append(label)
            before.append(math.nan)
            after.append(float(metrics[key]))
    return table_node_from_columns({"Metric": names, "Before": before, "After": after}, scene, name, node)


def trajectory_plot_chart_node(table_node: slicer.vtkMRMLTableNode, scene: slicer.vtkMRMLScene, name: str,
                               ) -> slicer.vtkMRMLPlotChartNode:
    """A chart of the trajectory table: the max Q-value per step and, when present, Dice.

    Adds a ``q_max`` column to the table (computed from the ``q_*`` columns).
    """
    table = table_node.GetTable()
    column_names = [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]
    q_names = sorted((c for c in column_names if c.startswith("q_")), key=lambda c: int(c[2:]))
    series_columns = []
    if q_names:
        q_values = np.stack([numpy_support.vtk_to_numpy(table.GetColumnByName(c)) for c in q_names], axis=1)
        q_max = numpy_support.numpy_to_vtk(np.nanmax(q_values, axis=1).astype(np.float64), deep=True)
        q_max.SetName("q_max")
        table.AddColumn(q_max)
        series_columns.append(("q_max", "max Q-value"))
    if "dice" in column_names and not np.all(np.isnan(numpy_support.vtk_to_numpy(table.GetColumnByName("dice")))):
        series_columns.append(("dice", "Dice"))
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    chart.SetTitle("Agent trajectory")
    chart.SetXAxisTitle("step")
    for column, title in series_columns:
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {title}")
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName("step")
        series.SetYColumnName(column)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        series.SetUniqueColor()
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return chart


def step_sequence_nodes(step_files: Iterable[Path], scene: slicer.vtkMRMLScene, name: str,
                        sequences_logic: Any = None, convert: Any = None,
                        ) -> tuple[slicer.vtkMRMLSequenceNode, slicer.vtkMRMLSequenceBrowserNode]:
    """A sequence of warped volumes indexed by agent step, and a browser showing it (``convert``: applied to
    each image read, e.g. :meth:`SlicePlane.to_3d`).

    ``sequences_logic`` is Slicer's sequences module logic (``slicer.modules.sequences.logic()``);
    without it a logic is made for ``scene``. The browser's proxy node is the volume shown.
    """
    files = sorted(step_files, key=register_folder.step_number)
    if not files:
        raise ValueError("no step volumes to put into a sequence")
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    sequence.SetIndexName("step")
    sequence.SetIndexUnit("")
    sequence.SetIndexType(slicer.vtkMRMLSequenceNode.NumericIndex)
    for path in files:
        volume = slicer.vtkMRMLScalarVolumeNode()
        image = sitk.ReadImage(str(path))
        image = _as_3d(convert(image) if convert is not None else image)
        volume.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras_from_sitk(image)))
        volume.SetAndObserveImageData(_image_data_from_array(sitk.GetArrayFromImage(image)))
        volume.SetName(f"{name} step {register_folder.step_number(path)}")
        sequence.SetDataNodeAtValue(volume, str(register_folder.step_number(path)))
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", f"{name} browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.SetOverwriteProxyName(sequence, True)
    if sequences_logic is None:
        sequences_logic = slicer.vtkSlicerSequencesLogic()
        sequences_logic.SetMRMLScene(scene)
    sequences_logic.UpdateProxyNodesFromSequences(browser)
    browser.SetSelectedItemNumber(len(files) - 1)
    sequences_logic.UpdateProxyNodesFromSequences(browser)
    proxy = browser.GetProxyNode(sequence)
    if proxy is not None:
        proxy.CreateDefaultDisplayNodes()
    return sequence, browser


def fixed_crop_roi_node(metrics: dict, scene: slicer.vtkMRMLScene, name: str, plane: SlicePlane | None = None
                        ) -> slicer.vtkMRMLMarkupsROINode | None:
    """The fixed crop box the agent worked on (metrics.json's ``fixed_crop_*``) as a markups ROI on the fixed volume,
    locked, so that a user sees where the localiser (or a point) placed it; a 2-D model's crop lies on ``plane`` (the
    fixed slice), one slice thick. ``None`` for metrics without it, or a 2-D crop without its slice."""
    centre, size = metrics.get("fixed_crop_centre"), metrics.get("fixed_crop_size")
    if centre is None or size is None:
        return None
    axes = np.asarray(metrics["fixed_crop_axes"], dtype=float).reshape(len(centre), len(centre))
    if len(centre) == 2:
        if plane is None:
            return None
        centre, size, axes = plane.box_to_3d(centre, size, axes)
    axes_ras = LPS_TO_RAS @ axes
    matrix = np.eye(4)
    matrix[:3, :3] = axes_ras
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.CreateDefaultDisplayNodes()
    roi.SetAndObserveObjectToNodeMatrix(_vtk_matrix(matrix))
    roi.SetCenter(*ras_from_lps(centre))
    roi.SetSize(*[float(v) for v in size])
    roi.SetLocked(True)
    roi.SetDescription(f"fixed crop placed by the {metrics.get('fixed_crop_placed_by', '?')}")
    return roi


@dataclass
class RegistrationResultNodes:
    """The nodes made from one ``agentreg register`` run."""

    warped_volume: slicer.vtkMRMLScalarVolumeNode
    transform: slicer.vtkMRMLGridTransformNode
    trajectory_table: slicer.vtkMRMLTableNode
    trajectory_chart: slicer.vtkMRMLPlotChartNode
    metrics: dict[str, float]
    metrics_table: slicer.vtkMRMLTableNode | None = None
    step_sequence: slicer.vtkMRMLSequenceNode | None = None
    step_browser: slicer.vtkMRMLSequenceBrowserNode | None = None
    fixed_crop: slicer.vtkMRMLMarkupsROINode | None = None
    propagated_segmentation: slicer.vtkMRMLSegmentationNode | None = None  # the moving segmentation on the fixed volume
    extra_nodes: list = field(default_factory=list)

    def all_nodes(self) -> list:
        """Every node of the result that is in the scene (for clean-up)."""
        nodes = [self.warped_volume, self.transform, self.trajectory_table, self.trajectory_chart,
                 self.metrics_table, self.step_sequence, self.step_browser, self.fixed_crop,
                 self.propagated_segmentation, *self.extra_nodes]
        return [n for n in nodes if n is not None]


def _new_nodes_since(scene: slicer.vtkMRMLScene, before: set[str]) -> list:
    nodes = []
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.GetID() not in before:
            nodes.append(node)
    return nodes


def import_register_results(output_dir: str | Path, scene: slicer.vtkMRMLScene,
                            fixed_node: slicer.vtkMRMLScalarVolumeNode,
                            moving_node: slicer.vtkMRMLScalarVolumeNode, name: str,
                            sequences_logic: Any = None,
                            warped_node: slicer.vtkMRMLScalarVolumeNode | None = None,
                            transform_node: slicer.vtkMRMLGridTransformNode | None = None,
                            metrics_node: slicer.vtkMRMLTableNode | None = None,
                            plane: SlicePlane | None = None, moving_segmentation: slicer.vtkMRMLNode | None = None,
                            propagated_node: slicer.vtkMRMLSegmentationNode | None = None) -> RegistrationResultNodes:
    """Make the result nodes from the folder a successful ``agentreg register`` wrote.

    ``plane``: the fixed slice whose 2-D frame the worker's images were in (a 2-D model on a single-slice volume);
    its 2-D outputs are brought back onto the slice's 3-D position and orientation.

    ``moving_segmentation``: the moving volume's segmentation (or labelmap volume), carried onto the fixed volume
    through the transform (:func:`nodes.propagate_segmentation`): the propagated segmentation
    ``<segmentation> on <fixed>``, segment names and colours kept.

    ``warped_node``, ``transform_node``, ``metrics_node``, ``propagated_node``: output nodes the user chose (filled in
    place); the others are created. All or nothing: if anything fails, every node created here is removed again
    (nodes the user chose keep their new content only on success: they are filled last).
    """
    output_dir = Path(output_dir)
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        on_slice = plane.to_3d if plane is not None else (lambda image: image)
        warped_image = on_slice(sitk.ReadImage(str(output_dir / register_folder.WARPED)))
        displacement = on_slice(sitk.ReadImage(str(output_dir / register_folder.DISPLACEMENT), sitk.sitkVectorFloat64))
        metrics = register_folder.read_metrics(output_dir / register_folder.METRICS_JSON)
        trajectory_table = table_node_from_columns(register_folder.read_trajectory(output_dir / register_folder.TRAJECTORY_CSV),
                                                   scene, f"{name} trajectory")
        chart = trajectory_plot_chart_node(trajectory_table, scene, f"{name} trajectory chart")
        step_files = sorted((output_dir / register_folder.STEPS_DIR).glob("warped_*.nii*"))
        sequence = browser = None
        if step_files:
            sequence, browser = step_sequence_nodes(step_files, scene, f"{name} steps", sequences_logic, on_slice)
        transform = grid_transform_node_from_displacement(displacement, scene, f"{name} transform", fixed_node,
                                                          moving_node, node=transform_node)
        propagated = None
        if moving_segmentation is not None:
            propagated = propagate_segmentation(
                moving_segmentation, transform, fixed_node,
                scene.GenerateUniqueName(f"{moving_segmentation.GetName()} on {fixed_node.GetName()}"),
                node=propagated_node)
        warped = volume_node_from_sitk(warped_image, scene, f"{name} warped", node=warped_node)
        table = metrics_table_node(metrics, scene, f"{name} metrics", node=metrics_node)
        crop = fixed_crop_roi_node(metrics, scene, f"{name} fixed crop", plane)
        result = RegistrationResultNodes(warped, transform, trajectory_table, chart, metrics, table, sequence, browser,
                                         crop, propagated)
        known = {n.GetID() for n in result.all_nodes()}
        result.extra_nodes = [n for n in _new_nodes_since(scene, before) if n.GetID() not in known
                              and not n.IsA("vtkMRMLDisplayNode") and not n.IsA("vtkMRMLStorageNode")]
        return result
    except BaseException:
        for node in reversed(_new_nodes_since(scene, before)):
            if scene.IsNodePresent(node):
                scene.RemoveNode(node)
        raise
