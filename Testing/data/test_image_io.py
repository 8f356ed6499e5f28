"""Image I/O keeps geometry in every format, labels stay integer, writes are atomic."""

import numpy as np
import pytest
import SimpleITK as sitk
from AgentRegistrationLib.data.image_io import dicom_series, image_exists, read_image, read_image_noted, read_label, write_image


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_round_trip_keeps_geometry(native, tmp_path, suffix):
    image = sitk.ReadImage(str(native / "case13_image.nii.gz"))[:, :, 5:9]
    image.SetOrigin((10.5, -20.25, 3.0))
    image.SetSpacing((0.6, 0.7, 3.5))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    out = read_image(write_image(image, tmp_path / f"x{suffix}"))
    assert np.allclose(out.GetOrigin(), image.GetOrigin()) and np.allclose(out.GetSpacing(), image.GetSpacing())
    assert np.allclose(out.GetDirection(), image.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(image))


def test_label_stays_integer(native, tmp_path):
    label = sitk.Cast(sitk.ReadImage(str(native / "case13_label.nii.gz")), sitk.sitkFloat32)
    path = write_image(label, tmp_path / "label.nrrd")
    out = read_label(path)
    assert out.GetPixelID() == sitk.sitkInt16
    assert set(np.unique(sitk.GetArrayFromImage(out))) == {0, 1}


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="moving image file not found"):
        read_image(tmp_path / "nope.nii.gz", "moving image")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read fixed image"):
        read_image(bad, "fixed image")


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        write_image(sitk.Image(4, 4, sitk.sitkFloat32), tmp_path / "x.unknownformat")
    assert list(tmp_path.iterdir()) == []


def _volume(grid128, case: str, origin=(-30.0, -40.0, 12.0)) -> sitk.Image:
    volume = sitk.ReadImage(str(grid128 / f"{case}_image.nii.gz"))
    volume.SetSpacing((0.6, 0.6, 3.0))
    volume.SetOrigin(origin)
    return volume


def test_a_dicom_series_folder_reads_as_the_volume(grid128, tmp_path, write_dicom_series):
    volume = _volume(grid128, "case02")
    folder = write_dicom_series(volume, tmp_path / "exam")
    image, note = read_image_noted(folder, "fixed image")
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(volume))
    assert np.allclose(image.GetOrigin(), volume.GetOrigin()) and np.allclose(image.GetSpacing(), volume.GetSpacing())
    assert "DICOM series 1.2.826.0.1.3680043.2.1125.1 (T2 axial, 32 files)" in note and str(folder) in note
    assert image_exists(folder) and not image_exists(tmp_path / "nope")


def test_a_folder_of_several_series_asks_which(grid128, tmp_path, write_dicom_series):
    folder = tmp_path / "exam"
    axial = _volume(grid128, "case02")
    write_dicom_series(axial, folder, "T2 axial", "1.2.3.4.1")
    write_dicom_series(_volume(grid128, "case13", origin=(5.0, 5.0, 5.0)), folder, "T2 sagittal", "1.2.3.4.2")
    assert sorted(s.uid for s in dicom_series(folder)) == ["1.2.3.4.1", "1.2.3.4.2"]
    with pytest.raises(ValueError, match="holds 2 DICOM series") as err:
        read_image(folder, "moving image")
    for words in ("moving image", "1.2.3.4.1 (T2 axial, 32 files)", "1.2.3.4.2 (T2 sagittal, 32 files)",
                  f"{folder}@<SeriesInstanceUID>"):
        assert words in str(err.value)
    image, note = read_image_noted(f"{folder}@1.2.3.4.1", "moving image")  # the user's choice
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(axial)) and "T2 axial" in note
    with pytest.raises(ValueError, match="has no DICOM series 9.9"):
        read_image(f"{folder}@9.9", "moving image")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no DICOM series"):
        read_image(tmp_path / "empty", "fixed image")
