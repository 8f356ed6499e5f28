"""Preprocessing as in the paper (section 3), and the exact way back to the user's geometry.

1. Translation pre-alignment of the moving image onto the fixed image with elastix.
2. A crop box around the region of interest of the fixed image (by default its centre),
   resampled onto the model grid: 100x100 in 2-D, 75x75x20 in 3-D (configurable).
3. Intensity normalisation: the 1st..99th percentile of the crop mapped to 0..1.

The model grid is "model space": voxel units, origin 0, the fixed image's direction. A
:class:`ModelFrame` maps it to the fixed image's physical space, so a displacement found in
model space (a B-spline coefficient vector) is evaluated exactly at every voxel of the
original fixed image (:func:`displacement_in_fixed_geometry`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import SimpleITK as sitk
import torch

from . import elastix
from .bspline import ControlGrid, dense_displacement
from .geometry import ModelGeometry


@dataclass
class ModelFrame:
    """Model voxel ``q`` <-> fixed physical point ``p = origin + direction @ (spacing * q)``."""

    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    size: tuple[int, ...]

    @classmethod
    def for_fixed(cls, fixed: sitk.Image, geometry: ModelGeometry, centre: np.ndarray | None = None) -> ModelFrame:
        """The crop box of ``geometry`` on ``fixed``, centred on ``centre`` (physical) or on
        the image centre."""
        dim = fixed.GetDimension()
        if dim != geometry.dim:
            raise ValueError(
                f"the model is {geometry.dim}-D but the image is {dim}-D: use a {dim}-D model"
                + (" (or extract a slice first)" if dim == 3 else "")
            )
        size = np.array(fixed.GetSize(), dtype=float)
        spacing = np.array(fixed.GetSpacing())
        direction = np.array(fixed.GetDirection()).reshape(dim, dim)
        extent = (size - 1) * spacing * np.array(geometry.crop_fraction[:dim])
        if centre is None:
            centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
        model_spacing = extent / np.maximum(np.array(geometry.size) - 1, 1)
        model_spacing[model_spacing == 0] = spacing[model_spacing == 0]
        origin = np.asarray(centre) - direction @ (model_spacing * (np.array(geometry.size) - 1) / 2)
        return cls(origin, model_spacing, direction, tuple(geometry.size))

    def reference(self) -> sitk.Image:
        ref = sitk.Image([int(s) for s in self.size], sitk.sitkFloat32)
        ref.SetOrigin(self.origin.tolist())
        ref.SetSpacing(self.spacing.tolist())
        ref.SetDirection(self.direction.ravel().tolist())
        return ref

    def to_dict(self) -> dict:
        return {k: np.asarray(v).tolist() for k, v in asdict(self).items()}


@dataclass
class PreparedPair:
    """A pair on the model grid (arrays in array order), ready for the agent."""

    fixed: np.ndarray
    moving: np.ndarray
    frame: ModelFrame
    translation: np.ndarray
    fixed_label: np.ndarray | None = None
    moving_label: np.ndarray | None = None
    info: dict = field(default_factory=dict)


def normalise_intensity(array: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Map the ``low``..``high`` percentile range to 0..1, clipped; float32."""
    lo, hi = np.percentile(array, [low, high])
    return np.clip((array - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def resample_to_frame(image: sitk.Image, frame: ModelFrame, translation: np.ndarray | None = None,
                      label: bool = False) -> np.ndarray:
    """Sample ``image`` at the model grid points (shifted by ``translation``)."""
    transform = sitk.TranslationTransform(image.GetDimension(), (translation if translation is not None
                                                                 else np.zeros(image.GetDimension())).tolist())
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    out = sitk.Resample(image, frame.reference(), transform, interp, 0.0,
                        sitk.sitkUInt8 if label else sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(out)
    return (arr > 0).astype(np.uint8) if label else arr


def _inside_fraction(image: sitk.Image, frame: ModelFrame, translation: np.ndarray) -> float:
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    return float(resample_to_frame(ones, frame, translation, label=True).mean())


def crop_roi(image: sitk.Image, crop_fraction: tuple[float, ...]) -> sitk.Image:
    """The central box of ``image`` covering ``crop_fraction`` of each axis (for pre-alignment)."""
    size = np.array(image.GetSize())
    keep = np.maximum(np.round(size * np.array(crop_fraction[: image.GetDimension()])).astype(int), 1)
    start = (size - keep) // 2
    return sitk.RegionOfInterest(image, keep.tolist(), start.tolist())


def prealign_translation(fixed: sitk.Image, moving: sitk.Image, geometry: ModelGeometry) -> tuple[np.ndarray, str]:
    """Translation pre-alignment of ``moving`` onto the region of interest of ``fixed``."""
    return elastix.translation_prealignment(fixed, moving, crop_roi(fixed, geometry.crop_fraction))


def middle_slice(image: sitk.Image, index: int | None = None) -> sitk.Image:
    """The axial slice ``index`` (default: the middle one) of a 3-D image, as a 2-D image."""
    if image.GetDimension() != 3:
        raise ValueError("middle_slice needs a 3-D image")
    z = image.GetSize()[2] // 2 if index is None else index
    return image[:, :, z]


def prepare_pair(
    fixed: sitk.Image,
    moving: sitk.Image,
    geometry: ModelGeometry,
    fixed_label: sitk.Image | None = None,
    moving_label: sitk.Image | None = None,
    prealign: bool = True,
    centre: np.ndarray | None = None,
    translation: np.ndarray | None = None,
) -> PreparedPair:
    """Pre-align, crop, resample and normalise a pair onto the model grid.

    ``translation`` skips the elastix pre-alignment with a known one; ``prealign=False``
    uses none. Raises ``ValueError`` with what to do when the dimension does not match the
    model or the images do not overlap.
    """
    if moving.GetDimension() != fixed.GetDimension():
        raise ValueError(f"fixed image is {fixed.GetDimension()}-D but moving image is {moving.GetDimension()}-D")
    frame = ModelFrame.for_fixed(fixed, geometry, centre)
    dim = fixed.GetDimension()
    status = "given" if translation is not None else "none"
    if translation is None:
        translation, status = prealign_translation(fixed, moving, geometry) if prealign else (np.zeros(dim), "none")
    translation = np.asarray(translation, dtype=float)
    if _inside_fraction(moving, frame, translation) < 0.25:
        raise ValueError(
            "the moving image covers less than a quarter of the fixed image's region of interest, "
            "even after translation pre-alignment: the images do not overlap. Check that both show the "
            "same anatomy, and centre or roughly align them first (e.g. Slicer's Transforms module)."
        )
    pair = PreparedPair(
        fixed=normalise_intensity(resample_to_frame(fixed, frame)),
        moving=normalise_intensity(resample_to_frame(moving, frame, translation)),
        frame=frame,
        translation=translation,
        info={"prealignment": status},
    )
    if fixed_label is not None:
        pair.fixed_label = resample_to_frame(fixed_label, frame, label=True)
    if moving_label is not None:
        pair.moving_label = resample_to_frame(moving_label, frame, translation, label=True)
    return pair


def displacement_in_fixed_geometry(
    coefficients: np.ndarray,
    grid: ControlGrid,
    frame: ModelFrame,
    fixed: sitk.Image,
    translation: np.ndarray,
) -> sitk.Image:
    """The full transform (translation + model-space FFD) as an ITK displacement field on the
    fixed image's own grid: vectors in physical units, fixed point -> moving point.

    The FFD is evaluated exactly at each fixed voxel (no interpolation of a coarse field).
    Requires the fixed image's direction to equal the frame's, which ``ModelFrame.for_fixed``
    guarantees, so each model axis depends on one image axis only.
    """
    dim = fixed.GetDimension()
    f_origin = np.array(fixed.GetOrigin())
    f_spacing = np.array(fixed.GetSpacing())
    # model coordinate of fixed voxel i along axis a: (D^T (o_f - o_m))_a / s_m,a + i * s_f,a / s_m,a
    offset = frame.direction.T @ (f_origin - frame.origin)
    bases = []
    for a in range(dim):
        q = (offset[a] + f_spacing[a] * np.arange(fixed.GetSize()[a])) / frame.spacing[a]
        bases.append(grid.basis(a, torch.from_numpy(q)))
    u = dense_displacement(torch.from_numpy(np.asarray(coefficients, dtype=np.float64))[None], grid, bases)[0]
    u = u.numpy().reshape(dim, -1)  # model voxels, channel order (x, y, z)
    physical = frame.direction @ (frame.spacing[:, None] * u) + np.asarray(translation)[:, None]
    arr = np.moveaxis(physical.reshape(dim, *fixed.GetSize()[::-1]), 0, -1)
    out = sitk.GetImageFromArray(arr.astype(np.float64), isVector=True)
    out.CopyInformation(fixed)
    return out


def warp_to_fixed(image: sitk.Image, displacement: sitk.Image, label: bool = False) -> sitk.Image:
    """Resample the original moving ``image`` into the fixed geometry with the displacement field."""
    transform = sitk.DisplacementFieldTransform(sitk.Image(displacement))
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    pixel = image.GetPixelID()
    return sitk.Resample(image, displacement, transform, interp, 0.0, pixel)
