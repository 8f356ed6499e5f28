"""The learned organ localiser: geometry of the map back to physical space, storage, training, shipped weights."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from AgentRegistrationLib.data.localiser import (
    LocaliserConfig,
    OrganLocaliser,
    gaussian_smooth,
    load_localiser,
    localisation_from_probability,
    localise,
    localiser_from_payload,
    localiser_grid,
    localiser_to_payload,
    resample_to_grid,
    weights_from_probability,
)
from AgentRegistrationLib.data.localiser_training import train_localiser
from AgentRegistrationLib.data.organ_box import BOX_SPREADS, localisation_from_label

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "Resources" / "Models"
TINY3 = LocaliserConfig(dim=3, grid=(16, 16, 8), channels=(2, 4))
TINY2 = LocaliserConfig(dim=2, grid=(16, 16), channels=(2, 4), spread_scale=(1.0, 1.0))


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def blob(size=(40, 32, 12), centre=(22.0, 12.0, 5.0), radius=(6.0, 4.0, 2.5)) -> np.ndarray:
    """An ellipsoid mask, array order (z, y, x); size, centre and radius in ITK order (x, y, z)."""
    grids = np.meshgrid(*[np.arange(n, dtype=float) for n in reversed(size)], indexing="ij")
    r = sum(((g - c) / rr) ** 2 for g, c, rr in zip(grids, reversed(centre), reversed(radius), strict=True))
    return (r <= 1).astype(np.uint8)


def image_of(array: np.ndarray, origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0), direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    return image


FLIPPED = (-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)  # x flipped, y and z swapped (a proper rotation+flip)
GEOMETRIES = [
    {},
    {"origin": (40.0, 0.0, 0.0)},
    {"origin": (-12.5, 30.0, 7.0), "spacing": (0.4, 0.7, 3.0)},
    {"origin": (5.0, -3.0, 2.0), "spacing": (0.5, 0.5, 2.5), "direction": FLIPPED},
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_localiser_grid_spans_the_field_of_view(geometry):
    image = image_of(blob(), **geometry)
    grid = localiser_grid(image, (10, 8, 6))
    n, m = np.array(image.GetSize()), np.array([10, 8, 6])
    first = np.array(image.TransformPhysicalPointToContinuousIndex(grid.GetOrigin()))
    last = np.array(image.TransformPhysicalPointToContinuousIndex(grid.TransformIndexToPhysicalPoint([9, 7, 5])))
    np.testing.assert_allclose(first, -0.5 + 0.5 * n / m, atol=1e-9)
    np.testing.assert_allclose(last, n - 0.5 - 0.5 * n / m, atol=1e-9)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_a_mask_mapped_through_the_localiser_grid_keeps_its_centre_and_spread(geometry):
    """A probability map = the mask resampled onto the localiser grid gives the mask's localisation back."""
    label = image_of(blob(), **geometry)
    mask = sitk.Cast(label, sitk.sitkFloat32)
    grid = localiser_grid(label, (20, 16, 12))
    p = resample_to_grid(mask, grid).astype(np.float64)
    true = localisation_from_label(label)
    found = localisation_from_probability(p, grid, "p")
    voxel = np.array(grid.GetSpacing())
    np.testing.assert_allclose(found.centre, true.centre, atol=0.1 * voxel.max())
    blur = np.sqrt(np.maximum(found.spread**2 - true.spread**2, 0))  # smoothing and interpolation add variance
    assert np.all(found.spread > 0.98 * true.spread) and np.all(blur < voxel), (found.spread, true.spread, voxel)


def test_the_anti_aliasing_smoothing_is_scipys_gaussian_filter(native):
    """``gaussian_smooth`` gives ``scipy.ndimage.gaussian_filter(mode="nearest")``'s values on a real image: an axis of
    sigma 0 left alone, a kernel of radius 0, one wider than its axis (the edge value repeated beyond it)."""
    from scipy.ndimage import gaussian_filter

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(native / "case30_image.nii.gz"))).astype(np.float64)
    for array, sigma in ((image, (0.0, 1.24, 1.24)), (image, (0.52, 2.6, 0.1)), (image[11], (9.0, 0.7)),
                         (image[:, 100], (30.0, 0.3))):
        theirs = gaussian_filter(array, sigma, mode="nearest")
        ours = gaussian_smooth(array, sigma)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12 * np.abs(theirs).max())
        assert np.abs(ours - array).max() > 0.05 * np.abs(array).max()  # it did smooth


def test_the_localisers_input_is_the_former_scipy_smoothed_resampling(native):
    """``resample_to_grid`` of a real image onto the shipped 3-D localiser's fine grid: scipy's smoothing in float32
    and ours in float64 give the same input to the network, to float32 rounding."""
    from scipy.ndimage import gaussian_filter

    image = sitk.ReadImage(str(native / "case30_image.nii.gz"))
    grid = localiser_grid(image, (96, 96, 32))
    ratio = np.array(grid.GetSpacing()) / np.array(image.GetSpacing())
    sigma = 0.5 * np.sqrt(np.maximum(ratio**2 - 1.0, 0.0))
    smooth = sitk.GetImageFromArray(gaussian_filter(sitk.GetArrayFromImage(image).astype(np.float32), sigma[::-1],
                                                    mode="nearest"))
    smooth.CopyInformation(image)
    before = sitk.GetArrayFromImage(sitk.Resample(smooth, grid, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                  sitk.sitkFloat32))
    np.testing.assert_allclose(resample_to_grid(image, grid), before, rtol=0, atol=1e-6 * np.abs(before).max())
    assert sigma.max() > 1.0  # the grid is coarser than the image: there was smoothing to do


def test_the_largest_weighting_keeps_the_heaviest_component():
    p = np.zeros((6, 12))
    p[1:3, 1:3] = 0.9  # 4 voxels of p 0.9
    p[2:5, 6:10] = 0.6  # 12 of p 0.6: the heavier
    np.testing.assert_array_equal(weights_from_probability(p, "largest"), np.where(p == 0.6, 0.6, 0.0))
    np.testing.assert_array_equal(weights_from_probability(p * 0.5, "largest"), (p * 0.5) ** 2)  # none above 0.5


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_the_ellipsoid_fit_finds_an_ellipsoids_centre_and_spread(geometry):
    """A map that is a solid ellipsoid: the fit gives the mask's centre and spread back, in physical space."""
    label = image_of(blob(), **geometry)
    grid = localiser_grid(label, (20, 16, 12))
    p = resample_to_grid(sitk.Cast(label, sitk.sitkFloat32), grid).astype(np.float64)
    true = localisation_from_label(label)
    found = localisation_from_probability(p, grid, "ellipsoid")
    voxel = np.array(grid.GetSpacing())
    np.testing.assert_allclose(found.centre, true.centre, atol=0.15 * voxel.max())
    np.testing.assert_allclose(found.spread, true.spread, rtol=0.1)


def test_the_ellipsoid_fit_is_less_swayed_than_moments_by_a_map_that_runs_into_a_neighbour():
    """The organ (probability 1) with a fainter neighbour beside it (0.5): moments move towards the neighbour and
    widen; the ellipsoid stays on the organ."""
    organ = blob(size=(48, 40, 16), centre=(20.0, 20.0, 8.0), radius=(7.0, 6.0, 4.0)).astype(np.float64)
    neighbour = blob(size=(48, 40, 16), centre=(33.0, 20.0, 8.0), radius=(5.0, 5.0, 3.0)).astype(np.float64)
    p = np.maximum(organ, 0.5 * neighbour)
    grid = image_of(np.zeros_like(p))
    true = localisation_from_label(image_of(organ.astype(np.uint8)))
    moments = localisation_from_probability(p, grid, "p2")
    fitted = localisation_from_probability(p, grid, "ellipsoid")
    moments_error, fitted_error = (abs(loc.centre[0] - true.centre[0]) for loc in (moments, fitted))
    assert fitted_error < 0.5 < moments_error, (fitted_error, moments_error)
    assert abs(fitted.spread[0] / true.spread[0] - 1) < 0.1 < moments.spread[0] / true.spread[0] - 1


def test_localise_follows_the_image_geometry_exactly():
    """The same array under any origin, spacing or direction: the same continuous index, spread in voxels."""
    torch.manual_seed(0)
    localiser = OrganLocaliser(TINY3).eval()
    array = blob().astype(np.int16) * 200 + 50
    reference = localise(localiser, image_of(array))
    for geometry in GEOMETRIES[1:]:
        image = image_of(array, **geometry)
        loc = localise(localiser, image)
        index = np.array(image.TransformPhysicalPointToContinuousIndex(loc.centre.tolist()))
        np.testing.assert_allclose(index, reference.centre, atol=1e-4)  # reference: unit spacing at the origin
        np.testing.assert_allclose(loc.spread / np.array(image.GetSpacing()), reference.spread, rtol=1e-4)


def test_an_image_moved_40_mm_moves_the_centre_by_40_mm():
    torch.manual_seed(1)
    localiser = OrganLocaliser(TINY3).eval()
    array = blob().astype(np.int16) * 300
    here = localise(localiser, image_of(array, origin=(1.0, 2.0, 3.0), spacing=(0.6, 0.6, 3.0)))
    there = localise(localiser, image_of(array, origin=(41.0, 2.0, 3.0), spacing=(0.6, 0.6, 3.0)))
    np.testing.assert_allclose(there.centre - here.centre, [40.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(there.spread, here.spread, rtol=1e-6)


def test_refinement_is_in_the_image_space_too():
    torch.manual_seed(2)
    localiser = OrganLocaliser(TINY3).eval()
    array = blob().astype(np.int16) * 300
    a = localise(localiser, image_of(array), refine=True)
    b = localise(localiser, image_of(array, origin=(0.0, -40.0, 0.0)), refine=True)
    np.testing.assert_allclose(b.centre - a.centre, [0.0, -40.0, 0.0], atol=1e-6)


def test_payload_round_trip_through_weights_only_load():
    torch.manual_seed(3)
    localiser = OrganLocaliser(TINY2).eval()
    buffer = io.BytesIO()
    torch.save(localiser_to_payload(localiser), buffer)
    buffer.seek(0)
    again = localiser_from_payload(torch.load(buffer, weights_only=True))
    assert again.config == localiser.config
    x = torch.rand(1, 1, 16, 16)
    torch.testing.assert_close(again(x), localiser(x))


def test_a_bad_payload_raises_a_clear_error():
    payload = localiser_to_payload(OrganLocaliser(TINY2))
    with pytest.raises(ValueError, match="not an organ-localiser payload"):
        localiser_from_payload({"config": {}})
    with pytest.raises(ValueError, match="version"):
        localiser_from_payload({**payload, "version": 99})
    with pytest.raises(ValueError, match="corrupt"):
        localiser_from_payload({**payload, "state": {}})
    with pytest.raises(ValueError, match="corrupt"):
        localiser_from_payload({**payload, "config": {**payload["config"], "dim": 5}})


def test_a_missing_file_raises_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read the organ localiser"):
        load_localiser(tmp_path / "none.pt")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="dim"):
        LocaliserConfig(dim=4)
    with pytest.raises(ValueError, match="multiples"):
        LocaliserConfig(dim=3, grid=(30, 30, 10), channels=(4, 8, 16, 32))
    with pytest.raises(ValueError, match="weighting"):
        LocaliserConfig(weighting="mean")


def test_wrong_dimension_and_empty_map_are_user_errors():
    with pytest.raises(ValueError, match="2-D but the image is 3-D"):
        localise(OrganLocaliser(TINY2), image_of(blob()))
    grid = localiser_grid(image_of(blob()), (16, 16, 8))
    with pytest.raises(ValueError, match="no organ"):
        localisation_from_probability(np.zeros((8, 16, 16)), grid)


def test_short_real_training_returns_a_finite_localisation(grid128):
    images = [sitk.ReadImage(str(grid128 / f"{c}_image.nii.gz"), sitk.sitkFloat32) for c in ("case00", "case04")]
    labels = [sitk.ReadImage(str(grid128 / f"{c}_label.nii.gz")) for c in ("case00", "case04")]
    localiser = train_localiser(images, labels, TINY3, iterations=3, seed=0)
    loc = localise(localiser, images[0])
    assert np.all(np.isfinite(loc.centre)) and np.all(loc.spread > 0)
    assert localiser.config.spread_scale != (1.0, 1.0, 1.0)  # calibrated on the training images


def test_agentreg_localiser_trains_on_the_organ_slices_of_the_named_subjects(grid128, tmp_path, capsys):
    from AgentRegistrationLib.cli import main
    from AgentRegistrationLib.data.localiser_training import organ_slices

    out = tmp_path / "localiser.pt"
    argv = ["localiser", str(grid128), "--dim", "2", "--subjects", "case00,case04", "--iterations", "4", "--out", str(out)]
    assert main(argv) == 0
    assert "agentreg train --localiser" in capsys.readouterr().err
    localiser = load_localiser(out)
    assert localiser.config.dim == 2 and localiser.config.spread_scale != (1.0, 1.0)  # calibrated
    record = torch.load(out, weights_only=True)["training"]
    assert record["subjects"] == ["case00", "case04"] and record["iterations"] == 4
    label = sitk.ReadImage(str(grid128 / "case00_label.nii.gz"))
    slices = organ_slices(sitk.ReadImage(str(grid128 / "case00_image.nii.gz")), label)
    centre = int(round(float(np.argwhere(sitk.GetArrayFromImage(label) > 0)[:, 0].mean())))
    assert 1 <= len(slices) <= 5 and all(s[1].GetDimension() == 2 for s in slices)
    assert any(np.array_equal(sitk.GetArrayFromImage(s[1]), sitk.GetArrayFromImage(label)[centre]) for s in slices)


def test_agentreg_localiser_names_a_subject_it_cannot_learn_from(grid128, tmp_path, capsys):
    from AgentRegistrationLib.cli import main

    data = tmp_path / "data"
    data.mkdir()
    image = sitk.ReadImage(str(grid128 / "case00_image.nii.gz"))
    sitk.WriteImage(image, str(data / "a_image.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(grid128 / "case00_label.nii.gz")), str(data / "a_label.nii.gz"))
    empty = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(image)
    sitk.WriteImage(empty, str(data / "b_image.nii.gz"))
    sitk.WriteImage(empty, str(data / "b_label.nii.gz"))
    out = tmp_path / "localiser.pt"
    assert main(["localiser", str(data), "--out", str(out), "--iterations", "2"]) == 1
    assert "the label of b is empty" in capsys.readouterr().err and not out.exists()
    assert main(["localiser", str(data), "--subjects", "a", "--out", str(out), "--minutes", "0"]) == 1
    assert "--minutes and --iterations must be positive" in capsys.readouterr().err and not out.exists()


def test_agentreg_localiser_continues_a_localiser_with_other_settings(grid128, tmp_path):
    """--init continues a localiser (its network and training record), --weighting / --refine change how its map
    is read: the options that were only in scripts/recipes/train_localiser.py."""
    from AgentRegistrationLib.cli import main
    from AgentRegistrationLib.data.localiser import localiser_record

    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    argv = ["localiser", str(grid128), "--dim", "2", "--subjects", "case00,case04"]
    assert main([*argv, "--iterations", "3", "--out", str(first)]) == 0
    assert main([*argv, "--iterations", "2", "--out", str(second), "--init", str(first), "--weighting", "largest",
                 "--refine", "no"]) == 0
    config = load_localiser(second).config
    assert (config.weighting, config.refine) == ("largest", False)
    assert localiser_record(second)["iterations"] == 5  # 3 before, 2 now
    assert main([*argv, "--iterations", "0", "--out", str(tmp_path / "x.pt")]) == 1  # 0 only to recalibrate --init
    assert main([*argv, "--iterations", "1", "--out", str(tmp_path / "x.pt"), "--init", str(tmp_path / "none.pt")]) == 1


def _model_voxel_error(loc, true, dim):
    model_size = np.array({2: (100, 100), 3: (75, 75, 20)}[dim])
    return np.linalg.norm((loc.centre - true.centre) / (np.array(BOX_SPREADS[dim]) * true.spread / (model_size - 1)))


@pytest.mark.parametrize("dim", [3, 2])
def test_the_shipped_localiser_finds_the_prostate_of_validation_subjects(native, grid128, dim):
    path = MODELS / f"localiser-{dim}d.pt"
    if not path.exists():
        pytest.skip(f"no shipped localiser at {path}")
    localiser = load_localiser(path)
    for folder, case in ((native, "case46"), (grid128, "case02")):  # validation subjects of the fixed split
        image = sitk.ReadImage(str(folder / f"{case}_image.nii.gz"))
        label = sitk.ReadImage(str(folder / f"{case}_label.nii.gz"))
        if dim == 2:
            z = int(round(float(np.argwhere(sitk.GetArrayViewFromImage(label) > 0)[:, 0].mean())))
            image, label = image[:, :, z], label[:, :, z]
        loc, true = localise(localiser, image), localisation_from_label(label)
        assert _model_voxel_error(loc, true, dim) < 6.0, (case, loc, true)
        assert np.all((loc.spread / true.spread > 0.6) & (loc.spread / true.spread < 1.6)), (case, loc, true)


@pytest.mark.parametrize(("model", "dim"), [("prostate-2d", 2), ("prostate-2d", 3), ("prostate-3d", 3)])
def test_the_shipped_models_carry_the_shipped_localisers(model, dim):
    """A localiser retrained or re-set (scripts/recipes/train_localiser.py --into) reaches the models that use it (a 2-D
    model also places its slab on a 3-D volume with the 3-D localiser)."""
    from AgentRegistrationLib.model.bundle import load_bundle

    path, bundle_path = MODELS / f"localiser-{dim}d.pt", MODELS / f"{model}.pt"
    if not path.exists() or not bundle_path.exists():
        pytest.skip("no shipped localiser or model")
    carried = localiser_from_payload(load_bundle(bundle_path).localisers[str(dim)])
    shipped = load_localiser(path)
    assert carried.config == shipped.config
    assert all(torch.equal(a, b) for a, b in zip(carried.state_dict().values(), shipped.state_dict().values(),
                                                   strict=True))


def test_model_cards_can_name_every_localiser_weighting():
    from AgentRegistrationLib.contract.training_folder import LOCALISER_WEIGHTINGS as WEIGHTINGS
    from AgentRegistrationLib.model.bundle import LOCALISER_WEIGHTING_TEXT as LOCALISER_WEIGHTINGS

    assert set(LOCALISER_WEIGHTINGS) == set(WEIGHTINGS)
