"""MRML glue between the Slicer scene and the engine: nodes in, nodes out.

This is the only place that converts between Slicer's RAS world and ITK/SimpleITK's LPS
world. It imports ``slicer`` (MRML classes only), ``vtk``, SimpleITK and numpy, never
``qt``, ``ctk`` or ``slicer.app``, so it runs unchanged in Slicer and in plain Python with
the ``slicer-core`` wheel (which is how the tests exercise it).

Sections:

- geometry: SimpleITK image <-> volume node, segmentation -> label image;
- transform: ITK displacement field -> grid transform node, segmentation propagation;
- results: table, plot and sequence nodes from the files ``agentreg register`` writes;
- registration job: the module Logic's route from nodes to a worker and from its folder back to nodes.

File names, the metrics schema, the worker's messages and command lines are the engine's contract,
defined once in :mod:`.protocol`; nothing here re-spells them.

Axis order: SimpleITK arrays are ``(z, y, x[, component])``; so are VTK scalars once reshaped
to the image dimensions, which is why arrays move between the two without transposing.
"""

from __future__ import annotations

import csv
import math
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from . import protocol

# LPS <-> RAS: flip the first two axes. The matrix is its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def lps_from_ras(point: Sequence[float]) -> np.ndarray:
    """A physical point in LPS (ITK) from RAS (Slicer), with the module's one conversion matrix."""
    return LPS_TO_RAS @ np.asarray(point, dtype=float)


def ras_from_lps(point: Sequence[float]) -> np.ndarray:
    """A physical point in RAS (Slicer) from LPS (ITK)."""
    return LPS_TO_RAS @ np.asarray(point, dtype=float)


def markups_point_lps(markups_node: slicer.vtkMRMLNode) -> np.ndarray:
    """The first control point of a markups node, in world coordinates (its parent transforms applied), as LPS."""
    if markups_node.GetNumberOfControlPoints() < 1:
        raise ValueError(f"markups {markups_node.GetName()!r} has no point: place one on the prostate in the fixed "
                         "volume, or clear the point selection")
    ras = [0.0, 0.0, 0.0]
    markups_node.GetNthControlPointPositionWorld(0, ras)
    return lps_from_ras(ras)

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


@dataclass(frozen=True)
class SlicePlane:
    """A single-slice volume (Slicer holds every volume as 3-D) as the 2-D image a 2-D model registers.

    The 2-D frame: its axes are the slice's two in-plane voxel axes (``axes``, in 3-D axis order), its origin
    the slice's first voxel, its direction the identity; so a 2-D output on that grid is the slice itself, and
    a 2-D vector ``(a, b)`` is ``a * u + b * v + moving_offset * n`` in 3-D LPS (``u``, ``v``: the in-plane
    direction columns; ``n`` the third one): the 2-D registration maps the fixed slice onto the moving slice
    projected onto the fixed plane, and ``moving_offset`` carries it back to where the moving slice lies.
    """

    reference: sitk.Image  # the 3-D single-slice grid (LPS)
    axes: tuple[int, int]
    moving_offset: float = 0.0  # the moving slice's distance from the fixed plane along n

    @classmethod
    def of(cls, image: sitk.Image) -> SlicePlane | None:
        """The plane of a 3-D image with exactly one axis of size 1, else ``None``."""
        if image.GetDimension() != 3:
            return None
        thin = [a for a, n in enumerate(image.GetSize()) if n == 1]
        if len(thin) != 1:
            return None
        return cls(image, tuple(a for a in range(3) if a != thin[0]))

    @property
    def _columns(self) -> np.ndarray:
        return np.array(self.reference.GetDirection(), dtype=float).reshape(3, 3)[:, list(self.axes)]

    @property
    def _thin_axis(self) -> int:
        """The voxel axis across the slice (the one of size 1)."""
        return ({0, 1, 2} - set(self.axes)).pop()

    @property
    def _normal(self) -> np.ndarray:
        return np.array(self.reference.GetDirection(), dtype=float).reshape(3, 3)[:, self._thin_axis]

    def with_moving(self, moving: sitk.Image) -> SlicePlane:
        """This plane, knowing how far the moving slice (a parallel one) lies from it."""
        offset = float(self._normal @ (np.array(moving.GetOrigin()) - np.array(self.reference.GetOrigin())))
        return SlicePlane(self.reference, self.axes, offset)

    def point_2d(self, point_lps: Sequence[float]) -> np.ndarray:
        """A 3-D LPS point in the 2-D frame (its component out of the plane is dropped)."""
        return self._columns.T @ (np.asarray(point_lps, dtype=float) - np.array(self.reference.GetOrigin()))

    def to_2d(self, image: sitk.Image, name: str) -> sitk.Image:
        """A single-slice 3-D image (this slice, or another parallel one) as a 2-D image in the 2-D frame."""
        plane = SlicePlane.of(image)
        if plane is None:
            raise ValueError(f"{name} has {min(image.GetSize())} slices ({'x'.join(map(str, image.GetSize()))}); "
                             "with a single-slice fixed volume, give a single slice of it too")
        columns = plane._columns
        direction = np.round(self._columns.T @ columns, 12)  # the slice's in-plane axes in this frame (+0 rounding)
        if np.abs(np.linalg.norm(direction, axis=0) - 1).max() > 1e-3:
            raise ValueError(f"the slice of {name} is not parallel to the fixed slice: reslice it onto the fixed "
                             "volume's plane first (e.g. the Resample Image (BRAINS) module)")
        array = sitk.GetArrayFromImage(image)
        out = sitk.GetImageFromArray(np.take(array, 0, axis=2 - plane._thin_axis),
                                     isVector=image.GetNumberOfComponentsPerPixel() > 1)
        out.SetSpacing([image.GetSpacing()[a] for a in plane.axes])
        out.SetOrigin(self.point_2d(image.GetOrigin()).tolist())
        out.SetDirection(direction.ravel().tolist())
        return out

    def box_to_3d(self, centre: Sequence[float], size: Sequence[float], axes: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A box of the 2-D frame (centre, size, 2x2 axes as columns) as the 3-D box on the slice (LPS): its third
        axis is the slice's normal, one slice thick."""
        columns = self._columns
        centre_3d = np.array(self.reference.GetOrigin()) + columns @ np.asarray(centre, dtype=float)
        axes_3d = np.column_stack([columns @ np.asarray(axes, dtype=float), self._normal])
        size_3d = np.r_[np.asarray(size, dtype=float), self.reference.GetSpacing()[self._thin_axis]]
        return centre_3d, size_3d, axes_3d

    def to_3d(self, image: sitk.Image) -> sitk.Image:
        """A 2-D output on this plane's 2-D grid (an image or a displacement field) as the 3-D slice."""
        array = sitk.GetArrayFromImage(image)
        vector = image.GetNumberOfComponentsPerPixel() > 1
        if vector:  # (a, b) in the 2-D frame -> a * u + b * v + moving_offset * n in LPS
            array = array.astype(np.float64) @ self._columns.T + self.moving_offset * self._normal
        out = sitk.GetImageFromArray(np.expand_dims(array, axis=2 - self._thin_axis), isVector=vector)
        out.CopyInformation(self.reference)
        return out


def segmentation_to_labelmap_sitk(segmentation_node: slicer.vtkMRMLNode,
                                  reference_volume_node: slicer.vtkMRMLVolumeNode) -> sitk.Image:
    """A uint8 label image (LPS) on the reference volume's grid, its label values kept apart.

    ``segmentation_node`` is a segmentation node (its visible segments, segment i as value i + 1) or a
    labelmap volume node (its values 1..255; resampled with nearest neighbour when its grid
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
            image_data = labelmap_node.GetImageData()
            if not ok or image_data is None or image_data.GetPointData().GetScalars() is None:
                raise ValueError(f"segmentation {segmentation_node.GetName()!r} is empty or could not be exported "
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
    values = sitk.GetArrayViewFromImage(label)
    if not np.any(values):
        raise ValueError(f"segmentation {segmentation_node.GetName()!r} is empty inside "
                         f"volume {reference_volume_node.GetName()!r}; they may not overlap")
    if values.min() < 0 or values.max() > 255:
        raise ValueError(f"labelmap {segmentation_node.GetName()!r} holds values outside 0..255: relabel it "
                         "(at most 255 labels)")
    return sitk.Cast(label, sitk.sitkUInt8)


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
                                          node: slicer.vtkMRMLGridTransformNode | None = None,
                                          ) -> slicer.vtkMRMLGridTransformNode:
    """A grid transform node from an ITK displacement field.

    ``displacement`` is a vector image in the fixed geometry (LPS) in ITK's convention: it
    maps a fixed-space point ``x`` to the moving-space point ``x + u(x)`` (the resampling
    direction). In Slicer that mapping is the transform *from parent*: a node placed under
    this transform (the moving volume or segmentation) is shown in the fixed space. Vectors
    and grid are converted to RAS here. ``fixed_node``/``moving_node`` are recorded with
    Slicer's spatial-registration node references. ``node``: an existing grid transform node to fill.
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

    if node is None:
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
"""Rows with one value (in the After column); keys of :data:`protocol.METRICS_SCHEMA`."""


def per_label_rows(metrics: dict) -> list[tuple[str, str]]:
    """``(row name, metrics.json key after registration)`` of each per-label metric, by label value then metric."""
    found = [protocol.METRICS_PER_LABEL_KEY.match(k) for k in metrics]
    after = sorted((int(m[3]), m[1]) for m in found if m and m[2] == "after")
    names = {"dice": "Dice", "hausdorff": "Hausdorff (mm)"}
    return [(f"{names[metric]} label {value}", f"{metric}_after_label_{value}") for value, metric in after]


def metrics_table_node(metrics: dict, scene: slicer.vtkMRMLScene, name: str,
                       node: slicer.vtkMRMLTableNode | None = None) -> slicer.vtkMRMLTableNode:
    """Table of metrics.json (checked against the schema): Dice and distances before/after (of the union of the
    labels), then Dice and Hausdorff of each label value apart when the labels hold several
    (:data:`protocol.METRICS_PER_LABEL`), then single values."""
    protocol.check_metrics(metrics)
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
    files = sorted(step_files, key=protocol.step_number)
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
        volume.SetName(f"{name} step {protocol.step_number(path)}")
        sequence.SetDataNodeAtValue(volume, str(protocol.step_number(path)))
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
    extra_nodes: list = field(default_factory=list)

    def all_nodes(self) -> list:
        """Every node of the result that is in the scene (for clean-up)."""
        nodes = [self.warped_volume, self.transform, self.trajectory_table, self.trajectory_chart,
                 self.metrics_table, self.step_sequence, self.step_browser, self.fixed_crop, *self.extra_nodes]
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
                            plane: SlicePlane | None = None) -> RegistrationResultNodes:
    """Make the result nodes from the folder a successful ``agentreg register`` wrote.

    ``plane``: the fixed slice whose 2-D frame the worker's images were in (a 2-D model on a single-slice volume);
    its 2-D outputs are brought back onto the slice's 3-D position and orientation.

    ``warped_node``, ``transform_node``, ``metrics_node``: output nodes the user chose (filled in place);
    the others are created. All or nothing: if anything fails, every node created here is removed again
    (nodes the user chose keep their new content only on success: they are filled last).
    """
    output_dir = Path(output_dir)
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        on_slice = plane.to_3d if plane is not None else (lambda image: image)
        warped_image = on_slice(sitk.ReadImage(str(output_dir / protocol.WARPED)))
        displacement = on_slice(sitk.ReadImage(str(output_dir / protocol.DISPLACEMENT), sitk.sitkVectorFloat64))
        metrics = protocol.read_metrics(output_dir / protocol.METRICS_JSON)
        trajectory_table = table_node_from_columns(protocol.read_trajectory(output_dir / protocol.TRAJECTORY_CSV),
                                                   scene, f"{name} trajectory")
        chart = trajectory_plot_chart_node(trajectory_table, scene, f"{name} trajectory chart")
        step_files = sorted((output_dir / protocol.STEPS_DIR).glob("warped_*.nii*"))
        sequence = browser = None
        if step_files:
            sequence, browser = step_sequence_nodes(step_files, scene, f"{name} steps", sequences_logic, on_slice)
        transform = grid_transform_node_from_displacement(displacement, scene, f"{name} transform", fixed_node,
                                                          moving_node, node=transform_node)
        warped = volume_node_from_sitk(warped_image, scene, f"{name} warped", node=warped_node)
        table = metrics_table_node(metrics, scene, f"{name} metrics", node=metrics_node)
        crop = fixed_crop_roi_node(metrics, scene, f"{name} fixed crop", plane)
        result = RegistrationResultNodes(warped, transform, trajectory_table, chart, metrics, table, sequence, browser,
                                         crop)
        known = {n.GetID() for n in result.all_nodes()}
        result.extra_nodes = [n for n in _new_nodes_since(scene, before) if n.GetID() not in known
                              and not n.IsA("vtkMRMLDisplayNode") and not n.IsA("vtkMRMLStorageNode")]
        return result
    except BaseException:
        for node in reversed(_new_nodes_since(scene, before)):
            if scene.IsNodePresent(node):
                scene.RemoveNode(node)
        raise


# --------------------------------------------------------------------------- registration job


@dataclass
class RegistrationJob:
    """A running ``agentreg register`` worker started from nodes, with what is needed to import its result."""

    job: protocol.WorkerJob
    folder: Path
    fixed_node: slicer.vtkMRMLScalarVolumeNode
    moving_node: slicer.vtkMRMLScalarVolumeNode
    name: str
    plane: SlicePlane | None = None  # a single-slice fixed volume registered by a 2-D model

    @property
    def output_dir(self) -> Path:
        return self.folder / "output"


def _model_slice_plane(image: sitk.Image, model_dim: int | None, what: str, several_slices_advice: str,
                       ) -> SlicePlane | None:
    """The slice plane of ``image`` for a 2-D model (it must be a single slice), ``None`` otherwise (a 3-D model
    refuses a single slice); the message names ``what`` (e.g. "volume 'fixed'")."""
    plane = SlicePlane.of(image)
    if model_dim == 2 and plane is None:
        raise ValueError(f"The model is a 2-D model but {what} has {image.GetSize()[2]} slices: choose a 3-D model, "
                         f"or {several_slices_advice}")
    if model_dim == 3 and plane is not None:
        raise ValueError(f"The model is a 3-D model but {what} is a single slice: choose a 2-D model "
                         "(e.g. prostate-2d).")
    return plane if model_dim == 2 else None


def write_volume_inputs(folder: Path, fixed_node, moving_node, fixed_segmentation=None,
                        moving_segmentation=None, model_dim: int | None = None,
                        ) -> tuple[dict[str, Path], SlicePlane | None]:
    """Write the nodes as the worker's input files (NIfTI, LPS); segmentations as label maps on their volume's grid
    (a value per segment).

    With a 2-D model (``model_dim`` 2) a single-slice fixed volume and a parallel single-slice moving volume are
    written as 2-D images in the fixed slice's frame (returned, to bring the results back); a thicker volume is
    refused with the slice to use. With a 3-D model a single slice is refused.
    """
    from .inputs import check_image

    if fixed_node is None or moving_node is None:
        raise ValueError("Select both a fixed and a moving volume.")
    if fixed_node is moving_node:
        raise ValueError("The fixed and the moving volume are the same node; select two volumes.")
    images = {"fixed": sitk_from_volume_node(fixed_node), "moving": sitk_from_volume_node(moving_node)}
    for key, segmentation, reference in (("fixed_label", fixed_segmentation, fixed_node),
                                         ("moving_label", moving_segmentation, moving_node)):
        if segmentation is not None:
            images[key] = segmentation_to_labelmap_sitk(segmentation, reference)
    middle = images["fixed"].GetSize()[-1] // 2
    plane = _model_slice_plane(images["fixed"], model_dim, f"volume {fixed_node.GetName()!r}",
                               f"register one slice: make a single-slice volume of it (e.g. slice {middle}, its middle "
                               "one, with the Crop Volume module) and of the moving volume.")
    if plane is not None:
        nodes = {"fixed": fixed_node, "moving": moving_node, "fixed_label": fixed_segmentation,
                 "moving_label": moving_segmentation}
        images = {key: plane.to_2d(image, f"volume {nodes[key].GetName()!r}") for key, image in images.items()}
        plane = plane.with_moving(sitk_from_volume_node(moving_node))
    for key in ("fixed", "moving"):
        check_image(images[key], f"{key} volume", repr((fixed_node if key == "fixed" else moving_node).GetName()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {key: folder / f"{key}.nii.gz" for key in images}
    for key, image in images.items():
        sitk.WriteImage(image, str(paths[key]))
    return paths, plane


def start_registration(python: str, engine_dir: str | Path, fixed_node, moving_node, model: str | Path, *,
                       fixed_segmentation=None, moving_segmentation=None, fixed_point=None,
                       temporary_root: str | Path | None = None, keep_temporary_files: bool = False,
                       name: str | None = None, **options: Any) -> RegistrationJob:
    """Check the inputs, write them to a time-stamped temporary folder and start ``agentreg register``.

    ``fixed_point``: a markups node whose first point (on the fixed volume) places the prostate for a model that
    crops on it (``--fixed-point``, converted to LPS). ``options`` are those of :func:`protocol.register_command`
    (device, steps, seed, fuzzy_action_control, fuzzy_k, save_steps). The folder is removed again if the worker
    cannot be started.
    """
    model = Path(model)
    if not model.is_file():
        raise ValueError(f"Model bundle not found: {model}. Pick a listed model or a .pt file.")
    model_dim = protocol.model_header(model)["dim"]
    point = markups_point_lps(fixed_point) if fixed_point is not None else None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if temporary_root is not None:
        Path(temporary_root).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"AgentRegistration-{stamp}-", dir=temporary_root))
    try:
        inputs, plane = write_volume_inputs(folder, fixed_node, moving_node, fixed_segmentation, moving_segmentation,
                                            model_dim)
        if point is not None and plane is not None:
            point = plane.point_2d(point)
        command = protocol.register_command(python, inputs.pop("fixed"), inputs.pop("moving"), model,
                                            folder / "output", **inputs, fixed_point=point, **options)
        job = protocol.WorkerJob([command], env=protocol.worker_environment(engine_dir), folder=folder,
                                 keep_folder=keep_temporary_files).start()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    scene = fixed_node.GetScene()
    if name is None:
        name = scene.GenerateUniqueName(f"{moving_node.GetName()} to {fixed_node.GetName()}")
    return RegistrationJob(job, folder, fixed_node, moving_node, name, plane)


def finish_registration(registration: RegistrationJob, sequences_logic: Any = None,
                        **output_nodes: Any) -> RegistrationResultNodes:
    """Once the worker has ended: the result nodes (all or nothing); the temporary folder is removed unless kept.

    Raises ``RuntimeError`` with the worker's error text when it failed or was cancelled.
    """
    job = registration.job
    try:
        if job.cancelled:
            raise RuntimeError("the registration was cancelled")
        if not job.succeeded:
            raise RuntimeError(job.error or f"the worker exited with status {job.worker.returncode}")
        return import_register_results(registration.output_dir, registration.fixed_node.GetScene(),
                                       registration.fixed_node, registration.moving_node, registration.name,
                                       sequences_logic, plane=registration.plane, **output_nodes)
    finally:
        job.cleanup()


def summary_text(metrics: dict) -> str:
    """One line for the status label after a registration."""
    text = f"Done: {metrics['steps']} agent steps in {metrics['seconds_total']:.1f} s"
    if "dice_after" in metrics:
        text += f"; Dice {metrics['dice_before']:.3f} -> {metrics['dice_after']:.3f}"
    return text + "."


def load_volume_pair(files: dict[str, Path], scene: slicer.vtkMRMLScene, prefix: str = "") -> dict[str, Any]:
    """Volumes ``fixed``/``moving`` and segmentations ``fixed_label``/``moving_label`` (those given) as nodes,
    named after their files (e.g. the shipped sample pair of :func:`protocol.sample_data_files`)."""
    nodes: dict[str, Any] = {}
    for key in ("fixed", "moving"):
        path = Path(files[key])
        nodes[key] = volume_node_from_sitk(sitk.ReadImage(str(path)), scene, prefix + path.name.split(".")[0])
    for key, volume in (("fixed_label", "fixed"), ("moving_label", "moving")):
        if files.get(key) is not None:
            path = Path(files[key])
            nodes[key] = segmentation_node_from_labelmap_sitk(
                sitk.Cast(sitk.ReadImage(str(path)) > 0, sitk.sitkUInt8), scene, prefix + path.name.split(".")[0],
                nodes[volume])
    return nodes


# --------------------------------------------------------------------------- several patients (atlas propagation)
# The moving volume and its segmentation are the atlas; each patient (a fixed volume node, or an image file of a
# folder) gets the atlas's segmentation warped onto it by one ``agentreg register-many`` worker (one model load, the
# agent batched), whose summary and per-pair folders are read back into a segmentation per patient and a table.


@dataclass
class CohortJob:
    """A running ``agentreg register-many`` worker that propagates an atlas onto several patients."""

    job: protocol.WorkerJob
    folder: Path
    atlas_node: slicer.vtkMRMLScalarVolumeNode
    atlas_segmentation: slicer.vtkMRMLNode | None
    patients: dict[str, Any]  # pair name -> its fixed volume node (``None``: an image file of the patients folder)
    planes: dict[str, SlicePlane] = field(default_factory=dict)  # pair name -> slice (a 2-D model on single slices)
    name: str = "atlas"

    @property
    def output_dir(self) -> Path:
        return self.folder / "output"


@dataclass
class CohortResultNodes:
    """The nodes made from one ``agentreg register-many`` run: by pair (patient) name, the propagated segmentation
    and, for an image file of a folder, the patient's volume; the run's summary as a table and as rows."""

    segmentations: dict[str, slicer.vtkMRMLSegmentationNode]
    volumes: dict[str, slicer.vtkMRMLScalarVolumeNode]
    summary_table: slicer.vtkMRMLTableNode
    rows: list[dict[str, str]]

    def all_nodes(self) -> list:
        return [*self.volumes.values(), *self.segmentations.values(), self.summary_table]


def _file_name(name: str, taken: set[str]) -> str:
    """``name`` as a folder name that ``register-many`` accepts, unique among ``taken`` (which it joins)."""
    base = "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_") or "patient"
    unique, n = base, 1
    while unique in taken:
        n += 1
        unique = f"{base}_{n}"
    taken.add(unique)
    return unique


def write_cohort_inputs(folder: Path, atlas_node, atlas_segmentation, fixed_nodes: Sequence,
                        fixed_segmentations: Sequence | None = None, model_dim: int | None = None,
                        ) -> tuple[Path, dict[str, Any], dict[str, SlicePlane]]:
    """Write the atlas and each fixed volume node (and its segmentation, where given: Dice and distances) as the
    files of a CSV of pairs for ``register-many``; returns the CSV, the fixed node of each pair name and, with a
    2-D model on single-slice volumes, the slice of each pair (the atlas written in each patient's slice frame)."""
    from .inputs import check_image

    if atlas_node is None:
        raise ValueError("Select the atlas: the moving volume (with its segmentation, to propagate).")
    fixed_nodes = [n for n in fixed_nodes if n is not None]
    if not fixed_nodes:
        raise ValueError("Select the patients: several fixed volumes, or a folder of images.")
    if any(n is atlas_node for n in fixed_nodes):
        raise ValueError(f"Volume {atlas_node.GetName()!r} is the atlas and one of the patients; leave it out of "
                         "the patients.")
    fixed_segmentations = list(fixed_segmentations or [None] * len(fixed_nodes))
    if len(fixed_segmentations) != len(fixed_nodes):
        raise ValueError(f"{len(fixed_segmentations)} segmentations for {len(fixed_nodes)} patients: give one per "
                         "patient (None where there is none)")
    folder.mkdir(parents=True, exist_ok=True)
    atlas = sitk_from_volume_node(atlas_node)
    atlas_label = segmentation_to_labelmap_sitk(atlas_segmentation, atlas_node) if atlas_segmentation else None
    shared: dict[str, Path] = {}
    if model_dim != 2:  # a 2-D model: the atlas is written in each patient's slice frame below
        _model_slice_plane(atlas, model_dim, f"the atlas {atlas_node.GetName()!r}", "")
        check_image(atlas, "atlas volume", repr(atlas_node.GetName()))
        shared["moving"] = folder / "atlas.nii.gz"
        sitk.WriteImage(atlas, str(shared["moving"]))
        if atlas_label is not None:
            shared["moving_label"] = folder / "atlas_label.nii.gz"
            sitk.WriteImage(atlas_label, str(shared["moving_label"]))
    rows, patients, planes, taken = [], {}, {}, set()
    for node, segmentation in zip(fixed_nodes, fixed_segmentations, strict=True):
        name = _file_name(node.GetName(), taken)
        images = {"fixed": sitk_from_volume_node(node)}
        if segmentation is not None:
            images["fixed_label"] = segmentation_to_labelmap_sitk(segmentation, node)
        plane = _model_slice_plane(images["fixed"], model_dim, f"volume {node.GetName()!r}", "single-slice volumes.")
        if plane is not None:
            images["moving"] = atlas
            if atlas_label is not None:
                images["moving_label"] = atlas_label
            images = {key: plane.to_2d(image, f"volume {(atlas_node if 'moving' in key else node).GetName()!r}")
                      for key, image in images.items()}
            planes[name] = plane.with_moving(atlas)
        check_image(images["fixed"], "fixed volume", repr(node.GetName()))
        row = {"name": name, **shared}
        for key, image in images.items():
            row[key] = folder / f"{name}_{key}.nii.gz"
            sitk.WriteImage(image, str(row[key]))
        rows.append(row)
        patients[name] = node
    pairs = folder / "pairs.csv"
    with pairs.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["name", "fixed", "moving", "fixed_label", "moving_label"])
        writer.writeheader()
        writer.writerows(rows)
    return pairs, patients, planes


def write_atlas(folder: Path, atlas_node, atlas_segmentation, model_dim: int | None = None,
                ) -> tuple[Path, Path | None]:
    """The atlas volume (and its segmentation as a label map) as files for ``register-many --atlas``; a single
    slice for a 2-D model is written as a 2-D image in its own slice frame (the patients' files being 2-D)."""
    from .inputs import check_image

    if atlas_node is None:
        raise ValueError("Select the atlas: the moving volume (with its segmentation, to propagate).")
    images = {"atlas": sitk_from_volume_node(atlas_node)}
    if atlas_segmentation is not None:
        images["atlas_label"] = segmentation_to_labelmap_sitk(atlas_segmentation, atlas_node)
    plane = _model_slice_plane(images["atlas"], model_dim, f"the atlas {atlas_node.GetName()!r}",
                               "a single-slice atlas.")
    if plane is not None:
        images = {key: plane.to_2d(image, f"atlas {atlas_node.GetName()!r}") for key, image in images.items()}
    check_image(images["atlas"], "atlas volume", repr(atlas_node.GetName()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {key: folder / f"{key}.nii.gz" for key in images}
    for key, image in images.items():
        sitk.WriteImage(image, str(paths[key]))
    return paths["atlas"], paths.get("atlas_label")


def start_cohort_registration(python: str, engine_dir: str | Path, atlas_node, model: str | Path, *,
                              atlas_segmentation=None, fixed_nodes: Sequence = (),
                              fixed_segmentations: Sequence | None = None, patients_folder: str | Path | None = None,
                              temporary_root: str | Path | None = None, keep_temporary_files: bool = False,
                              name: str | None = None, **options: Any) -> CohortJob:
    """Check the inputs, write them to a time-stamped temporary folder and start ``agentreg register-many``: the
    atlas (``atlas_node`` and ``atlas_segmentation``) onto each of ``fixed_nodes`` (a CSV of pairs), or onto every
    image of ``patients_folder`` (``<name>.<ext>`` or ``<name>_image.<ext>``, a ``<name>_label.<ext>`` beside one
    giving Dice). ``options``: those of :func:`protocol.register_many_command` (device, steps, seed,
    fuzzy_action_control, fuzzy_k, workers, batch_size). The folder is removed again if the worker cannot start."""
    model = Path(model)
    if not model.is_file():
        raise ValueError(f"Model bundle not found: {model}. Pick a listed model or a .pt file.")
    if patients_folder and fixed_nodes:
        raise ValueError("Give either a folder of patients or patient volumes, not both.")
    if patients_folder is not None and not str(patients_folder).strip():
        patients_folder = None
    if patients_folder is not None and not Path(patients_folder).is_dir():
        raise ValueError(f"Folder of patients not found: {patients_folder}")
    model_dim = protocol.model_header(model)["dim"]
    patients: dict[str, Any] = {}
    if patients_folder is not None:
        from .cohort import patient_images

        patients = {patient: None for patient, _, _ in patient_images(patients_folder)}
    # one process reads and writes while the agent runs; from 4 patients on, two (each loads torch: memory)
    options.setdefault("workers", 1 if len(patients or fixed_nodes) < 4 else 2)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if temporary_root is not None:
        Path(temporary_root).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"AgentRegistration-cohort-{stamp}-", dir=temporary_root))
    try:
        planes: dict[str, SlicePlane] = {}
        if patients_folder is not None:
            atlas, atlas_label = write_atlas(folder / "inputs", atlas_node, atlas_segmentation, model_dim)
            command = protocol.register_many_command(python, model, folder / "output", atlas=atlas,
                                                     atlas_label=atlas_label, patients=Path(patients_folder), **options)
        else:
            pairs, patients, planes = write_cohort_inputs(folder / "inputs", atlas_node, atlas_segmentation,
                                                          list(fixed_nodes), fixed_segmentations, model_dim)
            command = protocol.register_many_command(python, model, folder / "output", pairs=pairs, **options)
        job = protocol.WorkerJob([command], env=protocol.worker_environment(engine_dir), folder=folder,
                                 keep_folder=keep_temporary_files).start()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return CohortJob(job, folder, atlas_node, atlas_segmentation, patients, planes, name or atlas_node.GetName())


def _name_segments_like(target: slicer.vtkMRMLSegmentationNode, source: slicer.vtkMRMLNode | None) -> None:
    """Segment names and colours of ``target`` (imported from a label image of values 1..n) from ``source``'s visible
    segments, in the order they were exported (value i + 1 for the i-th)."""
    if source is None or not source.IsA("vtkMRMLSegmentationNode"):
        return
    display = source.GetDisplayNode()
    segmentation = source.GetSegmentation()
    visible = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
               if display is None or display.GetSegmentVisibility(segmentation.GetNthSegmentID(i))]
    segments = target.GetSegmentation()
    for i in range(segments.GetNumberOfSegments()):
        segment = segments.GetNthSegment(i)
        value = int(segment.GetLabelValue()) if hasattr(segment, "GetLabelValue") else i + 1
        if 1 <= value <= len(visible):
            original = segmentation.GetSegment(visible[value - 1])
            segment.SetName(original.GetName())
            segment.SetColor(original.GetColor())


def import_cohort_results(output_dir: str | Path, scene: slicer.vtkMRMLScene, patients: dict[str, Any],
                          name: str = "atlas", planes: dict[str, SlicePlane] | None = None,
                          atlas_segmentation: slicer.vtkMRMLNode | None = None) -> CohortResultNodes:
    """Make the nodes of a ``register-many`` run from the folder it wrote: for each pair of ``patients`` (pair name
    -> its fixed volume node, or ``None`` for an image file, then loaded as a volume from the summary's ``fixed``
    column) that has a warped label, a segmentation on the patient's volume (named like the atlas's segments), and
    the summary as a table node (every column of summary.csv, failed pairs included). All or nothing: if anything
    fails, every node created here is removed again."""
    output_dir = Path(output_dir)
    planes = planes or {}
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        summary = output_dir / protocol.COHORT_SUMMARY_CSV
        if not summary.is_file():
            raise ValueError(f"the run wrote no {protocol.COHORT_SUMMARY_CSV} in {output_dir}")
        with summary.open(newline="") as f:
            rows = [row for row in csv.DictReader(f) if row.get("pair") in patients]
        volumes, segmentations = {}, {}
        for row in rows:
            pair = row["pair"]
            label_file = output_dir / pair / protocol.WARPED_LABEL
            if row.get("status") not in protocol.COHORT_DONE or not label_file.is_file():
                continue
            reference = patients[pair]
            if reference is None:
                reference = volumes[pair] = volume_node_from_sitk(sitk.ReadImage(row["fixed"]), scene, pair)
            label = sitk.ReadImage(str(label_file))
            if pair in planes:
                label = planes[pair].to_3d(label)
            segmentations[pair] = segmentation_node_from_labelmap_sitk(
                sitk.Cast(label, sitk.sitkUInt8), scene, scene.GenerateUniqueName(f"{name} on {reference.GetName()}"),
                reference)
            _name_segments_like(segmentations[pair], atlas_segmentation)
        columns = {column: [row.get(column, "") for row in rows] for column in (rows[0] if rows else ["pair"])}
        table = table_node_from_columns(columns, scene, scene.GenerateUniqueName(f"{name} on patients: summary"))
        return CohortResultNodes(segmentations, volumes, table, rows)
    except BaseException:
        for node in reversed(_new_nodes_since(scene, before)):
            if scene.IsNodePresent(node):
                scene.RemoveNode(node)
        raise


def finish_cohort_registration(cohort: CohortJob) -> CohortResultNodes:
    """Once the worker has ended: the result nodes (all or nothing); the temporary folder is removed unless kept.
    Raises ``RuntimeError`` with the worker's error text when it failed or was cancelled."""
    job = cohort.job
    try:
        if job.cancelled:
            raise RuntimeError("the registration of the patients was cancelled")
        if not job.succeeded:
            raise RuntimeError(job.error or f"the worker exited with status {job.worker.returncode}")
        return import_cohort_results(cohort.output_dir, cohort.atlas_node.GetScene(), cohort.patients, cohort.name,
                                     cohort.planes, cohort.atlas_segmentation)
    finally:
        job.cleanup()


def cohort_summary_text(result: CohortResultNodes) -> str:
    """One line for the status label after a run on several patients."""
    failed = [row["pair"] for row in result.rows if row.get("status") not in protocol.COHORT_DONE]
    dice = [float(row["dice_after"]) for row in result.rows if row.get("dice_after")]
    text = f"Done: {len(result.segmentations)} of {len(result.rows)} patients segmented"
    if dice:
        text += f"; Dice after median {float(np.median(dice)):.3f} on the {len(dice)} with a segmentation"
    if failed:
        text += f"; failed: {', '.join(failed)} (see the summary table)"
    return text + "."
