"""The constrained elastix registration that makes the ground truth (paper, section 3): mutual information,
bending energy and corresponding points on the mask surfaces (or the masks' signed distances)."""

from __future__ import annotations

import numpy as np

from AgentRegistrationLib.contract.training_folder import GT_METRICS
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.core.metrics import label_values

GT_WEIGHTS = {"similarity": 1.0, "bending": 3.0, "points": 0.2}
"""The paper's ground truth (``points``): Mattes MI of the images, bending energy, corresponding surface points."""
DISTANCE_WEIGHTS = {"similarity": 1.0, "bending": 1.0, "points": 0.02}
"""The ``distance`` ground truth: mean squares of the masks' signed distance maps, bending energy, and the
corresponding points only where the labels hold several values (to keep them apart). Chosen on 8 ordered 3-D pairs
of training subjects, organ crops, 75x75x20 / 16x16x8: Dice 0.842 -> 0.908 without points, 0.902 with points at
0.02, 0.890 at 0.2, against 0.843 for ``points`` (``results/groundtruth_metric.md``)."""
DISTANCE_CLIP = 10.0
"""Signed distances are clipped to +-this many model voxels: far from the surface only the sign matters."""


def ray_directions(dim: int, count: int) -> np.ndarray:
    """``count`` evenly spread unit directions, ITK order (x, y[, z])."""
    if dim == 2:
        a = 2 * np.pi * np.arange(count) / count
        return np.stack([np.cos(a), np.sin(a)], axis=1)
    i = np.arange(count) + 0.5
    z = 1 - 2 * i / count
    r = np.sqrt(1 - z**2)
    phi = np.pi * (1 + 5**0.5) * i
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def surface_points(mask: np.ndarray, directions: np.ndarray, step: float = 0.25) -> np.ndarray:
    """Where each ray from the mask's centroid leaves the mask (voxel coordinates, ITK order)."""
    mask = np.asarray(mask) > 0
    if not mask.any():
        raise ValueError("cannot place surface points on an empty mask")
    index = np.argwhere(mask)[:, ::-1].astype(float)  # ITK order
    centre = index.mean(axis=0)
    limits = np.array(mask.shape[::-1]) - 1
    max_len = float(np.linalg.norm(limits)) + 1
    radii = np.arange(0, max_len, step)
    pts = centre[None, None, :] + radii[None, :, None] * directions[:, None, :]  # (rays, samples, dim)
    vox = np.clip(np.rint(pts), 0, limits).astype(int)
    inside = mask[tuple(vox[..., a] for a in range(mask.ndim - 1, -1, -1))]
    outside_bounds = np.any((pts < -0.5) | (pts > limits + 0.5), axis=-1)
    inside &= ~outside_bounds
    # last sample before the first exit (the ray's first boundary crossing)
    first_exit = np.argmax(~inside, axis=1)
    first_exit[inside.all(axis=1)] = inside.shape[1]
    last_inside = np.maximum(first_exit - 1, 0)
    return pts[np.arange(len(directions)), last_inside]


def corresponding_points(fixed_label: np.ndarray, moving_label: np.ndarray, directions: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Corresponding surface points of two label maps, ``(fixed_points, moving_points)``: :func:`surface_points` of
    each label value the two share, matched label to label (the same rays from each label's own centroid); of the
    union of the labels when either map holds one label value (or they share fewer than two)."""
    fixed_label, moving_label = np.asarray(fixed_label), np.asarray(moving_label)
    fixed_values, moving_values = label_values(fixed_label), label_values(moving_label)
    shared = sorted(set(fixed_values) & set(moving_values))
    if min(len(fixed_values), len(moving_values)) < 2 or len(shared) < 2:
        return surface_points(fixed_label, directions), surface_points(moving_label, directions)
    return (np.concatenate([surface_points(fixed_label == v, directions) for v in shared]),
            np.concatenate([surface_points(moving_label == v, directions) for v in shared]))


def signed_distance(label: np.ndarray, clip: float = DISTANCE_CLIP) -> np.ndarray:
    """The signed distance (model voxels; negative inside) to the surface of the union of ``label``'s values,
    clipped to ``+-clip``, float32."""
    from scipy import ndimage

    mask = np.asarray(label) > 0
    inside, outside = ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask)
    return np.clip(outside - inside, -clip, clip).astype(np.float32)


def register_constrained(fixed: np.ndarray, moving: np.ndarray, fixed_label: np.ndarray, moving_label: np.ndarray,
                         geometry: ModelGeometry, num_points: int | None = None, iterations: int = 300,
                         resolutions: int = 3, metric: str = "points") -> np.ndarray:
    """elastix B-spline registration constrained by the masks; returns the coefficient vector on ``geometry``'s
    control grid (model voxels).

    ``metric``: ``points`` (the paper's): Mattes MI of the images, bending energy and corresponding surface points
    (:data:`GT_WEIGHTS`), on each label's surface, label to label (:func:`corresponding_points`), ``num_points`` per
    label. ``distance``: mean squares of the masks' signed distance maps (:func:`signed_distance`) and bending energy,
    with the corresponding points where the labels hold several values (:data:`DISTANCE_WEIGHTS`)."""
    # itk and SimpleITK: this module is also read where neither is installed (scripts/recipes/gpu_session.py), to read a
    # ground-truth folder; only making one needs them
    from AgentRegistrationLib.elastix import wrapper as elastix

    if metric not in GT_METRICS:
        raise ValueError(f"ground-truth metric {metric!r}: choose one of {', '.join(GT_METRICS)}")
    several = min(len(label_values(fixed_label)), len(label_values(moving_label))) > 1
    fixed_points = moving_points = None
    if metric == "points" or several:  # the distance maps alone need no points for one label
        directions = ray_directions(geometry.dim, num_points or (64 if geometry.dim == 2 else 256))
        fixed_points, moving_points = corresponding_points(fixed_label, moving_label, directions)
    if metric == "points":
        parameter_map = elastix.bspline_map(geometry.control_spacing, iterations, resolutions,
                                            points_weight=GT_WEIGHTS["points"], bending_weight=GT_WEIGHTS["bending"])
        images = elastix.model_image(fixed), elastix.model_image(moving)
    else:
        parameter_map = elastix.bspline_map(geometry.control_spacing, iterations, resolutions,
                                            points_weight=DISTANCE_WEIGHTS["points"] if several else None,
                                            bending_weight=DISTANCE_WEIGHTS["bending"])
        parameter_map["Metric"] = ["AdvancedMeanSquares", *parameter_map["Metric"][1:]]
        images = elastix.model_image(signed_distance(fixed_label)), elastix.model_image(signed_distance(moving_label))
    maps = elastix.register(*images, [parameter_map], fixed_points, moving_points)
    coefficients, grid = elastix.bspline_coefficients(maps[-1])
    expected = geometry.control_grid()
    # to float rounding: elastix computes a grid origin of a non-integer spacing in another order
    if grid.size != expected.size or not np.allclose(grid.spacing + grid.origin, expected.spacing + expected.origin,
                                                     rtol=0, atol=1e-6):
        raise RuntimeError(f"elastix used control grid {grid}, expected {expected}")
    return coefficients
