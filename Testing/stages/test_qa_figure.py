"""The QA figure (qa.png) a user looks at after ``agentreg register``: windowing that shows the prostate of a dark
endorectal-coil image, the crop box read back from metrics.json, the slices through the organ, and the figure a real
3-D registration writes (the shipped 3-D model on two real grid128 validation subjects with an endorectal coil)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from AgentRegistrationLib.cli import main
from AgentRegistrationLib.contract import register_folder
from AgentRegistrationLib.stages.qa_figure import (
    crop_box,
    label_box,
    organ_window,
    planes,
    qa_figure,
    windowed,
)

SHIPPED_3D = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "prostate-3d.pt"
STEPS = 4


# -- windowing ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["12", "46"])  # BIDMC and HK, both with an endorectal coil: dark, with a bright flare
def test_the_window_of_the_organ_region_shows_the_prostate_of_a_dark_coil_image(native, case):
    image = sitk.ReadImage(str(native / f"case{case}_image.nii.gz"))
    label = sitk.ReadImage(str(native / f"case{case}_label.nii.gz"))
    array, organ = sitk.GetArrayFromImage(image).astype(float), sitk.GetArrayFromImage(label) > 0
    median = np.median(array[organ])
    # the premise: the whole volume's range (what a plain imshow draws) puts the prostate in the dark
    assert (median - array.min()) / (array.max() - array.min()) < 0.08
    shown = windowed(array[organ], organ_window(array, label_box(label)))
    assert 0.2 < np.median(shown) < 0.8  # the organ's typical grey well inside the range
    assert np.mean((shown > 0) & (shown < 1)) > 0.9  # and its texture neither clipped black nor white


def test_a_flat_region_still_gives_a_window():
    assert organ_window(np.full((4, 4), 7.0)) == (7.0, 8.0)
    assert organ_window(np.arange(101.0), (slice(0, 51),), (0, 100)) == (0.0, 50.0)


# -- the crop box and the slices ----------------------------------------------------------------------------------
def _image(size=(40, 30, 20), spacing=(0.5, 0.5, 2.0), origin=(10.0, -20.0, 5.0)) -> sitk.Image:
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def test_the_crop_box_of_metrics_json_is_found_in_the_fixed_image():
    image = _image()
    centre = image.TransformContinuousIndexToPhysicalPoint((20.0, 10.0, 8.0))
    metrics = {"fixed_crop_centre": list(centre), "fixed_crop_size": [10.0, 5.0, 8.0],  # 20 x 10 x 4 voxels
               "fixed_crop_axes": list(image.GetDirection())}
    assert crop_box(image, metrics) == (slice(6, 11), slice(5, 16), slice(10, 31))  # z, y, x
    assert crop_box(image, {}) is None
    far = {**metrics, "fixed_crop_centre": [1000.0, 0.0, 0.0]}
    assert crop_box(image, far) is None


def test_slices_cross_at_the_crop_centre_and_name_their_plane():
    image = _image()
    centre = image.TransformContinuousIndexToPhysicalPoint((20.2, 9.8, 8.4))
    axial, coronal, sagittal = planes(image, centre)
    assert axial.position == coronal.position == sagittal.position == (20, 10, 8)
    array = np.arange(20 * 30 * 40, dtype=float).reshape(20, 30, 40)
    assert np.array_equal(axial.take(array), array[8])
    assert np.array_equal(coronal.take(array), array[:, 10, :])
    assert np.array_equal(sagittal.take(array), array[:, :, 20])
    assert len(planes(image[:, :, 3], centre[:2])) == 1


def test_a_2d_figure_shows_one_slice_with_the_outline_on_the_label(grid128):
    """A real grid128 slice registered to itself: one row (the image, the checkerboard); the red outline of the warped
    label encloses exactly the label's pixels."""
    image = sitk.ReadImage(str(grid128 / "case09_image.nii.gz"))
    label = sitk.ReadImage(str(grid128 / "case09_label.nii.gz"))
    z = int(np.round(np.nonzero(sitk.GetArrayFromImage(label))[0].mean()))
    image, label = image[:, :, z], label[:, :, z]
    fig = qa_figure(image, image, {"steps": 0}, None, label, "case09 to itself")
    assert len(fig.axes) == 2 and fig.axes[0].get_title() == "fixed, 2-D image"
    (outline,) = fig.axes[0].collections
    vertices = np.concatenate([p.vertices for p in outline.get_paths()])
    rows, cols = np.nonzero(sitk.GetArrayFromImage(label))
    assert vertices[:, 0].min() == pytest.approx(cols.min() - 0.5, abs=0.51)
    assert vertices[:, 0].max() == pytest.approx(cols.max() + 0.5, abs=0.51)
    assert vertices[:, 1].min() == pytest.approx(rows.min() - 0.5, abs=0.51)
    assert vertices[:, 1].max() == pytest.approx(rows.max() + 0.5, abs=0.51)
    # a checkerboard of an image with itself is the image
    np.testing.assert_allclose(fig.axes[1].images[0].get_array(), fig.axes[0].images[0].get_array())


# -- a real registration ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(grid128, tmp_path_factory):
    """The shipped 3-D model on validation subjects 02 (moving) and 09 (fixed), both with labels, a few steps."""
    if not SHIPPED_3D.is_file():
        pytest.skip(f"the shipped 3-D model is missing: {SHIPPED_3D}")
    out = tmp_path_factory.mktemp("qa_run") / "result"
    code = main(["register", "--fixed", str(grid128 / "case09_image.nii.gz"), "--moving",
                 str(grid128 / "case02_image.nii.gz"), "--fixed-label", str(grid128 / "case09_label.nii.gz"),
                 "--moving-label", str(grid128 / "case02_label.nii.gz"), "--model", str(SHIPPED_3D),
                 "--output-dir", str(out), "--device", "cpu", "--steps", str(STEPS)])
    assert code == 0
    return out


def _colour_pixels(png: Path, rgb: tuple[float, float, float]) -> int:
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))[..., :3]
    return int(np.all(np.abs(pixels - np.array(rgb)) < 0.1, axis=-1).sum())


RED, LIME = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)


def test_register_writes_the_qa_figure_with_both_outlines(run):
    png = run / register_folder.QA_PNG
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _colour_pixels(png, RED) > 100 and _colour_pixels(png, LIME) > 100  # warped and fixed outlines drawn


def test_the_qa_figure_shows_three_slices_through_the_crop_centre(run, grid128):
    fixed = sitk.ReadImage(str(grid128 / "case09_image.nii.gz"))
    fixed_label = sitk.ReadImage(str(grid128 / "case09_label.nii.gz"))
    warped_label = sitk.ReadImage(str(run / register_folder.WARPED_LABEL))
    metrics = json.loads((run / register_folder.METRICS_JSON).read_text())
    fig = qa_figure(fixed, sitk.ReadImage(str(run / register_folder.WARPED)), metrics, fixed_label, warped_label,
                    "case02 to case09")
    assert len(fig.axes) == 6
    titles = [ax.get_title() for ax in fig.axes]
    centre = np.rint(fixed.TransformPhysicalPointToContinuousIndex(metrics["fixed_crop_centre"])).astype(int)
    assert titles[0] == f"fixed, axial slice {centre[2] + 1} of 32 (index k {centre[2]})"
    assert titles[2].startswith("fixed, coronal slice") and f"(index j {centre[1]})" in titles[2]
    assert titles[4].startswith("fixed, sagittal slice") and f"(index i {centre[0]})" in titles[4]
    assert all(t == "checkerboard: fixed / warped moving" for t in titles[1::2])
    assert "none" in fig.get_suptitle() and "start" in fig.get_suptitle() and "after" in fig.get_suptitle()
    # the axial panel draws slice k of the fixed image; the prostate in it is visible (not black, not white)
    axial = np.ma.getdata(fig.axes[0].images[0].get_array())
    organ = sitk.GetArrayFromImage(fixed_label)[centre[2]] > 0
    assert organ.any() and 0.2 < np.median(axial[organ]) < 0.8
    # outlines: two per slice (fixed green, warped red) where the labels cross it; the crop box dashed on each
    for ax in fig.axes[0::2]:
        assert [tuple(c.get_edgecolor()[0][:3]) for c in ax.collections] == [LIME, RED]
        assert [p.get_gid() for p in ax.patches] == ["crop-box"]


# -- the README's pictures ------------------------------------------------------------------------------------------
def test_the_readme_pictures_are_what_the_render_command_makes(tmp_path):
    """scripts/render_pictures.py registers the module's sample pair with the shipped 3-D model; the pictures in the
    repository and in the README are its output (same files, same size)."""
    import importlib.util

    import matplotlib.image

    repo = Path(__file__).resolve().parents[2]
    if not SHIPPED_3D.is_file():
        pytest.skip(f"the shipped 3-D model is missing: {SHIPPED_3D}")
    spec = importlib.util.spec_from_file_location("render_pictures", repo / "scripts" / "render_pictures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    written = script.render(tmp_path / "pictures", keep=tmp_path / "kept")
    assert [p.name for p in written] == ["first_registration.png", "trajectory.png"]
    assert (tmp_path / "pictures" / "first_registration.png").read_bytes() == \
        (tmp_path / "kept" / "first_registration" / register_folder.QA_PNG).read_bytes()
    readme = (repo / "README.md").read_text()
    assert "scripts/render_pictures.py" in readme
    for path in written:
        shipped = repo / "Resources" / "Screenshots" / path.name
        assert f"(Resources/Screenshots/{path.name})" in readme
        assert matplotlib.image.imread(str(shipped)).shape == matplotlib.image.imread(str(path)).shape
