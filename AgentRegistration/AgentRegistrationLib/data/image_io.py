"""Image I/O through SimpleITK: every format it reads (NRRD, NIfTI, MHA, ...) and DICOM series, geometry kept.

Wherever an image is accepted, a folder holding one DICOM series is too (``FOLDER``); when the folder holds
several series, ``FOLDER@SeriesInstanceUID`` picks one (:func:`dicom_series` lists them, and the error that asks for
the choice names each). Writes are atomic (:func:`files.atomic_write`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AgentRegistrationLib.contract.files import atomic_write

_LABEL_TYPES = (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32,
                sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64)


SERIES_SEPARATOR = "@"  # FOLDER@SeriesInstanceUID: one DICOM series of a folder that holds several


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a folder: its SeriesInstanceUID, description and slice files (in slice order)."""

    uid: str
    description: str
    files: tuple[str, ...]

    def text(self) -> str:
        return f"{self.uid} ({self.description or 'no description'}, {len(self.files)} files)"


def _series_path(path: str | Path) -> tuple[Path, str | None]:
    """``(folder or file, series UID or None)`` of an image argument."""
    text = str(path)
    folder, sep, uid = text.rpartition(SERIES_SEPARATOR)
    if sep and not Path(text).exists() and Path(folder).is_dir() and uid:
        return Path(folder), uid
    return Path(text), None


def image_exists(path: str | Path) -> bool:
    """Whether ``path`` names an image file, a folder (of a DICOM series), or ``FOLDER@SeriesInstanceUID``."""
    path, _ = _series_path(path)
    return path.is_file() or path.is_dir()


def holds_dicom_series(folder: str | Path) -> bool:
    """Whether ``folder`` holds at least one DICOM series (without reading the series' headers)."""
    return Path(folder).is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def dicom_series(folder: str | Path) -> list[DicomSeries]:
    """The DICOM series in ``folder`` (not its subfolders), as GDCM sorts their slices."""
    folder = str(folder)
    out = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder):
        files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        reader.ReadImageInformation()
        description = reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""
        out.append(DicomSeries(uid, description, files))
    return out


def _read_series(folder: Path, uid: str | None, what: str) -> tuple[sitk.Image, str]:
    series = dicom_series(folder)
    if not series:
        raise ValueError(f"the {what} folder {folder} holds no DICOM series: give an image file (NIfTI, NRRD, ...) or "
                         "a folder of DICOM slices")
    if uid is not None:
        chosen = [s for s in series if s.uid == uid]
        if not chosen:
            raise ValueError(f"the {what} folder {folder} has no DICOM series {uid}; it holds: "
                             + "; ".join(s.text() for s in series))
    elif len(series) > 1:
        raise ValueError(f"the {what} folder {folder} holds {len(series)} DICOM series: "
                         + "; ".join(s.text() for s in series)
                         + f". Choose one as {folder}{SERIES_SEPARATOR}<SeriesInstanceUID>")
    else:
        chosen = series
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(chosen[0].files))
    try:
        image = reader.Execute()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        raise ValueError(f"cannot read the {what} DICOM series {chosen[0].uid} in {folder} ({first})") from None
    return image, f"{what}: read DICOM series {chosen[0].text()} from {folder}"


def read_image_noted(path: str | Path, what: str = "image") -> tuple[sitk.Image, str | None]:
    """Read an image file or a DICOM series folder (:data:`SERIES_SEPARATOR`), with a message naming ``what`` and
    the file when it cannot be read; the note says which DICOM series was read (``None`` for a file)."""
    path, uid = _series_path(path)
    if path.is_dir():
        return _read_series(path, uid, what)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return sitk.ReadImage(str(path)), None
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        raise ValueError(f"cannot read {what} {path}: not an image SimpleITK can read ({first})") from None


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """:func:`read_image_noted` without the note."""
    return read_image_noted(path, what)[0]


def read_label(path: str | Path, what: str = "label") -> sitk.Image:
    """Read a label map and make sure it is integer (values are rounded if stored as float)."""
    image = read_image(path, what)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{what} {path} has {image.GetNumberOfComponentsPerPixel()} components; a label map has one")
    if image.GetPixelID() not in _LABEL_TYPES:
        arr = np.rint(sitk.GetArrayFromImage(image)).astype(np.int16)
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(image)
        image = out
    return image


def label_voxels(label: sitk.Image) -> int:
    """How many voxels of a label map are non-zero (labelled)."""
    return int(np.count_nonzero(sitk.GetArrayViewFromImage(label)))


def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> Path:
    """Write an image atomically; the format follows the file name."""
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, compress))
