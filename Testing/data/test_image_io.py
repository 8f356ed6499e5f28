"""Image I/O keeps geometry in every format, labels stay integer, writes are atomic."""

import numpy as np
import pytest
import SimpleITK as sitk
from AgentRegistrationLib.data.image_io import read_image, read_label, write_image


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
