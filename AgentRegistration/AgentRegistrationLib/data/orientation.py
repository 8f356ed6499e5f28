"""One storage order for every image the agent sees: the canonical orientation.

The same anatomy can be stored in many voxel orders: axial, sagittal or coronal slices, rows flipped, with a
direction matrix that says so. The localiser's grid and the crop boxes follow the image's axes, and the organ's
spread is measured along them, so without a rule the agent would see a permuted or mirrored crop of a permuted
volume. :func:`canonical` reorders the voxels (an exact permutation and flips, no interpolation) so that image
axis ``a`` runs along physical axis ``a`` in its positive direction (LPS, as SimpleITK), as near as the
direction allows. Everything between reading the images and writing the results works on canonical images; the
results go back to the user's own fixed grid (:func:`on_grid_of`).
"""

from __future__ import annotations

from itertools import permutations

import numpy as np
import SimpleITK as sitk


def _direction(image: sitk.Image) -> np.ndarray:
    dim = image.GetDimension()
    return np.array(image.GetDirection()).reshape(dim, dim)


def canonical_order(direction: np.ndarray) -> tuple[list[int], list[bool]]:
    """For a direction matrix (columns: image axes in physical space), which image axis runs along each physical
    axis (``order[p]``), and whether it runs against it (``flip[p]``)."""
    weight = np.abs(direction)  # the image axis nearest each physical axis, one each (at most 3! = 6 choices)
    order = list(max(permutations(range(len(direction))), key=lambda o: sum(weight[p, a] for p, a in enumerate(o))))
    flip = [bool(direction[p, a] < 0) for p, a in enumerate(order)]
    return order, flip


def is_canonical(image: sitk.Image) -> bool:
    """Whether the image is already stored in the canonical order."""
    order, flip = canonical_order(_direction(image))
    return order == list(range(image.GetDimension())) and not any(flip)


def canonical(image: sitk.Image | None) -> sitk.Image | None:
    """``image`` with its voxels reordered into the canonical order (the same image when it already is)."""
    if image is None or is_canonical(image):
        return image
    order, flip = canonical_order(_direction(image))
    out = sitk.PermuteAxes(image, order) if order != list(range(image.GetDimension())) else image
    return sitk.Flip(out, flip, flipAboutOrigin=False) if any(flip) else out


def on_grid_of(image: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """``image`` (on the canonical grid of ``grid``, or on ``grid`` itself) on ``grid``'s own voxels: the way back
    from :func:`canonical`, exact because the voxel centres coincide."""
    if image.GetSize() == grid.GetSize() and np.allclose(image.GetDirection(), grid.GetDirection()):
        return image
    return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, image.GetPixelID())
