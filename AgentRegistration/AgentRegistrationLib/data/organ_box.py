"""Where the organ is in an image, and how large: the localisation that places the agent's crops.

A :class:`Localisation` is the organ's centre (a physical point, LPS as SimpleITK) and its spread:
the standard deviation of the organ's voxels along each axis of the image (physical units). It comes
from a label (a moving atlas label, or the training masks), from a point the user places, or from the
learned localiser (:mod:`localiser`) when the image has no label.

A localised crop box (:meth:`preprocessing.ModelFrame.on_localisation`) is centred on the centre and
spans ``box_spreads`` standard deviations per axis, so every image's organ fills the model grid the same
way whatever the scanner origin, field of view or voxel size: the fixed and the moving crops are then
related by a translation and a per-axis scaling, and the SDM spends its modes on shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

# Crop box extent per axis in standard deviations of the organ along that axis (x, y[, z]). The prostate
# spans about 4.5 standard deviations per axis, so it fills about 45 % of the box in-plane and 65 % in z.
BOX_SPREADS = {2: (10.0, 10.0), 3: (10.0, 10.0, 7.0)}


@dataclass(frozen=True)
class Localisation:
    centre: np.ndarray  # (dim,) physical point
    spread: np.ndarray  # (dim,) standard deviation of the organ along each image axis, physical units
    source: str  # "label", "point", "localiser", ...
    confidence: float | None = None  # the localiser's, 0..1 (localiser.LocalisationConfidence); None: not a guess
    warning: str = ""  # why it may be misplaced and what to do; empty when confident

    def to_dict(self) -> dict:
        out = {"centre": np.asarray(self.centre).tolist(), "spread": np.asarray(self.spread).tolist(),
               "source": self.source}
        if self.confidence is not None:
            out.update(confidence=self.confidence, warning=self.warning)
        return out


def localisation_from_weights(weights: np.ndarray, image: sitk.Image, source: str) -> Localisation:
    """Weighted centre and per-axis spread of ``weights`` (array order, same grid as ``image``).

    The spread is at least half a voxel per axis (a single slice has no spread across slices).
    """
    weights = np.asarray(weights)
    where = np.nonzero(weights)  # the moments over the voxels that weigh (an organ is a small part of its image)
    w = weights[where].astype(np.float64)
    total = w.sum()
    if weights.shape != sitk.GetArrayViewFromImage(image).shape[: weights.ndim] or not total > 0:
        raise ValueError(f"cannot localise the organ from {source}: it is empty or not on the image's grid")
    coords = [axis.astype(np.float64) for axis in where]
    mean = np.array([(c * w).sum() / total for c in coords])
    var = np.array([((c - m) ** 2 * w).sum() / total for c, m in zip(coords, mean, strict=True)])
    index = mean[::-1]  # array order (z, y, x) -> index order (x, y, z)
    std_index = np.maximum(np.sqrt(var[::-1]), 0.5)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(index.tolist()))
    return Localisation(centre, std_index * np.array(image.GetSpacing()), source)


def localisation_from_label(label: sitk.Image, source: str = "label") -> Localisation:
    """The organ's centre and spread from a label map (every non-zero voxel is organ)."""
    mask = sitk.GetArrayViewFromImage(label) > 0
    if not mask.any():
        raise ValueError(f"cannot localise the organ from the {source}: it is empty (no voxel > 0)")
    return localisation_from_weights(mask, label, source)


def localisation_at_point(centre, spread, source: str = "point") -> Localisation:
    """A localisation given by hand: a physical point and the organ's spread per axis."""
    centre = np.asarray(centre, dtype=float)
    spread = np.broadcast_to(np.asarray(spread, dtype=float), centre.shape).copy()
    if np.any(spread <= 0) or not np.all(np.isfinite(centre)):
        raise ValueError(f"a localisation needs a finite centre and a positive spread, not {centre} / {spread}")
    return Localisation(centre, spread, source)
