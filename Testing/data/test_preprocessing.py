"""Preprocessing onto the model grid and the exact way back to the user's fixed geometry."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from AgentRegistrationLib.core.bspline import dense_displacement
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.core.metrics import dice
from AgentRegistrationLib.core.warp import warp
from AgentRegistrationLib.data.preprocessing import (
    ModelFrame,
    displacement_in_fixed_geometry,
    prepare_pair,
    resample_to_frame,
    warp_to_fixed,
)

ROTATED = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _with_geometry(image, origin, spacing, direction=ROTATED):
    image = sitk.Image(image)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def _native(native, case, origin, spacing):
    return tuple(_with_geometry(sitk.ReadImage(str(native / f"case{case}_{k}.nii.gz")), origin, spacing)
                 for k in ("image", "label"))


def test_translation_prealignment_recovers_a_known_shift(native):
    fixed, _ = _native(native, "13", (5.0, -3.0, 12.0), (0.6, 0.6, 3.0))
    shift = np.array([4.2, -6.0, 3.0])
    moving = _with_geometry(fixed, tuple(np.array(fixed.GetOrigin()) + shift), fixed.GetSpacing())
    pair = prepare_pair(fixed, moving, ModelGeometry.paper(3))
    assert np.allclose(pair.translation, shift, atol=0.3)


def test_result_lands_exactly_in_the_original_fixed_geometry(native):
    """A model-space deformation, mapped back, equals the same deformation done in model space."""
    geometry = ModelGeometry.paper(3)
    fixed, fixed_label = _native(native, "13", (5.0, -3.0, 12.0), (0.6, 0.6, 3.0))
    moving, moving_label = _native(native, "19", (-40.0, 7.0, 1.0), (0.55, 0.65, 2.5))
    translation = np.array(moving.GetOrigin()) - np.array(fixed.GetOrigin()) + np.array([3.0, -2.0, 4.0])
    pair = prepare_pair(fixed, moving, geometry, fixed_label, moving_label, translation=translation)
    assert pair.moving_label.sum() > 2000 and dice(pair.moving_label, pair.fixed_label) > 0.3
    assert pair.fixed.shape == geometry.array_shape and pair.fixed.dtype == np.float32
    assert 0.0 <= pair.fixed.min() and pair.fixed.max() <= 1.0 and pair.moving_label.any()

    grid = geometry.control_grid()
    coefficients = np.random.default_rng(3).normal(0, 2.0, grid.num_coefficients)
    u = dense_displacement(torch.tensor(coefficients)[None], grid, grid.image_bases(geometry.size, dtype=torch.float64))
    in_model = warp(torch.tensor(pair.moving_label)[None, None], u.float(), mode="nearest")[0, 0].numpy()

    displacement = displacement_in_fixed_geometry(coefficients, grid, pair.frame, fixed, pair.moving_frame)
    assert displacement.GetSize() == fixed.GetSize() and displacement.GetDirection() == fixed.GetDirection()
    assert displacement.GetOrigin() == fixed.GetOrigin()
    # the field, sampled at the model grid points, is the model-space field in physical units
    sampled = sitk.GetArrayFromImage(sitk.Resample(displacement, pair.frame.reference(), sitk.Transform(),
                                                   sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64))
    expected = np.einsum("ij,j...->...i", pair.frame.direction,
                         pair.frame.spacing[:, None, None, None] * u[0].numpy()) + translation
    inner = (slice(1, -1), slice(2, -2), slice(2, -2))  # linear interpolation needs neighbours inside
    assert np.abs(sampled - expected)[inner].max() < 0.05
    warped_label = warp_to_fixed(moving_label, displacement, label=True)
    assert warped_label.GetPixelID() == moving_label.GetPixelID()
    back_in_model = resample_to_frame(warped_label, pair.frame, label=True)
    assert dice(back_in_model, in_model) > 0.9  # two nearest-neighbour resamplings
    unwarped = resample_to_frame(warp_to_fixed(moving_label, displacement_in_fixed_geometry(
        np.zeros_like(coefficients), grid, pair.frame, fixed, pair.moving_frame), label=True), pair.frame, label=True)
    assert dice(unwarped, in_model) < dice(back_in_model, in_model) - 0.02


def test_zero_deformation_is_the_translation(native):
    geometry = ModelGeometry.paper(3)
    fixed, _ = _native(native, "13", (5.0, -3.0, 12.0), (0.6, 0.6, 3.0))
    frame = ModelFrame.for_fixed(fixed, geometry)
    field = displacement_in_fixed_geometry(np.zeros(geometry.control_grid().num_coefficients),
                                           geometry.control_grid(), frame, fixed, frame.translated([1.0, 2.0, 3.0]))
    assert np.allclose(sitk.GetArrayFromImage(field), [1.0, 2.0, 3.0])


def test_dimension_mismatch_says_what_to_do(native):
    fixed, _ = _native(native, "13", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="model is 2-D but the image is 3-D: use a 3-D model"):
        prepare_pair(fixed, fixed, ModelGeometry.paper(2), prealign=False)


def test_images_that_do_not_overlap_are_refused(native):
    fixed, _ = _native(native, "13", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    far = _with_geometry(fixed, (5000.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="do not overlap"):
        prepare_pair(fixed, far, ModelGeometry.paper(3), prealign=False)
