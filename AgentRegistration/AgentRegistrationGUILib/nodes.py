"""MRML glue between the Slicer scene and the engine: nodes in, nodes out. The one RAS/LPS conversion, volume,
segmentation and transform nodes from and to SimpleITK images, and the plane of a 2-D model on a volume."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

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
                           node: slicer.vtkMRMLSegmentationNode | None = None) -> slicer.vtkMRMLSegmentationNode:
    """Carry a moving segmentation (or labelmap volume) onto the fixed volume's grid.

    The moving labels are resampled once, through the transform node, onto the fixed grid
    (hardening a non-linear transform on a segmentation and then changing its geometry would
    resample twice and lose boundary voxels). Segment names and colours are kept; the input
    node is not changed. ``node``: a segmentation node to fill instead of making one (its segments are replaced,
    and only once the propagated segmentation is complete).
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
    if node is None:
        return result
    node.GetSegmentation().DeepCopy(target)
    node.SetReferenceImageGeometryParameterFromVolumeNode(fixed_volume_node)
    node.CreateDefaultDisplayNodes()
    scene.RemoveNode(result)
    return node
