"""The plain elastix B-spline baselines ``e8`` and ``e16`` (the paper's Table 1), in one place for ``agentreg
evaluate``, ``agentreg groundtruth --compare-elastix`` and ``agentreg demo``: elastix's default B-spline map (Mattes
mutual information, adaptive stochastic gradient descent, 3 resolutions, no points, no bending energy) on a pair of
model-grid arrays, with a final grid spacing of half the model's control spacing (``e8``) or the control spacing
itself (``e16``: the ground truth's and the SDM's grid)."""

from __future__ import annotations

import numpy as np

from AgentRegistrationLib.core.bspline import ControlGrid
from AgentRegistrationLib.core.geometry import ModelGeometry

ELASTIX_BASELINES = ("e8", "e16")
"""Plain elastix B-spline at half the model's control spacing, and at it."""
BASELINE_ITERATIONS = 500
"""elastix iterations per resolution of a baseline unless told otherwise."""


def baseline_spacing(method: str, geometry: ModelGeometry) -> tuple[float, ...]:
    """e16: the GT/SDM control grid (16x16 / 16x16x8 model voxels); e8: half of it."""
    if method not in ELASTIX_BASELINES:
        raise ValueError(f"unknown elastix baseline {method!r}; choose one of {', '.join(ELASTIX_BASELINES)}")
    return tuple(s / 2 if method == "e8" else s for s in geometry.control_spacing)


def register_baseline(method: str, fixed: np.ndarray, moving: np.ndarray, geometry: ModelGeometry,
                      iterations: int = BASELINE_ITERATIONS) -> tuple[np.ndarray, ControlGrid]:
    """``method`` (e8 / e16) registering the model-grid array ``moving`` to ``fixed``: its B-spline coefficients and
    their control grid (elastix's, on the model grid in model voxels)."""
    # itk and SimpleITK: this module is also read where neither is installed (agentreg evaluate's cached results and
    # reports, training on a bare GPU machine); only registering needs them
    from AgentRegistrationLib.elastix import wrapper as elastix

    parameter_map = elastix.bspline_map(baseline_spacing(method, geometry), iterations)
    maps = elastix.register(elastix.model_image(fixed), elastix.model_image(moving), [parameter_map])
    return elastix.bspline_coefficients(maps[-1])
