"""A DICOM series folder registers like the same volume in NIfTI (issue 27): in ``agentreg register``, in the folders
of ``register-many`` and in a training data folder. The series are written by the test from real PROMISE12 subjects
(grid128, with a scanner-like spacing and origin) and registered with the shipped 3-D model."""

from __future__ import annotations

from pathlib import Path

import pytest
import SimpleITK as sitk
from AgentRegistrationLib.cli import main
from AgentRegistrationLib.contract import register_folder
from AgentRegistrationLib.data.dataset import find_subjects
from AgentRegistrationLib.stages.cohort_pairs import patient_images

SHIPPED_3D = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "prostate-3d.pt"


def _case(grid128: Path, case: str, folder: Path, origin) -> tuple[sitk.Image, Path, Path]:
    """The subject's image and label with a scanner-like geometry, written as NIfTI."""
    out = []
    for kind in ("image", "label"):
        image = sitk.ReadImage(str(grid128 / f"{case}_{kind}.nii.gz"))
        image.SetSpacing((0.6, 0.6, 3.0))
        image.SetOrigin(origin)
        out.append(image)
        sitk.WriteImage(image, str(folder / f"{case}_{kind}.nii.gz"))
    return out[0], folder / f"{case}_image.nii.gz", folder / f"{case}_label.nii.gz"


def _register(out: Path, fixed, moving, fixed_label, moving_label) -> dict:
    assert main(["register", "--fixed", str(fixed), "--moving", str(moving), "--fixed-label", str(fixed_label),
                 "--moving-label", str(moving_label), "--model", str(SHIPPED_3D), "--output-dir", str(out),
                 "--steps", "60"]) == 0
    return register_folder.read_metrics(out / register_folder.METRICS_JSON)


@pytest.mark.slow
def test_a_dicom_series_registers_like_the_same_volume_in_nifti(grid128, tmp_path, write_dicom_series, capsys):
    fixed, fixed_file, fixed_label = _case(grid128, "case02", tmp_path, (-38.0, -40.0, -50.0))
    moving, moving_file, moving_label = _case(grid128, "case13", tmp_path, (-36.0, -35.0, -45.0))
    fixed_dicom = write_dicom_series(fixed, tmp_path / "fixed_exam", "T2 axial fixed", "1.2.3.4.1")
    moving_dicom = write_dicom_series(moving, tmp_path / "moving_exam", "T2 axial moving", "1.2.3.4.2")
    nifti = _register(tmp_path / "nifti", fixed_file, moving_file, fixed_label, moving_label)
    capsys.readouterr()
    dicom = _register(tmp_path / "dicom", fixed_dicom, moving_dicom, fixed_label, moving_label)
    err = capsys.readouterr().err
    assert "fixed image: read DICOM series 1.2.3.4.1 (T2 axial fixed, 32 files)" in err  # which series was read
    assert "moving image: read DICOM series 1.2.3.4.2" in err
    for when in ("none", "before", "after"):
        assert round(dicom[f"dice_{when}"], 3) == round(nifti[f"dice_{when}"], 3)
    assert nifti["dice_after"] > nifti["dice_none"]  # a real registration


def test_dicom_series_folders_are_images_in_every_data_folder(grid128, tmp_path, write_dicom_series):
    training = tmp_path / "training"
    training.mkdir()
    for case in ("case00", "case04"):
        image, _, _ = _case(grid128, case, training, (0.0, 0.0, 0.0))
        (training / f"{case}_image.nii.gz").unlink()
        write_dicom_series(image, training / f"{case}_image", "T2", f"1.2.3.{case[-1]}")
    subjects = find_subjects(training)
    assert [(s.name, s.image.name) for s in subjects] == [("case00", "case00_image"), ("case04", "case04_image")]
    patients = tmp_path / "patients"
    patients.mkdir()
    image, _, _ = _case(grid128, "case09", patients, (0.0, 0.0, 0.0))
    write_dicom_series(image, patients / "case17", "T2", "1.2.3.17")
    (patients / "notes").mkdir()  # a folder without DICOM is no patient
    assert {name: path.name for name, path, _ in patient_images(patients)} == {"case09": "case09_image.nii.gz",
                                                                              "case17": "case17"}
