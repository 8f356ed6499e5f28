"""Our torch B-spline FFD means the same deformation as elastix/transformix."""

import numpy as np
import SimpleITK as sitk
import torch
from AgentRegistrationLib.core.bspline import ControlGrid, dense_displacement
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.data.preprocessing import middle_slice, normalise_intensity
from AgentRegistrationLib.elastix import wrapper as elastix


def _ours(coefficients, grid, size):
    u = dense_displacement(torch.tensor(coefficients)[None], grid, grid.image_bases(size, dtype=torch.float64))[0]
    return np.moveaxis(u.numpy(), 0, -1)


def test_control_grid_is_elastix_grid(load_case):
    for dim in (2, 3):
        geometry = ModelGeometry.paper(dim)
        image = sitk.GetImageFromArray(np.random.default_rng(0).random(geometry.array_shape).astype(np.float32))
        maps = elastix.register(image, image, [elastix.bspline_map(geometry.control_spacing, 2, 1)])
        assert elastix.bspline_coefficients(maps[0])[1] == geometry.control_grid()


def test_dense_field_equals_transformix_on_real_2d_registration(load_case):
    """Coefficients of a real elastix B-spline registration between two PROMISE12 slices."""
    geometry = ModelGeometry.paper(2)
    fixed = middle_slice(load_case("00")[0])[14:114, 14:114]
    moving = middle_slice(load_case("04")[0])[14:114, 14:114]
    fixed, moving = (sitk.GetImageFromArray(normalise_intensity(sitk.GetArrayFromImage(i))) for i in (fixed, moving))
    maps = elastix.register(fixed, moving, [elastix.bspline_map(geometry.control_spacing, 200, 2)])
    coefficients, grid = elastix.bspline_coefficients(maps[0])
    assert grid == geometry.control_grid()
    assert np.abs(coefficients).max() > 0.5  # a real, non-trivial deformation
    theirs = elastix.transformix_displacement(maps, fixed)
    err = np.abs(_ours(coefficients, grid, geometry.size) - theirs).max()
    assert err < 1e-3, f"max difference {err} voxel"


def test_dense_field_equals_transformix_3d():
    geometry = ModelGeometry.paper(3)
    grid = geometry.control_grid()
    coefficients = np.random.default_rng(1).normal(0, 3, grid.num_coefficients)
    reference = sitk.Image(list(geometry.size), sitk.sitkFloat32)
    theirs = elastix.transformix_displacement([elastix.bspline_transform_map(coefficients, grid, reference)], reference)
    err = np.abs(_ours(coefficients, grid, geometry.size) - theirs).max()
    assert err < 1e-3, f"max difference {err} voxel"


def test_grid_from_elastix_map_round_trip():
    grid = ControlGrid.for_image((75, 75, 20), (16, 16, 8))
    assert ControlGrid.from_elastix_map(grid.elastix_map()) == grid
    assert grid.size == (8, 8, 6) and grid.num_coefficients == 3 * 8 * 8 * 6
