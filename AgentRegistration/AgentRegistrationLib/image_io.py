"""Image I/O through SimpleITK: every format it reads (NRRD, NIfTI, MHA, ...), geometry kept.

Writes go to a temporary name in the target folder and are renamed into place, so an
interrupted write never leaves a half-written file under the real name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

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


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem.split('.')[0]}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> Path:
    """Write an image atomically; the format follows the file name."""
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, compress))
