"""MRML glue between the Slicer scene and the engine: nodes in, nodes out.

This is the only place that converts between Slicer's RAS world and ITK/SimpleITK's LPS
world. It imports ``slicer`` (MRML classes only), ``vtk``, SimpleITK and numpy, never
``qt``, ``ctk`` or ``slicer.app``, so it runs unchanged in Slicer and in plain Python with
the ``slicer-core`` wheel (which is how the tests exercise it).

Sections:

- geometry: SimpleITK image <-> volume node, segmentation -> label image;
- transform: ITK displacement field -> grid transform node, segmentation propagation;
- results: table, plot and sequence nodes from the files ``agentreg register`` writes;
- worker: the command line of the worker process and the reader of its progress lines.

Axis order: SimpleITK arrays are ``(z, y, x[, component])``; so are VTK scalars once reshaped
to the image dimensions, which is why arrays move between the two without transposing.
"""

from __future__ import annotations

import csv
import enum
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

# LPS <-> RAS: flip the first two axes. The matrix is its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

DEVICE_CHOICES = {"Auto": "auto", "CPU": "cpu", "GPU": "cuda"}
"""Labels shown in the GUI mapped to the ``--device`` values of ``agentreg register``."""


class JobState(enum.Enum):
    """State of a worker job; it drives the Apply/Cancel button and the progress bar of both modules."""

    IDLE = "idle"
    RUNNING = "running"
    CANCEL_REQUESTED = "cancel requested"
    FAILED = "failed"
    SUCCEEDED = "succeeded"



# --------------------------------------------------------------------------- geometry


def _as_3d(image: sitk.Image) -> sitk.Image:
    """Return ``image`` as a 3-D image (a 2-D image becomes a single slice)."""
    if image.GetDimension() == 3:
        return image
    if image.GetDimension() == 2:
        return sitk.JoinSeries(image)
    raise ValueError(f"only 2-D and 3-D images are supported, got a {image.GetDimension()}-D image")


def ijk_to_ras_from_sitk(image: sitk.Image) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a SimpleITK image (whose geometry is in LPS)."""
    image = _as_3d(image)
    direction_lps = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), dtype=float)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction_lps @ np.diag(spacing)
    matrix[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin(), dtype=float)
    return matrix


def _vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for col in range(4):
            matrix.SetElement(row, col, float(array[row, col]))
    return matrix


def _numpy_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _image_data_from_array(array: np.ndarray) -> vtk.vtkImageData:
    """vtkImageData holding ``array`` of shape (z, y, x) or (z, y, x, components)."""
    components = array.shape[3] if array.ndim == 4 else 1
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    flat = np.ascontiguousarray(array).reshape(-1, components) if components > 1 else np.ravel(array)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(flat), deep=True)
    image_data.GetPointData().SetScalars(scalars)
    return image_data


def volume_node_from_sitk(image: sitk.Image, scene: slicer.vtkMRMLScene, name: str,
                          labelmap: bool = False,
                          node: slicer.vtkMRMLScalarVolumeNode | None = None) -> slicer.vtkMRMLScalarVolumeNode:
    """Put a SimpleITK image (LPS) into a scalar or labelmap volume node (RAS).

    A new node named ``name`` is added to ``scene`` unless ``node`` is given, in which case
    that node's voxels and geometry are replaced. Display nodes are created.
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"image for {name!r} has {image.GetNumberOfComponentsPerPixel()} components; "
                         "a volume node needs a scalar image")
    image = _as_3d(image)
    if node is None:
        node_class = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
        node = scene.AddNewNodeByClass(node_class, name)
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras_from_sitk(image)))
    node.SetAndObserveImageData(_image_data_from_array(sitk.GetArrayFromImage(image)))
    node.CreateDefaultDisplayNodes()
    return node


def sitk_from_volume_node(node: slicer.vtkMRMLVolumeNode) -> sitk.Image:
    """A SimpleITK image (LPS) with the voxels and geometry of a volume node (RAS).

    A parent transform of the node is not applied: harden it first if it matters.
    """
    image_data = node.GetImageData() if node is not None else None
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        name = node.GetName() if node is not None else "None"
        raise ValueError(f"volume {name!r} has no voxels; load or select a volume with image data")
    dims = image_data.GetDimensions()
    components = image_data.GetNumberOfScalarComponents()
    array = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    shape = (dims[2], dims[1], dims[0]) + ((components,) if components > 1 else ())
    image = sitk.GetImageFromArray(array.reshape(shape).copy(), isVector=components > 1)
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    matrix = _numpy_matrix(ijk_to_ras)
    spacing = np.array(node.GetSpacing(), dtype=float)
    direction_lps = LPS_TO_RAS @ matrix[:3, :3] @ np.diag(1.0 / spacing)
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction_lps.ravel().tolist())
    image.SetOrigin((LPS_TO_RAS @ matrix[:3, 3]).tolist())
    return image


def _same_geometry(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def segmentation_to_labelmap_sitk(segmentation_node: slicer.vtkMRMLNode,
                                  reference_volume_node: slicer.vtkMRMLVolumeNode) -> sitk.Image:
    """A binary uint8 label image (LPS) on the reference volume's grid.

    ``segmentation_node`` is a segmentation node (its visible segments are merged) or a
    labelmap volume node (non-zero voxels; resampled with nearest neighbour when its grid
    differs from the reference).
    """
    reference = sitk_from_volume_node(reference_volume_node)
    if segmentation_node is None:
        raise ValueError("no segmentation given")
    if segmentation_node.IsA("vtkMRMLSegmentationNode"):
        scene = segmentation_node.GetScene()
        labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__agentreg_export")
        try:
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportVisibleSegmentsToLabelmapNode(
                segmentation_node, labelmap_node, reference_volume_node)
            if not ok:
                raise ValueError(f"segmentation {segmentation_node.GetName()!r} could not be exported "
                                 "to a label map; check that it has a visible, non-empty segment")
            label = sitk_from_volume_node(labelmap_node)
        finally:
            scene.RemoveNode(labelmap_node)
    elif segmentation_node.IsA("vtkMRMLLabelMapVolumeNode"):
        label = sitk_from_volume_node(segmentation_node)
    else:
        raise ValueError(f"{segmentation_node.GetName()!r} is a {segmentation_node.GetClassName()}; "
                         "select a segmentation or a labelmap volume")
    if not _same_geometry(label, reference):
        label = sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    binary = sitk.Cast(sitk.NotEqual(label, 0), sitk.sitkUInt8)
    if not np.any(sitk.GetArrayViewFromImage(binary)):
        raise ValueError(f"segmentation {segmentation_node.GetName()!r} is empty inside "
                         f"volume {reference_volume_node.GetName()!r}; they may not overlap")
    return binary


def segmentation_node_from_labelmap_sitk(label: sitk.Image, scene: slicer.vtkMRMLScene, name: str,
                                         reference_volume_node: slicer.vtkMRMLVolumeNode | None = None,
                                         ) -> slicer.vtkMRMLSegmentationNode:
    """A segmentation node with one segment per non-zero label value of ``label``."""
    labelmap_node = volume_node_from_sitk(label, scene, "__agentreg_import", labelmap=True)
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    try:
        if reference_volume_node is not None:
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                labelmap_node, segmentation_node):
            raise ValueError(f"label image for {name!r} could not be imported as a segmentation")
        segmentation_node.CreateDefaultDisplayNodes()
    except BaseException:
        scene.RemoveNode(segmentation_node)
        raise
    finally:
        scene.RemoveNode(labelmap_node)
    return segmentation_node


# --------------------------------------------------------------------------- transform


def grid_transform_node_from_displacement(displacement: sitk.Image, scene: slicer.vtkMRMLScene, name: str,
                                          fixed_node: slicer.vtkMRMLNode | None = None,
                                          moving_node: slicer.vtkMRMLNode | None = None,
                                          ) -> slicer.vtkMRMLGridTransformNode:
    """A grid transform node from an ITK displacement field.

    ``displacement`` is a vector image in the fixed geometry (LPS) in ITK's convention: it
    maps a fixed-space point ``x`` to the moving-space point ``x + u(x)`` (the resampling
    direction). In Slicer that mapping is the transform *from parent*: a node placed under
    this transform (the moving volume or segmentation) is shown in the fixed space. Vectors
    and grid are converted to RAS here. ``fixed_node``/``moving_node`` are recorded with
    Slicer's spatial-registration node references.
    """
    components = displacement.GetNumberOfComponentsPerPixel()
    if components not in (2, 3) or components != displacement.GetDimension():
        raise ValueError(f"displacement field {name!r} must have one vector component per dimension "
                         f"(got {components} components in a {displacement.GetDimension()}-D image)")
    vectors = sitk.GetArrayFromImage(displacement).astype(np.float64)
    if components == 2:
        vectors = np.concatenate([vectors, np.zeros(vectors.shape[:-1] + (1,))], axis=-1)[None]
        grid = sitk.JoinSeries(sitk.VectorIndexSelectionCast(displacement, 0))
    else:
        grid = displacement
    vectors_ras = vectors * np.diag(LPS_TO_RAS)
    ijk_to_ras = ijk_to_ras_from_sitk(grid)
    spacing = np.array(grid.GetSpacing(), dtype=float)

    image_data = _image_data_from_array(vectors_ras)
    image_data.SetOrigin(ijk_to_ras[:3, 3].tolist())
    image_data.SetSpacing(spacing.tolist())
    direction = np.eye(4)
    direction[:3, :3] = ijk_to_ras[:3, :3] @ np.diag(1.0 / spacing)

    grid_transform = slicer.vtkOrientedGridTransform()
    grid_transform.SetDisplacementGridData(image_data)
    grid_transform.SetGridDirectionMatrix(_vtk_matrix(direction))
    grid_transform.SetInterpolationModeToLinear()

    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    node.SetAndObserveTransformFromParent(grid_transform)
    node.CreateDefaultDisplayNodes()
    if fixed_node is not None:
        node.SetNodeReferenceID(node.GetFixedNodeReferenceRole(), fixed_node.GetID())
    if moving_node is not None:
        node.SetNodeReferenceID(node.GetMovingNodeReferenceRole(), moving_node.GetID())
    return node


def _physical_points_lps(image: sitk.Image) -> np.ndarray:
    """LPS points of every voxel, shape (z, y, x, 3)."""
    size = image.GetSize()
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in size[::-1]], indexing="ij")[::-1], axis=-1)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    return np.array(image.GetOrigin()) + (index * np.array(image.GetSpacing())) @ direction.T


def resample_label_through_transform(label: sitk.Image, transform_node: slicer.vtkMRMLTransformNode,
                                     reference: sitk.Image) -> sitk.Image:
    """Resample a label image (LPS) onto ``reference``'s grid through a transform node.

    Each reference voxel centre (world/fixed space) is mapped by the node's world-to-node
    transform (the grid's "from parent" mapping for a top-level node) into the label's space
    and takes the nearest label value: one nearest-neighbour resampling, as
    ``sitk.Resample(label, reference, displacement_transform, sitk.sitkNearestNeighbor)`` does.
    """
    label = _as_3d(label)
    reference = _as_3d(reference)
    points_ras = _physical_points_lps(reference).reshape(-1, 3) * np.diag(LPS_TO_RAS)
    world_to_node = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, transform_node, world_to_node)
    source = vtk.vtkPoints()
    source.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(points_ras), deep=True))
    mapped = vtk.vtkPoints()
    world_to_node.TransformPoints(source, mapped)
    mapped_lps = numpy_support.vtk_to_numpy(mapped.GetData()).astype(float) * np.diag(LPS_TO_RAS)
    direction = np.array(label.GetDirection(), dtype=float).reshape(3, 3)
    index_to_lps = direction @ np.diag(label.GetSpacing())
    continuous = (mapped_lps - np.array(label.GetOrigin())) @ np.linalg.inv(index_to_lps).T
    index = np.floor(continuous + 0.5).astype(np.int64)  # ITK's nearest-neighbour rounding
    size = np.array(label.GetSize())
    inside = np.all((index >= 0) & (index < size), axis=1)
    values = sitk.GetArrayViewFromImage(label)
    out = np.zeros(len(index), dtype=values.dtype)
    out[inside] = values[index[inside, 2], index[inside, 1], index[inside, 0]]
    result = sitk.GetImageFromArray(out.reshape(sitk.GetArrayViewFromImage(reference).shape[:3]))
    result.CopyInformation(reference)
    return result


def _segment_labels_sitk(segmentation_node: slicer.vtkMRMLSegmentationNode) -> tuple[sitk.Image, list[str]]:
    """All segments as one label image (value i+1 for segment i) in the segmentation's own geometry."""
    scene = segmentation_node.GetScene()
    segmentation = segmentation_node.GetSegmentation()
    segment_ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if not segment_ids:
        raise ValueError(f"segmentation {segmentation_node.GetName()!r} has no segments")
    ids = vtk.vtkStringArray()
    for segment_id in segment_ids:
        ids.InsertNextValue(segment_id)
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__agentreg_export")
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap_node, None):
            raise ValueError(f"segmentation {segmentation_node.GetName()!r} could not be exported to a label map")
        label = sitk_from_volume_node(labelmap_node)
    finally:
        scene.RemoveNode(labelmap_node)
    return label, segment_ids


def propagate_segmentation(segmentation_node: slicer.vtkMRMLNode, transform_node: slicer.vtkMRMLTransformNode,
                           fixed_volume_node: slicer.vtkMRMLVolumeNode, name: str,
                           ) -> slicer.vtkMRMLSegmentationNode:
    """Carry a moving segmentation (or labelmap volume) onto the fixed volume's grid.

    The moving labels are resampled once, through the transform node, onto the fixed grid
    (hardening a non-linear transform on a segmentation and then changing its geometry would
    resample twice and lose boundary voxels). Segment names and colours are kept; the input
    node is not changed.
    """
    scene = fixed_volume_node.GetScene()
    reference = sitk_from_volume_node(fixed_volume_node)
    if segmentation_node.IsA("vtkMRMLSegmentationNode"):
        label, segment_ids = _segment_labels_sitk(segmentation_node)
    elif segmentation_node.IsA("vtkMRMLLabelMapVolumeNode"):
        label, segment_ids = sitk_from_volume_node(segmentation_node), []
    else:
        raise ValueError(f"{segmentation_node.GetName()!r} is a {segmentation_node.GetClassName()}; "
                         "select a segmentation or a labelmap volume to propagate")
    warped = resample_label_through_transform(label, transform_node, reference)
    if not np.any(sitk.GetArrayViewFromImage(warped)):
        raise ValueError(f"segmentation {segmentation_node.GetName()!r} lies outside volume "
                         f"{fixed_volume_node.GetName()!r} after the transform; nothing to propagate")
    result = segmentation_node_from_labelmap_sitk(warped, scene, name, fixed_volume_node)
    source = segmentation_node.GetSegmentation() if segment_ids else None
    target = result.GetSegmentation()
    for i in range(target.GetNumberOfSegments()):
        segment = target.GetNthSegment(i)
        value = int(segment.GetLabelValue()) if hasattr(segment, "GetLabelValue") else i + 1
        if source is not None and 1 <= value <= len(segment_ids):
            original = source.GetSegment(segment_ids[value - 1])
            segment.SetName(original.GetName())
            segment.SetColor(original.GetColor())
    return result


# --------------------------------------------------------------------------- results


def read_trajectory_csv(path: str | Path) -> dict[str, list]:
    """Columns of ``trajectory.csv``: numbers as floats (empty cells as NaN), other text kept."""
    columns = read_csv_columns(path, ("step", "action"), "trajectory file")
    if not columns["step"]:
        raise ValueError(f"trajectory file {path} has no steps")
    return columns


def table_node_from_columns(columns: dict[str, Sequence], scene: slicer.vtkMRMLScene, name: str,
                            ) -> slicer.vtkMRMLTableNode:
    """A table node with one column per entry: float columns as doubles, others as strings."""
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
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    node.SetAndObserveTable(table)
    return node


METRIC_ROWS = (
    ("Dice", "dice"),
    ("Hausdorff (mm)", "hausdorff"),
    ("Hausdorff 95% (mm)", "hausdorff95"),
)
SINGLE_METRIC_ROWS = (
    ("Jacobian folding (%)", "jacobian_folding_percent"),
    ("log-Jacobian std", "log_jacobian_std"),
    ("Run time (s)", "seconds"),
)


def metrics_table_node(metrics: dict[str, float], scene: slicer.vtkMRMLScene, name: str,
                       ) -> slicer.vtkMRMLTableNode:
    """Table of ``metrics.json``: Dice and Hausdorff before/after, then single-valued metrics."""
    names, before, after = [], [], []
    for label, key in METRIC_ROWS:
        if f"{key}_after" in metrics:
            names.append(label)
            before.append(float(metrics.get(f"{key}_before", math.nan)))
            after.append(float(metrics[f"{key}_after"]))
    for label, key in SINGLE_METRIC_ROWS:
        if key in metrics:
            names.append(label)
            before.append(math.nan)
            after.append(float(metrics[key]))
    return table_node_from_columns({"Metric": names, "Before": before, "After": after}, scene, name)


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


def step_number(path: Path) -> int:
    """The agent step encoded in a file name like ``warped_0010.nii.gz``."""
    stem = path.name.split(".")[0]
    try:
        return int(stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"cannot read the step number from file name {path.name!r}") from None


def step_sequence_nodes(step_files: Iterable[Path], scene: slicer.vtkMRMLScene, name: str,
                        sequences_logic: Any = None,
                        ) -> tuple[slicer.vtkMRMLSequenceNode, slicer.vtkMRMLSequenceBrowserNode]:
    """A sequence of warped volumes indexed by agent step, and a browser showing it.

    ``sequences_logic`` is Slicer's sequences module logic (``slicer.modules.sequences.logic()``);
    without it a logic is made for ``scene``. The browser's proxy node is the volume shown.
    """
    files = sorted(step_files, key=step_number)
    if not files:
        raise ValueError("no step volumes to put into a sequence")
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    sequence.SetIndexName("step")
    sequence.SetIndexUnit("")
    sequence.SetIndexType(slicer.vtkMRMLSequenceNode.NumericIndex)
    for path in files:
        volume = slicer.vtkMRMLScalarVolumeNode()
        image = _as_3d(sitk.ReadImage(str(path)))
        volume.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras_from_sitk(image)))
        volume.SetAndObserveImageData(_image_data_from_array(sitk.GetArrayFromImage(image)))
        volume.SetName(f"{name} step {step_number(path)}")
        sequence.SetDataNodeAtValue(volume, str(step_number(path)))
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
    extra_nodes: list = field(default_factory=list)

    def all_nodes(self) -> list:
        """Every node of the result that is in the scene (for clean-up)."""
        nodes = [self.warped_volume, self.transform, self.trajectory_table, self.trajectory_chart,
                 self.metrics_table, self.step_sequence, self.step_browser, *self.extra_nodes]
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
                            sequences_logic: Any = None) -> RegistrationResultNodes:
    """Make the result nodes from the folder a successful ``agentreg register`` wrote.

    All or nothing: if anything fails, every node made here is removed again.
    """
    output_dir = Path(output_dir)
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        warped = volume_node_from_sitk(sitk.ReadImage(str(output_dir / "warped.nii.gz")), scene,
                                       f"{name} warped")
        transform = grid_transform_node_from_displacement(
            sitk.ReadImage(str(output_dir / "displacement.nii.gz"), sitk.sitkVectorFloat64), scene,
            f"{name} transform", fixed_node, moving_node)
        trajectory_table = table_node_from_columns(read_trajectory_csv(output_dir / "trajectory.csv"),
                                                   scene, f"{name} trajectory")
        chart = trajectory_plot_chart_node(trajectory_table, scene, f"{name} trajectory chart")
        metrics_path = output_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        result = RegistrationResultNodes(warped, transform, trajectory_table, chart, metrics)
        if metrics:
            result.metrics_table = metrics_table_node(metrics, scene, f"{name} metrics")
        step_files = sorted((output_dir / "steps").glob("warped_*.nii*"))
        if step_files:
            result.step_sequence, result.step_browser = step_sequence_nodes(
                step_files, scene, f"{name} steps", sequences_logic)
        known = {n.GetID() for n in result.all_nodes()}
        result.extra_nodes = [n for n in _new_nodes_since(scene, before) if n.GetID() not in known
                              and not n.IsA("vtkMRMLDisplayNode") and not n.IsA("vtkMRMLStorageNode")]
        return result
    except BaseException:
        for node in reversed(_new_nodes_since(scene, before)):
            if scene.IsNodePresent(node):
                scene.RemoveNode(node)
        raise


# --------------------------------------------------------------------------- worker


def shipped_models(models_dir: str | Path) -> dict[str, Path]:
    """Model bundles shipped with the extension: ``{name: path}`` for ``<models_dir>/<name>.pt``."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return {}
    return {path.stem: path for path in sorted(models_dir.glob("*.pt"))}


def register_command(python: str, fixed: Path, moving: Path, model: Path, output_dir: Path, *,
                     fixed_label: Path | None = None, moving_label: Path | None = None,
                     device: str = "Auto", steps: int | None = None, seed: int = 0,
                     fuzzy_action_control: bool = True, fuzzy_k: float = 1.5,
                     save_steps: int = 0) -> list[str]:
    """The worker command line for ``agentreg register`` (``python -m AgentRegistrationLib.cli``).

    ``steps`` ``None`` (or 0): the model's own default number of MDP steps."""
    if device not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {sorted(DEVICE_CHOICES)}, got {device!r}")
    if steps is not None and steps < 0:
        raise ValueError(f"steps must be at least 1 (or 0 for the model's default), got {steps}")
    command = [python, "-m", "AgentRegistrationLib.cli", "register",
               "--fixed", str(fixed), "--moving", str(moving), "--model", str(model),
               "--output-dir", str(output_dir), "--device", DEVICE_CHOICES[device], "--seed", str(int(seed))]
    if steps:
        command += ["--steps", str(int(steps))]
    if fixed_label is not None:
        command += ["--fixed-label", str(fixed_label)]
    if moving_label is not None:
        command += ["--moving-label", str(moving_label)]
    command += ["--fuzzy-k", repr(float(fuzzy_k))] if fuzzy_action_control else ["--no-fuzzy"]
    if save_steps > 0:
        command += ["--save-steps", str(int(save_steps))]
    return command + ["--progress-json"]


def cli_command(python: str, subcommand: str, options: dict[str, Any],
                positional: Sequence[Any] = ()) -> list[str]:
    """``python -m AgentRegistrationLib.cli SUBCOMMAND POSITIONAL... --option value ... --progress-json``.

    Option names are written with dashes; ``True`` adds a bare flag, ``False``/``None`` omit it.
    """
    command = [python, "-m", "AgentRegistrationLib.cli", subcommand, *(str(p) for p in positional)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is not False and value is not None:
            command += [flag, str(value)]
    return command + ["--progress-json"]


TRAINING_CONFIGURATIONS = ("compact", "paper")
"""Training configurations by name (``agentreg train --config``)."""
GT_DICE_COLUMNS = ("moving", "fixed", "dice_before", "dice_after", "seconds")
LOSS_COLUMNS = ("iteration", "loss", "held_out_accuracy", "validation_dice")


@dataclass(frozen=True)
class TrainingFiles:
    """Where the three training stages write, under one output folder (each stage resumes from it)."""

    output_folder: Path
    model_name: str

    @property
    def groundtruth(self) -> Path:
        return Path(self.output_folder) / "groundtruth"

    @property
    def gt_dice(self) -> Path:
        return self.groundtruth / "gt_dice.csv"

    @property
    def gt_summary(self) -> Path:
        return self.groundtruth / "summary.json"

    @property
    def sdm(self) -> Path:
        return Path(self.output_folder) / "sdm.npz"

    @property
    def bundle(self) -> Path:
        return Path(self.output_folder) / f"{self.model_name}.pt"

    @property
    def checkpoint(self) -> Path:
        return Path(self.output_folder) / "checkpoints" / f"{self.model_name}.checkpoint.pt"

    @property
    def loss(self) -> Path:
        """``loss.csv``, which ``agentreg train`` writes beside its checkpoint."""
        return self.checkpoint.with_name("loss.csv")


def training_commands(python: str, data: str | Path, files: TrainingFiles, *, dim: int = 3,
                      configuration: str = "compact", device: str = "Auto", modes: int | None = None,
                      split: str | Path | None = None, max_minutes: float | None = None) -> list[list[str]]:
    """Worker command lines of the three stages: ``agentreg groundtruth``, ``sdm`` and ``train``.

    ``max_minutes`` stops the training stage after that long (it checkpoints; a rerun goes on).

    ``modes`` defaults to the paper's d (15 in 2-D, 25 in 3-D). A rerun of the same commands resumes:
    the ground truth from its per-pair cache, training from ``files.checkpoint``.
    """
    if dim not in (2, 3):
        raise ValueError(f"dimension must be 2 or 3, got {dim}")
    if configuration not in TRAINING_CONFIGURATIONS:
        raise ValueError(f"training configuration must be one of {TRAINING_CONFIGURATIONS}, got {configuration!r}")
    if device not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {sorted(DEVICE_CHOICES)}, got {device!r}")
    modes = modes or (15 if dim == 2 else 25)
    return [
        cli_command(python, "groundtruth", {"out": files.groundtruth, "dim": dim, "split": split}, positional=[data]),
        cli_command(python, "sdm", {"modes": modes, "out": files.sdm}, positional=[files.groundtruth]),
        cli_command(python, "train", {"groundtruth": files.groundtruth, "sdm": files.sdm, "out": files.bundle,
                                      "config": configuration, "checkpoint": files.checkpoint,
                                      "device": DEVICE_CHOICES[device], "max_minutes": max_minutes}),
    ]


def read_csv_columns(path: str | Path, required: Sequence[str], what: str) -> dict[str, list]:
    """Columns of a CSV the engine wrote; numbers as floats (empty cells and 'nan' as NaN), other text kept.

    Raises ``ValueError`` naming ``what`` and the missing columns when ``required`` ones are absent.
    """
    path = Path(path)
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        names = reader.fieldnames or []
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"{what} {path} lacks the columns {missing} (has {names}); was it written by this version?")
    columns: dict[str, list] = {name: [row[name] for row in rows] for name in names}
    for name, values in columns.items():
        try:
            columns[name] = [float(v) if v not in ("", None) else math.nan for v in values]
        except ValueError:
            pass
    return columns


def read_groundtruth_dice(path: str | Path) -> dict[str, list]:
    """``gt_dice.csv`` of ``agentreg groundtruth``: moving, fixed, dice_before, dice_after, seconds."""
    return read_csv_columns(path, GT_DICE_COLUMNS, "ground-truth Dice file")


def read_training_loss(path: str | Path) -> dict[str, list]:
    """``loss.csv`` of ``agentreg train``: iteration, loss, held_out_accuracy, validation_dice."""
    return read_csv_columns(path, LOSS_COLUMNS, "training loss file")


def progress_text(message: dict[str, Any]) -> str:
    """One status line for a worker message, e.g. ``train 150/20000, loss 0.0123, accuracy 0.41``."""
    stage = message.get("stage", "")
    if stage == "error":
        return f"error: {message.get('message', '')}"
    if "message" in message and "total" not in message:
        return f"{stage}: {message['message']}"
    text = str(stage)
    done = message.get("step", message.get("done"))
    if done is not None and message.get("total"):
        text += f" {done}/{message['total']}"
    details = [f"{k} {message[k]:.4g}" for k in ("loss", "accuracy", "val_dice", "dice")
               if isinstance(message.get(k), (int, float))]
    return ", ".join([text, *details])


def worker_environment(module_dir: str | Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the worker: ``module_dir`` (holding ``AgentRegistrationLib``) on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    paths = [str(module_dir)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def parse_progress_line(line: str) -> dict[str, Any]:
    """One stdout line of the worker as a message; non-JSON lines become ``{"stage": "log"}``."""
    text = line.strip()
    try:
        message = json.loads(text)
    except json.JSONDecodeError:
        return {"stage": "log", "message": text}
    if not isinstance(message, dict) or "stage" not in message:
        return {"stage": "log", "message": text}
    return message


def progress_fraction(message: dict[str, Any]) -> float | None:
    """Fraction done (0..1) of a progress message, or None when it carries no count."""
    total = message.get("total")
    done = message.get("step", message.get("done"))
    if not total or done is None:
        return None
    return min(max(float(done) / float(total), 0.0), 1.0)


class WorkerProcess:
    """A worker process whose stdout lines are parsed into messages by a reader thread.

    The GUI polls :meth:`messages` from a timer, so Slicer never blocks on the pipe.
    :meth:`cancel` kills the worker and everything it started (its process group).
    """

    def __init__(self, command: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None):
        self.command = command
        self.env = env
        self.cwd = cwd
        self.process: subprocess.Popen | None = None
        self.stderr_lines: list[str] = []
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the process and its reader threads."""
        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, text=True, bufsize=1, env=self.env,
                                        cwd=self.cwd, **kwargs)
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            if line.strip():
                self._queue.put(parse_progress_line(line))
        self.process.stdout.close()

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr_lines.append(line.rstrip("\n"))
        self.process.stderr.close()

    def messages(self) -> list[dict[str, Any]]:
        """Messages that arrived since the last call (never blocks)."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def is_running(self) -> bool:
        """True while the process has not exited."""
        return self.process is not None and self.process.poll() is None

    def finished(self) -> bool:
        """True once the process has exited and its output has been read completely."""
        return (self.process is not None and self.process.poll() is not None
                and not any(t.is_alive() for t in self._threads))

    @property
    def returncode(self) -> int | None:
        """Exit status, None while running."""
        return None if self.process is None else self.process.poll()

    def error_text(self, last_lines: int = 20) -> str:
        """The last lines the worker wrote to stderr, for an error message."""
        return "\n".join(self.stderr_lines[-last_lines:])

    def cancel(self, timeout: float = 5.0) -> None:
        """Kill the worker and the processes it started, then wait for it."""
        if self.process is None or self.process.poll() is not None:
            return
        if sys.platform == "win32":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        else:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=timeout)
