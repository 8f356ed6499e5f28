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

from AgentRegistrationLib.core.bspline import ControlGrid, dense_displacement
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.data.organ_box import Localisation
from AgentRegistrationLib.data.orientation import canonical, on_grid_of


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

    @classmethod
    def on_localisation(cls, image: sitk.Image, geometry: ModelGeometry, localisation: Localisation,
                        direction: np.ndarray | None = None) -> ModelFrame:
        """The localised crop box of ``geometry`` on ``image``: centred on the organ and spanning
        ``geometry.box_spreads`` of its standard deviations per axis (axes of ``direction``, by default
        the image's). A one-slice box (a 2-D model's slice of a volume) sits on the image slice nearest
        the organ's centre, so the slice is taken, not interpolated between two."""
        dim = image.GetDimension()
        if dim != geometry.dim:
            raise ValueError(
                f"the model is {geometry.dim}-D but the image is {dim}-D: use a {dim}-D model"
                + (" (or extract a slice first)" if dim == 3 else ""))
        if not geometry.localised:
            raise ValueError("this model geometry places its crop box by the paper's rule, not on the organ")
        direction = np.array(image.GetDirection()).reshape(dim, dim) if direction is None else np.asarray(direction)
        size = np.array(geometry.size)
        centre = np.asarray(localisation.centre, dtype=float)
        if np.any(size == 1):  # snap a one-slice box onto the nearest slice of the image
            index = np.array(image.TransformPhysicalPointToContinuousIndex(centre.tolist()))
            flat = size == 1
            index[flat] = np.clip(np.rint(index[flat]), 0, np.array(image.GetSize())[flat] - 1)
            centre = np.array(image.TransformContinuousIndexToPhysicalPoint(index.tolist()))
        model_spacing = np.array(geometry.box_spreads) * np.asarray(localisation.spread) / np.maximum(size - 1, 1)
        model_spacing[size == 1] = np.array(image.GetSpacing())[size == 1]
        origin = centre - direction @ (model_spacing * (size - 1) / 2)
        return cls(origin, model_spacing, direction, tuple(int(n) for n in size))

    def to_model(self, point: np.ndarray) -> np.ndarray:
        """Model voxel coordinates of physical points ``(..., dim)``."""
        return (np.asarray(point) - self.origin) @ self.direction / self.spacing

    def to_physical(self, q: np.ndarray) -> np.ndarray:
        """Physical points of model voxel coordinates ``(..., dim)``."""
        return self.origin + (np.asarray(q) * self.spacing) @ self.direction.T

    def reference(self) -> sitk.Image:
        ref = sitk.Image([int(s) for s in self.size], sitk.sitkFloat32)
        ref.SetOrigin(self.origin.tolist())
        ref.SetSpacing(self.spacing.tolist())
        ref.SetDirection(self.direction.ravel().tolist())
        return ref

    def translated(self, translation: np.ndarray) -> ModelFrame:
        """The same box moved by ``translation`` (physical): the moving box of the paper's preprocessing."""
        return ModelFrame(self.origin + np.asarray(translation, dtype=float), self.spacing, self.direction, self.size)

    def to_dict(self) -> dict:
        return {k: np.asarray(v).tolist() for k, v in asdict(self).items()}


@dataclass
class PreparedPair:
    """A pair on the model grid (arrays in array order), ready for the agent.

    ``frame`` is the fixed image's crop box, ``moving_frame`` the moving image's: the same box
    translated (the paper's preprocessing) or the box on the moving organ (localised). Model voxel
    ``q`` of the fixed crop corresponds, before any deformation, to model voxel ``q`` of the moving one.
    """

    fixed: np.ndarray
    moving: np.ndarray
    frame: ModelFrame
    moving_frame: ModelFrame
    fixed_label: np.ndarray | None = None
    moving_label: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def translation(self) -> np.ndarray:
        """Offset of the moving box's origin from the fixed box's (physical units)."""
        return self.moving_frame.origin - self.frame.origin


def normalise_intensity(array: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Map the ``low``..``high`` percentile range to 0..1, clipped; float32."""
    lo, hi = np.percentile(array, [low, high])
    return np.clip((array - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def resample_to_frame(image: sitk.Image, frame: ModelFrame, translation: np.ndarray | None = None,
                      label: bool = False) -> np.ndarray:
    """Sample ``image`` at the model grid points (shifted by ``translation``); a ``label`` map by nearest neighbour,
    keeping its values (uint8: at most 255 labels)."""
    if translation is not None:
        frame = frame.translated(translation)
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    out = sitk.Resample(image, frame.reference(), sitk.Transform(), interp, 0.0,
                        sitk.sitkUInt16 if label else sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(out)
    if label and arr.max(initial=0) > 255:
        raise ValueError(f"a label map holds the value {int(arr.max())}: at most 255 labels (values 1..255) are kept")
    return arr.astype(np.uint8) if label else arr


def _inside_fraction(image: sitk.Image, frame: ModelFrame) -> float:
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    return float(resample_to_frame(ones, frame, label=True).mean())


def crop_roi(image: sitk.Image, crop_fraction: tuple[float, ...]) -> sitk.Image:
    """The central box of ``image`` covering ``crop_fraction`` of each axis (for pre-alignment)."""
    size = np.array(image.GetSize())
    keep = np.maximum(np.round(size * np.array(crop_fraction[: image.GetDimension()])).astype(int), 1)
    start = (size - keep) // 2
    return sitk.RegionOfInterest(image, keep.tolist(), start.tolist())


PREALIGN_MAX_FRACTION = 0.15
"""A pre-alignment translation longer than this fraction of the fixed image's extent along an axis ran away."""


def prealign_translation(fixed: sitk.Image, moving: sitk.Image, geometry: ModelGeometry) -> tuple[np.ndarray, str]:
    """Translation ``t`` (physical units) with ``fixed(x) ~ moving(x + t)``: elastix's translation registration
    (:func:`elastix.translation`) of the fixed image's region of interest (:func:`crop_roi`) to the moving image,
    both intensity-normalised.

    Returns ``(t, status)``. On these MR images the registration fails now and then (it stops with an error, or
    runs away); then ``t`` is zero and ``status`` says why, so callers can report it. A result is taken as a
    runaway when one of its components exceeds :data:`PREALIGN_MAX_FRACTION` of the fixed image's extent along
    that axis.
    """
    from AgentRegistrationLib.elastix import wrapper as elastix  # itk: slow to import, and only the paper's crop needs it

    dim = fixed.GetDimension()
    try:
        t = elastix.translation(_normalised(crop_roi(fixed, geometry.crop_fraction)), _normalised(moving))
    except RuntimeError:
        return np.zeros(dim), "elastix translation registration failed; no translation applied"
    extent = (np.array(fixed.GetSize()) - 1) * np.array(fixed.GetSpacing())
    if np.any(np.abs(t) > PREALIGN_MAX_FRACTION * extent):
        return np.zeros(dim), f"elastix translation {np.round(t, 1).tolist()} ran away; no translation applied"
    return t, "ok"


def _normalised(image: sitk.Image) -> sitk.Image:
    """``image`` with :func:`normalise_intensity`'s grey values, same geometry."""
    out = sitk.GetImageFromArray(normalise_intensity(sitk.GetArrayFromImage(image)))
    out.CopyInformation(image)
    return out


def middle_slice(image: sitk.Image, index: int | None = None) -> sitk.Image:
    """The axial slice ``index`` (default: the middle one) of a 3-D image, as a 2-D image."""
    if image.GetDimension() != 3:
        raise ValueError("middle_slice needs a 3-D image")
    z = image.GetSize()[2] // 2 if index is None else index
    return image[:, :, z]


def organ_frames(fixed: sitk.Image, moving: sitk.Image, geometry: ModelGeometry, fixed_localisation: Localisation,
                 moving_localisation: Localisation) -> tuple[ModelFrame, ModelFrame]:
    """The two crop boxes of a localised ``geometry``, each on its image's organ, the moving one with the fixed one's
    axes. A 2-D model on 3-D volumes takes one slice of each box (the slice nearest the organ's centre)."""
    if geometry.dim == 2 and fixed.GetDimension() == 3:
        geometry = geometry.slab()
    frame = ModelFrame.on_localisation(fixed, geometry, fixed_localisation)
    return frame, ModelFrame.on_localisation(moving, geometry, moving_localisation, direction=frame.direction)


SAME_ANATOMY_CORRELATION = 0.8
"""Two crops placed by one rule (the fixed crop's estimator on both images) whose intensities correlate at least this
much show the same anatomy in the same place: the same image, or the same patient's series. On the 72 ordered
pairs of different validation subjects the crops the localiser places correlate at most 0.63 (3-D) and 0.67 (a 2-D
model's slabs); the same image stored anywhere correlates 1.0 (results/crop_placement_{3d,2d}_one_rule.md, made by
scripts/experiments/crop_placement.py --moving localiser; Testing/stages/test_do_no_harm.py)."""


def crop_correlation(fixed: sitk.Image, moving: sitk.Image, frame: ModelFrame, moving_frame: ModelFrame) -> float:
    """Pearson correlation of the two intensity-normalised crops (1.0: the same image content)."""
    a = normalise_intensity(resample_to_frame(fixed, frame)).ravel().astype(np.float64)
    b = normalise_intensity(resample_to_frame(moving, moving_frame)).ravel().astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / norm) if norm > 0 else 0.0


def one_rule_for_aligned_images(fixed: sitk.Image, moving: sitk.Image, geometry: ModelGeometry,
                                fixed_localisation: Localisation, moving_localisation: Localisation,
                                moving_by_fixed_rule: Localisation) -> tuple[Localisation, float]:
    """The moving crop's localisation: ``moving_localisation`` (placed by its label: the atlas case), unless the crops
    placed by one rule for both images (``moving_by_fixed_rule``: the moving image localised as the fixed one was)
    correlate at least :data:`SAME_ANATOMY_CORRELATION`: then the images are already aligned anatomy, and that rule's
    crops are kept, so that the same image (wherever it is stored) starts exactly aligned. Returns the localisation
    and the correlation of the one-rule crops."""
    frames = organ_frames(fixed, moving, geometry, fixed_localisation, moving_by_fixed_rule)
    correlation = crop_correlation(fixed, moving, *frames)
    return (moving_by_fixed_rule if correlation >= SAME_ANATOMY_CORRELATION else moving_localisation), correlation


def prepare_pair(
    fixed: sitk.Image,
    moving: sitk.Image,
    geometry: ModelGeometry,
    fixed_label: sitk.Image | None = None,
    moving_label: sitk.Image | None = None,
    prealign: bool = True,
    centre: np.ndarray | None = None,
    translation: np.ndarray | None = None,
    fixed_localisation: Localisation | None = None,
    moving_localisation: Localisation | None = None,
) -> PreparedPair:
    """Crop, resample and normalise a pair onto the model grid.

    With a localised ``geometry`` each crop box is placed on its image's organ: ``fixed_localisation``
    and ``moving_localisation`` are required. With the paper's geometry the moving image is
    pre-aligned by translation: ``translation`` skips the elastix pre-alignment with a known one;
    ``prealign=False`` uses none. Raises ``ValueError`` with what to do when the dimension does not
    match the model or the images do not overlap.
    """
    if moving.GetDimension() != fixed.GetDimension():
        raise ValueError(f"fixed image is {fixed.GetDimension()}-D but moving image is {moving.GetDimension()}-D")
    if geometry.localised:
        if fixed_localisation is None or moving_localisation is None:
            raise ValueError("this model crops each image on its organ: give both localisations")
        frame, moving_frame = organ_frames(fixed, moving, geometry, fixed_localisation, moving_localisation)
        info = {"localisation": {"fixed": fixed_localisation.to_dict(), "moving": moving_localisation.to_dict()}}
        where = "the organ's crop box"
    else:
        frame = ModelFrame.for_fixed(fixed, geometry, centre)
        status = "given" if translation is not None else "none"
        if translation is None:
            translation, status = (prealign_translation(fixed, moving, geometry) if prealign
                                   else (np.zeros(fixed.GetDimension()), "none"))
        moving_frame = frame.translated(np.asarray(translation, dtype=float))
        info = {"prealignment": status}
        where = "the fixed image's region of interest, even after translation pre-alignment"
    if _inside_fraction(moving, moving_frame) < 0.25:
        raise ValueError(
            f"the moving image covers less than a quarter of {where}: the images do not overlap. Check that both "
            "show the same anatomy, and centre or roughly align them first (e.g. Slicer's Transforms module).")
    pair = PreparedPair(
        fixed=normalise_intensity(resample_to_frame(fixed, frame)),
        moving=normalise_intensity(resample_to_frame(moving, moving_frame)),
        frame=frame,
        moving_frame=moving_frame,
        info=info,
    )
    if fixed_label is not None:
        pair.fixed_label = resample_to_frame(fixed_label, frame, label=True)
    if moving_label is not None:
        pair.moving_label = resample_to_frame(moving_label, moving_frame, label=True)
    return pair


def displacement_in_fixed_geometry(
    coefficients: np.ndarray,
    grid: ControlGrid,
    frame: ModelFrame,
    fixed: sitk.Image,
    moving_frame: ModelFrame,
) -> sitk.Image:
    """The full transform as an ITK displacement field on the fixed image's own grid: vectors in
    physical units, fixed point -> moving point.

    Fixed point ``p`` is model voxel ``q`` of the fixed box ``frame``; the model-space FFD moves it to
    ``q + u(q)``, which is the physical point ``moving_frame.to_physical(q + u(q))``. The FFD is evaluated
    exactly at each fixed voxel (no interpolation of a coarse field). Requires the frames' direction to be the
    fixed image's, or that of the fixed image in the canonical voxel order (:mod:`orientation`; the field is then
    computed there and brought back onto the fixed image's own voxels), so each model axis depends on one image
    axis only.
    """
    if not np.allclose(frame.direction.ravel(), fixed.GetDirection(), atol=1e-6):
        blank = sitk.Image(fixed.GetSize(), sitk.sitkUInt8)
        blank.CopyInformation(fixed)
        ordered = canonical(blank)
        if not np.allclose(frame.direction.ravel(), ordered.GetDirection(), atol=1e-6):
            raise ValueError("the crop box's axes are neither the fixed image's nor its canonical ones")
        field = displacement_in_fixed_geometry(coefficients, grid, frame, ordered, moving_frame)
        return on_grid_of(field, fixed)
    dim = fixed.GetDimension()
    f_origin = np.array(fixed.GetOrigin())
    f_spacing = np.array(fixed.GetSpacing())
    # model coordinate of fixed voxel i along axis a: (D^T (o_f - o_m))_a / s_m,a + i * s_f,a / s_m,a
    offset = frame.direction.T @ (f_origin - frame.origin)
    bases, axes = [], []
    for a in range(dim):
        q = (offset[a] + f_spacing[a] * np.arange(fixed.GetSize()[a])) / frame.spacing[a]
        axes.append(q)
        bases.append(grid.basis(a, torch.from_numpy(q)))
    u = dense_displacement(torch.from_numpy(np.asarray(coefficients, dtype=np.float64))[None], grid, bases)[0]
    u = u.numpy()  # (dim, *array shape): model voxels, channel order (x, y, z)
    # moving point - fixed point = (o_m - o_f) + D ((s_m - s_f) q + s_m u), one physical axis c at a time; the
    # model coordinate q_a varies along image axis a only, so its term is a broadcast line, never a full grid
    shift = moving_frame.origin - frame.origin
    arr = np.empty((*u.shape[1:], dim))
    term = np.empty(u.shape[1:])
    for c in range(dim):
        value = np.full(u.shape[1:], shift[c])
        for a in range(dim):
            np.multiply(u[a], frame.direction[c, a] * moving_frame.spacing[a], out=term)
            value += term
            line = [1] * dim
            line[dim - 1 - a] = -1  # image axis a is array axis dim - 1 - a
            value += (frame.direction[c, a] * (moving_frame.spacing[a] - frame.spacing[a]) * axes[a]).reshape(line)
        arr[..., c] = value
    out = sitk.GetImageFromArray(arr, isVector=True)
    out.CopyInformation(fixed)
    return out


def warp_to_fixed(image: sitk.Image, displacement: sitk.Image, label: bool = False) -> sitk.Image:
    """Resample the original moving ``image`` into the fixed geometry with the displacement field."""
    transform = sitk.DisplacementFieldTransform(sitk.Image(displacement))
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    pixel = image.GetPixelID()
    return sitk.Resample(image, displacement, transform, interp, 0.0, pixel)
