"""The same anatomy stored in another voxel order registers the same (issue 27): prostate exams hold sagittal and
coronal series as well as axial ones, and a volume may be stored with its rows flipped. The localiser, the crop boxes
and the organ's spread are measured on the images in one canonical voxel order (``data/orientation.py``), and the
results come back on the user's own fixed grid.

Shipped 3-D model, ``agentreg register`` on real PROMISE12 validation subjects (grid128), with labels and without."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from AgentRegistrationLib.cli import main
from AgentRegistrationLib.contract import register_folder
from AgentRegistrationLib.data.orientation import canonical, is_canonical, on_grid_of

SHIPPED_3D = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "prostate-3d.pt"


def _sagittal_like(image: sitk.Image) -> sitk.Image:
    """Sagittal-like storage: axes (z, x, y), the first and last of them running backwards; same anatomy."""
    return sitk.Flip(sitk.PermuteAxes(image, [2, 0, 1]), [True, False, True], flipAboutOrigin=False)


def _store(grid128: Path, case: str, folder: Path, permute: bool) -> tuple[Path, Path]:
    paths = []
    for kind in ("image", "label"):
        image = sitk.ReadImage(str(grid128 / f"{case}_{kind}.nii.gz"))
        paths.append(folder / f"{case}_{'permuted' if permute else 'original'}_{kind}.nii.gz")
        sitk.WriteImage(_sagittal_like(image) if permute else image, str(paths[-1]))
    return paths[0], paths[1]


def _dice_after(tmp_path: Path, name: str, fixed: tuple[Path, Path], moving: tuple[Path, Path], labels: bool,
                truth: Path, moving_label: Path) -> float:
    """Register, warp the original moving label through the written displacement in plain SimpleITK, and measure
    Dice against the original fixed label on its own grid."""
    out = tmp_path / name
    argv = ["register", "--fixed", str(fixed[0]), "--moving", str(moving[0]), "--model", str(SHIPPED_3D),
            "--output-dir", str(out), "--steps", "60"]
    if labels:
        argv += ["--fixed-label", str(fixed[1]), "--moving-label", str(moving[1])]
    assert main(argv) == 0
    displacement = sitk.ReadImage(str(out / register_folder.DISPLACEMENT))
    assert displacement.GetSize() == sitk.ReadImage(str(fixed[0])).GetSize()  # on the user's own fixed grid
    assert np.allclose(displacement.GetDirection(), sitk.ReadImage(str(fixed[0])).GetDirection())
    transform = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))
    warped = sitk.Resample(sitk.ReadImage(str(moving_label)), displacement, transform, sitk.sitkNearestNeighbor, 0)
    reference = sitk.ReadImage(str(truth))
    warped = sitk.GetArrayFromImage(on_grid_of(canonical(warped), reference)) > 0
    reference = sitk.GetArrayFromImage(reference) > 0
    return 2 * float((warped & reference).sum()) / float(warped.sum() + reference.sum())


def test_canonical_order_is_an_exact_permutation(grid128):
    image = sitk.ReadImage(str(grid128 / "case02_image.nii.gz"))
    stored = _sagittal_like(image)
    assert not is_canonical(stored) and is_canonical(image) and canonical(image) is image
    back = canonical(stored)
    assert back.GetSize() == image.GetSize()
    assert np.allclose(back.GetOrigin(), image.GetOrigin()) and np.allclose(back.GetDirection(), image.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    again = on_grid_of(back, stored)  # and exactly back onto the stored grid
    assert np.allclose(again.GetOrigin(), stored.GetOrigin())
    assert np.array_equal(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(stored))


@pytest.mark.slow
@pytest.mark.parametrize("labels", [True, False], ids=["with-labels", "images-only"])
def test_a_permuted_and_flipped_volume_registers_like_the_original(grid128, tmp_path, labels):
    fixed, moving = _store(grid128, "case02", tmp_path, False), _store(grid128, "case13", tmp_path, False)
    permuted_moving = _store(grid128, "case13", tmp_path, True)
    permuted_fixed = _store(grid128, "case02", tmp_path, True)
    truth, moving_label = fixed[1], moving[1]
    original = _dice_after(tmp_path, "original", fixed, moving, labels, truth, moving_label)
    by_moving = _dice_after(tmp_path, "moving", fixed, permuted_moving, labels, truth, permuted_moving[1])
    by_fixed = _dice_after(tmp_path, "fixed", permuted_fixed, moving, labels, truth, moving_label)
    assert original > 0.5  # a real registration, not an empty label
    assert abs(by_moving - original) < 0.01 and abs(by_fixed - original) < 0.01, (original, by_moving, by_fixed)
