"""Registration metrics: Dice, surface distances and Jacobian-determinant statistics.

Distances are in physical units of the given ``spacing`` (ITK order); with spacing 1 they are
in voxels. Arrays are in array order (z, y, x). Dice is defined once (:func:`dice`), and computed for a batch of
tensors on their device by :func:`dice_batch`.
"""

from __future__ import annotations

import numpy as np
import torch


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks (1.0 when both are empty)."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def dice_batch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(B,)`` :func:`dice` of each pair of a batch of masks ``(B, ...)`` (> 0 is inside; 1.0 when both are empty),
    on the tensors' device: the agent's Dice at every step of a batch of pairs, without a copy to the host."""
    a, b = a.flatten(1) > 0, b.flatten(1) > 0
    total = a.sum(1) + b.sum(1)
    return torch.where(total > 0, 2.0 * (a & b).sum(1) / total.clamp(min=1), torch.ones_like(total, dtype=torch.float))


def label_values(*labels: np.ndarray) -> list[int]:
    """The non-zero values found in any of ``labels`` (label maps), sorted."""
    return sorted({int(v) for label in labels for v in np.unique(np.asarray(label)) if v != 0})


def per_label(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...] | None = None,
              hausdorff: bool = True) -> dict[int, dict[str, float]]:
    """Dice (and Hausdorff distance, when both are non-empty) of each label value of label maps ``a`` and ``b``
    apart, ``{value: {"dice": ..., "hausdorff": ...}}``; empty when they hold fewer than two label values (the union
    is then the one label: :func:`dice`)."""
    a, b = np.asarray(a), np.asarray(b)
    values = label_values(a, b)
    if len(values) < 2:
        return {}
    out = {}
    for v in values:
        in_a, in_b = a == v, b == v
        out[v] = {"dice": dice(in_a, in_b)}
        if hausdorff and in_a.any() and in_b.any():
            out[v]["hausdorff"] = surface_distances(in_a, in_b, spacing)["hausdorff"]
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    """The voxels of ``mask`` with a face neighbour outside it, the image's border counting as outside: ``mask`` less
    its erosion by the face-connected cross (scipy.ndimage's ``binary_erosion(mask, border_value=0)``)."""
    padded = np.pad(mask, 1)
    inner = mask.copy()
    for axis in range(mask.ndim):
        for step in (0, 2):  # the neighbour before and the one after, in the padded array
            shifted = [slice(1, -1)] * mask.ndim
            shifted[axis] = slice(step, step + mask.shape[axis])
            inner &= padded[tuple(shifted)]
    return mask & ~inner


def _distance_to(surface: np.ndarray, spacing: tuple[float, ...] | None) -> np.ndarray:
    """The Euclidean distance (physical units of ``spacing``, ITK order; voxels without) of every voxel to the nearest
    voxel of ``surface``, in float64: Maurer's exact transform. Its float32 arithmetic is exact on unit spacing; with
    other spacings a distance is off by up to about 1e-5 (units of ``spacing``), and a surface voxel's own residue of
    that size is set to 0. (SimpleITK is imported here: the learned core, which imports this module, runs on a GPU
    machine without it.)"""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(surface.astype(np.uint8))
    if spacing is not None:
        image.SetSpacing(tuple(float(s) for s in spacing))
    squared = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=True,
                                           useImageSpacing=spacing is not None)
    return np.where(surface, 0.0, np.sqrt(np.abs(sitk.GetArrayViewFromImage(squared), dtype=np.float64)))


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    # on the box around both masks and one voxel more (clipped to the image): every surface voxel and every
    # erosion is the same as on the whole image, so the distances are exact, and a large volume costs no more
    # than its organ
    where = np.nonzero(a | b)
    box = tuple(slice(max(int(w.min()) - 1, 0), int(w.max()) + 2) for w in where)
    sa, sb = _surface(a[box]), _surface(b[box])
    return _distance_to(sb, spacing)[sa], _distance_to(sa, spacing)[sb]


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...] | None = None) -> dict[str, float]:
    """Hausdorff distance (maximum), its 95th percentile, and average symmetric surface distance
    between the boundaries of masks ``a`` and ``b``."""
    ab, ba = _surface_distances(a, b, spacing)
    both = np.concatenate([ab, ba])
    return {
        "hausdorff": float(max(ab.max(), ba.max())),
        "hausdorff95": float(max(np.percentile(ab, 95), np.percentile(ba, 95))),
        "average_surface_distance": float(both.mean()),
    }


def jacobian_determinant(displacement: np.ndarray, spacing: tuple[float, ...] | None = None) -> np.ndarray:
    """det(I + grad u) of a displacement ``(dim, *spatial)`` (channel order x, y[, z], physical
    units of ``spacing``), in float64: central differences inside, one-sided at the border
    (``np.gradient``), and the 2x2 or 3x3 determinant in closed form (the same values as a
    general determinant to float64 rounding, without a (dim, dim, *spatial) matrix per voxel)."""
    u = np.asarray(displacement)
    dim = u.shape[0]
    spacing = tuple(spacing) if spacing is not None else (1.0,) * dim
    # j[c][a] = d u_c / d x_a + (c == a); array axis (dim-1-a) is ITK axis a
    j = []
    for c in range(dim):
        grads = np.gradient(np.asarray(u[c], dtype=np.float64), *spacing[::-1])
        grads = [grads] if dim == 1 else grads
        row = [grads[dim - 1 - a] for a in range(dim)]
        row[c] += 1.0
        j.append(row)
    if dim == 2:
        return j[0][0] * j[1][1] - j[0][1] * j[1][0]
    if dim == 3:
        det = j[1][1] * j[2][2]
        det -= j[1][2] * j[2][1]
        det *= j[0][0]
        minor = j[1][0] * j[2][2]
        minor -= j[1][2] * j[2][0]
        minor *= j[0][1]
        det -= minor
        minor = j[1][0] * j[2][1]
        minor -= j[1][1] * j[2][0]
        minor *= j[0][2]
        det += minor
        return det
    return np.linalg.det(np.moveaxis(np.array(j), (0, 1), (-2, -1)))


def jacobian_statistics(displacement: np.ndarray, spacing: tuple[float, ...] | None = None) -> dict[str, float]:
    """Percentage of voxels with det J <= 0 (folding) and standard deviation of log det J (over det J > 0)."""
    det = jacobian_determinant(displacement, spacing)
    positive = det[det > 0]
    return {
        "folding_percent": float(100.0 * (det <= 0).mean()),
        "log_jacobian_std": float(np.log(positive).std()) if positive.size else float("nan"),
    }
