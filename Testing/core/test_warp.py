"""The spatial transformer recovers known deformations of a real PROMISE12 volume."""

import numpy as np
import SimpleITK as sitk
import torch
from AgentRegistrationLib.core.bspline import dense_displacement
from AgentRegistrationLib.core.geometry import ModelGeometry
from AgentRegistrationLib.core.metrics import dice
from AgentRegistrationLib.core.warp import compose, grid_scale, sample, sampling_grid, warp


def _known_field(shape_xyz, seed=0, amplitude=3.0):
    grid = ModelGeometry((shape_xyz), (16.0,) * len(shape_xyz)).control_grid()
    c = np.random.default_rng(seed).normal(0, amplitude, grid.num_coefficients)
    return dense_displacement(torch.tensor(c)[None], grid, grid.image_bases(shape_xyz, dtype=torch.float64))


def _sitk_field(u):
    return sitk.DisplacementFieldTransform(sitk.GetImageFromArray(np.moveaxis(u[0].numpy(), 0, -1), isVector=True))


def test_warp_recovers_known_deformation_of_real_volume(load_case):
    image, label = load_case("11")
    arr = sitk.GetArrayFromImage(image).astype(np.float64)
    u = _known_field(image.GetSize())
    expected = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(image, sitk.sitkFloat64), image, _sitk_field(u),
                                                    sitk.sitkLinear, 0.0))
    ours = warp(torch.tensor(arr)[None, None], u)[0, 0].numpy()
    # compare where x + u(x) stays inside the image (outside, sitk gives 0 and we give the border value)
    pos = u[0].numpy() + np.stack(np.meshgrid(*[np.arange(n) for n in arr.shape], indexing="ij")[::-1])
    inside = np.all([(pos[c] >= 0) & (pos[c] <= arr.shape[2 - c] - 1) for c in range(3)], axis=0)
    assert inside.mean() > 0.8
    assert np.abs(ours - expected)[inside].max() < 1e-6 * np.abs(arr).max()
    assert np.abs(ours - arr).mean() > 1.0  # the deformation is not trivial

    lab = torch.tensor(sitk.GetArrayFromImage(label))[None, None]
    warped_label = warp(lab, u.float(), mode="nearest")
    assert warped_label.dtype == lab.dtype and set(warped_label.unique().tolist()) <= {0, 1}
    expected_label = sitk.GetArrayFromImage(sitk.Resample(label, label, _sitk_field(u), sitk.sitkNearestNeighbor))
    assert dice(warped_label[0, 0].numpy(), expected_label) > 0.99


def test_identity_warp_is_exact(load_case):
    arr = torch.tensor(sitk.GetArrayFromImage(load_case("00")[0]), dtype=torch.float32)[None, None]
    assert torch.allclose(warp(arr, torch.zeros(1, 3, *arr.shape[2:])), arr, atol=1e-3)


def test_composition_equals_sitk_composite_transform():
    """compose(first, second)(x) = first(x) + second(x + first(x)), checked against SimpleITK."""
    first, second = _known_field((128, 128), 1, 2.0), _known_field((128, 128), 2, 2.0)
    composite = sitk.CompositeTransform([_sitk_field(second), _sitk_field(first)])  # first applied first
    reference = sitk.Image(128, 128, sitk.sitkFloat32)
    expected = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(composite, sitk.sitkVectorFloat64,
                                                                        reference.GetSize()))
    ours = np.moveaxis(compose(first, second)[0].numpy(), 0, -1)
    inner = (slice(4, -4), slice(4, -4))
    assert np.abs(ours - expected)[inner].max() < 1e-6
    assert np.abs(ours - np.moveaxis((first + second)[0].numpy(), 0, -1)).max() > 0.05


def test_warp_rejects_bad_mode():
    import pytest
    with pytest.raises(ValueError, match="mode"):
        warp(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4), mode="cubic")


def test_a_sampling_grid_updated_one_change_at_a_time_warps_as_the_field_does(load_case):
    """The agent updates the sampling grid with each step's change (the change times grid_scale), never rebuilding it
    from the field: after many changes it still warps a real volume as the field it stands for does."""
    image, _ = load_case("11")
    arr = torch.as_tensor(sitk.GetArrayFromImage(image).astype(np.float32))[None, None]
    spatial = tuple(arr.shape[2:])
    changes = [_known_field(image.GetSize(), seed=s, amplitude=1.0).float() for s in range(5)]
    field, grid = torch.zeros_like(changes[0]), sampling_grid(torch.zeros_like(changes[0])).contiguous()
    scale = grid_scale(spatial, torch.device("cpu"), torch.float32).view(1, 3, 1, 1, 1)
    for step in range(40):
        change = (0.5 if step % 3 else -0.25) * changes[step % 5]
        field += change
        grid += (change * scale).movedim(1, -1)
    assert field.abs().max() > 2.0  # the changes add up to a real deformation
    assert torch.allclose(grid, sampling_grid(field), atol=1e-5)
    assert torch.allclose(sample(arr, grid), warp(arr, field), atol=1e-3 * float(arr.max()))


def test_sample_outside_takes_the_border_value_in_2d_and_3d():
    """Positions outside the image take the nearest border voxel's value, as grid_sample's border padding gives them
    (3-D samples clamp the positions and pad with zeros: the same values, faster)."""
    generator = torch.Generator().manual_seed(0)
    for spatial in ((6, 9, 11), (9, 11)):
        image = torch.rand(2, 2, *spatial, generator=generator, dtype=torch.float64)
        grid = (torch.rand(2, *spatial, len(spatial), generator=generator, dtype=torch.float64) * 3 - 1.5)
        assert (grid.abs() > 1).any() and (grid.abs() < 1).all(-1).any()  # both outside and inside positions
        for mode in ("bilinear", "nearest"):
            expected = torch.nn.functional.grid_sample(image, grid, mode=mode, padding_mode="border",
                                                       align_corners=True)
            assert torch.equal(sample(image, grid, mode), expected)
