"""Image I/O through SimpleITK: every format it reads (NRRD, NIfTI, MHA, ...), geometry kept.

Writes are atomic (:func:`files.atomic_write`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AgentRegistrationLib.contract.files import atomic_write

_LABEL_TYPES = (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32,
                sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64)


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """Read an image, with a message naming ``what`` and the file when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        raise ValueError(f"cannot read {what} {path}: not an image SimpleITK can read ({first})") from None


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
