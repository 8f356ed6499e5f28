"""Our metrics agree with SimpleITK's filters, and with the scipy.ndimage code they replace, on real PROMISE12 masks."""

import numpy as np
import pytest
import SimpleITK as sitk
from AgentRegistrationLib.core.metrics import (
    _surface,
    dice,
    jacobian_determinant,
    jacobian_statistics,
    surface_distances,
)

SPACING = (0.6, 0.6, 3.0)


def _padded(label):
    arr = np.pad(sitk.GetArrayFromImage(label), 1)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    return arr, img


def test_dice_matches_sitk(load_case):
    a, ia = _padded(load_case("00")[1])
    b, ib = _padded(load_case("13")[1])
    f = sitk.LabelOverlapMeasuresImageFilter()
    f.Execute(ia, ib)
    assert dice(a, b) == pytest.approx(f.GetDiceCoefficient(), abs=1e-12)
    assert 0.1 < dice(a, b) < 0.95
    assert dice(np.zeros(3), np.zeros(3)) == 1.0


def test_surface_distances_match_sitk(load_case):
    a, ia = _padded(load_case("00")[1])
    b, ib = _padded(load_case("13")[1])
    ca, cb = sitk.LabelContour(ia, fullyConnected=False), sitk.LabelContour(ib, fullyConnected=False)
    hd = sitk.HausdorffDistanceImageFilter()
    hd.Execute(ca, cb)
    ours = surface_distances(a, b, SPACING)
    assert ours["hausdorff"] == pytest.approx(hd.GetHausdorffDistance(), rel=1e-6)
    # average surface distance: distance maps of each contour sampled on the other contour
    da = sitk.GetArrayFromImage(sitk.Abs(sitk.SignedMaurerDistanceMap(ca, squaredDistance=False, useImageSpacing=True)))
    db = sitk.GetArrayFromImage(sitk.Abs(sitk.SignedMaurerDistanceMap(cb, squaredDistance=False, useImageSpacing=True)))
    sa, sb = sitk.GetArrayFromImage(ca) > 0, sitk.GetArrayFromImage(cb) > 0
    asd = np.concatenate([db[sa], da[sb]]).mean()
    assert ours["average_surface_distance"] == pytest.approx(asd, rel=1e-3)
    assert ours["hausdorff95"] <= ours["hausdorff"]
    in_voxels = surface_distances(a, b)
    assert in_voxels["hausdorff"] != ours["hausdorff"]


def _label_pairs(native, dim):
    """Real masks of subject 17: against subject 30's resampled onto its grid, and against itself shifted (by a few
    voxels, off the image's edge too); one axial slice of each when ``dim`` is 2."""
    fixed = sitk.ReadImage(str(native / "case17_label.nii.gz"))
    other = sitk.ReadImage(str(native / "case30_label.nii.gz"))
    other.SetOrigin(fixed.GetOrigin())
    a = sitk.GetArrayFromImage(fixed) > 0
    b = sitk.GetArrayFromImage(sitk.Resample(other, fixed, sitk.Transform(), sitk.sitkNearestNeighbor)) > 0
    shifted = np.roll(a, (1, 5, -3), axis=(0, 1, 2))
    edge = a.copy()
    edge[:, :, -2:] = True
    if dim == 2:
        z = int(np.nonzero(a)[0].mean())
        return [(a[z], b[z]), (a[z], shifted[z]), (a[z], edge[z])]
    return [(a, b), (a, shifted), (a, edge)]


def _scipy_surface_distances(a, b, spacing):
    """The former implementation, by scipy.ndimage, on the whole image."""
    from scipy import ndimage

    sampling = None if spacing is None else spacing[::-1]
    sa, sb = (m & ~ndimage.binary_erosion(m, border_value=0) for m in (a, b))
    ab = ndimage.distance_transform_edt(~sb, sampling=sampling)[sa]
    ba = ndimage.distance_transform_edt(~sa, sampling=sampling)[sb]
    return {"hausdorff": max(ab.max(), ba.max()), "hausdorff95": max(np.percentile(ab, 95), np.percentile(ba, 95)),
            "average_surface_distance": np.concatenate([ab, ba]).mean()}


@pytest.mark.parametrize("dim", [2, 3])
def test_the_surface_is_the_mask_less_its_face_connected_erosion(native, dim):
    """As scipy.ndimage's ``binary_erosion(mask, border_value=0)`` gives it: the image's border counts as outside."""
    from scipy import ndimage

    for a, b in _label_pairs(native, dim):
        for mask in (a, b):
            np.testing.assert_array_equal(_surface(mask), mask & ~ndimage.binary_erosion(mask, border_value=0))
    assert _surface(b)[..., -1].all()  # the last pair's mask fills the image's last columns: beyond them is outside


@pytest.mark.parametrize("dim", [2, 3])
def test_surface_distances_are_those_of_scipys_exact_transform(native, dim):
    """SimpleITK's Maurer transform gives scipy.ndimage's Hausdorff, HD95 and ASSD: exactly in voxels and on unit
    spacing (float32 holds the integer squared distances), within 5e-6 on anisotropic spacings."""
    for a, b in _label_pairs(native, dim):
        for spacing, rel in ((None, 0.0), ((1.0,) * dim, 0.0), ((0.5, 0.6, 3.0)[:dim], 5e-6),
                             ((0.31, 0.27, 2.2)[:dim], 5e-6)):
            ours = surface_distances(a, b, spacing)
            assert ours == pytest.approx(_scipy_surface_distances(a, b, spacing), rel=rel, abs=0), (spacing, ours)
            assert ours["hausdorff"] > 1.0


def test_surface_distance_of_empty_mask_is_an_error():
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(np.zeros((4, 4)), np.ones((4, 4)))


def test_jacobian_of_affine_field():
    a = np.array([[0.1, 0.2], [-0.05, 0.3]])
    y, x = np.mgrid[0:20, 0:30].astype(float)
    u = np.stack([a[0, 0] * x + a[0, 1] * y, a[1, 0] * x + a[1, 1] * y])
    assert np.allclose(jacobian_determinant(u), np.linalg.det(np.eye(2) + a))
    folding = np.stack([-2.0 * x, 0 * y])
    assert jacobian_statistics(folding)["folding_percent"] == 100.0


def test_jacobian_matches_sitk_on_smooth_field():
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter
    u = np.stack([gaussian_filter(rng.normal(0, 40, (20, 40, 40)), 4) for _ in range(3)])
    field = sitk.GetImageFromArray(np.moveaxis(u, 0, -1), isVector=True)
    field.SetSpacing(SPACING)
    theirs = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    ours = jacobian_determinant(u, SPACING)
    inner = (slice(1, -1),) * 3
    assert np.abs(ours - theirs)[inner].max() < 1e-6
    assert ours.std() > 0.01
